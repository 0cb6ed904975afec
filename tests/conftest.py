"""Test setup. Triton's CPU interpreter must be switched on before any Triton
kernel is imported, so this runs before nasops is imported anywhere."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import nasops  # noqa: E402  (imported after the environment is set)


def skip_discarded_overflow_checks() -> bool:
    """Stop Triton's interpreter computing integer-overflow checks it then throws away.

    With ``sanitize_overflow`` on (the interpreter's default) every int32 add,
    sub and mul of a kernel is also done in int64 and compared with the int32
    range, eagerly, in NumPy, and the result goes to ``device_assert``, which
    returns without looking at it unless the interpreter's ``debug`` option is
    on (it is off, and nothing turns it on). A compiled kernel drops the
    unused checks; the interpreter cannot. Turning them off changes no value
    and no error: measured 2026-12-05, the DARTS network of
    test_spaces.test_eager_and_kernels_agree through the Triton kernels took
    48.5 s instead of 93.7 s (the depthwise kernels' index arithmetic). Returns
    whether the switch was made (False under another Triton whose interpreter
    has no such options, or with ``debug`` on).
    """
    if not nasops.backend.triton_interpreting():
        return False
    try:
        import dataclasses

        from triton.runtime import interpreter
        builder = interpreter.interpreter_builder
        if builder.options.debug or not builder.options.sanitize_overflow:
            return False
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)
    except (ImportError, AttributeError, TypeError):
        return False
    return True


skip_discarded_overflow_checks()


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
