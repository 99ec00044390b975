"""Test-session set-up. Without a CUDA GPU the Triton kernels run on CPU tensors under the
Triton interpreter, which must be switched on before any kernel is defined, i.e. before
synq_kernels is imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.manual_seed(0)


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches emptied before and after the test: guards and recompile
    counts of earlier models (dynamo's recompile limit is per code object)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def one_thread():
    """torch on one thread for the test (small tensors: threads cost more than they give,
    and the CI machine is shared); a test may raise it, the setting is restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
