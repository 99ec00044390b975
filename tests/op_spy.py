"""A dispatch mode that records the name of every op that runs under it (for the tests that
check which path an eager call of a synq op takes: its body directly, or the custom op)."""
from torch.utils._python_dispatch import TorchDispatchMode


class OpSpy(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
