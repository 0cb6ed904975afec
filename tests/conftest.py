"""Test setup. Triton's CPU interpreter must be switched on before any Triton
kernel is imported, so this runs before nasops is imported anywhere."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import nasops  # noqa: E402,F401  (imported after the environment is set)
