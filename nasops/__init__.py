"""nasops: fused kernels for differentiable architecture search.

Public API:
- ``nasops.ops``: the fused ops (``mixed_op`` and friends), autograd-ready;
- ``nasops.backends()``, ``nasops.set_backend()``: which kernels run (SPEC 2.4);
- ``python -m nasops.search``: the search driver.
"""
from nasops.backend import backends, get_backend, set_backend
from nasops import ops

__all__ = ["backends", "get_backend", "set_backend", "ops"]
__version__ = "0.1.0"
