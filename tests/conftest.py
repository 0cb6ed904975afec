"""Test setup. Triton's CPU interpreter must be switched on before any Triton
kernel is imported, so this runs before nasops is imported anywhere."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import nasops  # noqa: E402,F401  (imported after the environment is set)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): its networks run hundreds of tiny
    ops, and on a busy 2-core machine a thread pool costs 20-100x more in
    synchronisation than it gains (the driver's runs on the digits take
    --threads 1 for the same reason)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
