"""The timing helper of this folder's scripts: median of n calls after `warm` warm-up calls."""
import time


def median_us(f, n=30, warm=3):
    for _ in range(warm):
        f()
    ts = []
    for _ in range(n):
        s = time.perf_counter()
        f()
        ts.append(time.perf_counter() - s)
    return sorted(ts)[n // 2] * 1e6
