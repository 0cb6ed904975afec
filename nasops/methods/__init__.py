"""Search methods (SPEC 4). Every method runs the DARTS bilevel loop and is a
class with the interface of :class:`nasops.methods.darts.Darts`:

- what the driver asks of a method: its flags (``add_arguments``,
  ``check_args``), the spaces it searches (``spaces``), its network
  (``build_model``), its construction from the flags (``from_args``), the epoch
  hook (``begin_epoch``), the architecture as it stands (``describe``), the end
  of the run (``finish``) and its files (``write_outputs``, ``output_patterns``);
- ``step(train_batch, val_batch) -> StepStats`` — one architecture step on the
  validation batch, then one weight step on the training batch; it never reads a
  device value back (the driver does, once an epoch);
- ``end_epoch()`` — advances the learning-rate schedule;
- ``lr`` — the weight learning rate of the current epoch;
- ``model`` — the network it searches (a method may replace it in ``begin_epoch``);
- ``state_dict()`` / ``load_state_dict()`` — optimizers, schedule, scalers.

A new method subclasses ``Darts``, overrides what it needs and adds one line to
``METHODS``.
"""
from __future__ import annotations

from nasops.methods.darts import Darts, StepStats
from nasops.methods.dasvit import DasVit
from nasops.methods.hardexit import HardExit
from nasops.methods.midas import Midas

METHODS: dict[str, type] = {
    "darts": Darts,
    "dasvit": DasVit,
    "hardexit": HardExit,
    "midas": Midas,
}


def get(name: str) -> type:
    """The method class called ``name``; ValueError listing the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}; got {name!r}") from None


__all__ = ["METHODS", "Darts", "DasVit", "HardExit", "Midas", "StepStats", "get"]
