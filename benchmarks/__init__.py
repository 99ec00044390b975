"""Kernel and end-to-end benchmarks of synq. `python -m benchmarks [--quick]` runs them all."""
