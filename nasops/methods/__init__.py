"""Search methods (SPEC 4). Every method runs the DARTS bilevel loop and is a
class with the interface of :class:`nasops.methods.darts.Darts`:

- ``Method(model, *, epochs, device, amp, **hyperparameters)``;
- ``step(train_batch, val_batch) -> StepStats`` — one architecture step on the
  validation batch, then one weight step on the training batch;
- ``end_epoch()`` — advances the learning-rate schedule;
- ``lr`` — the weight learning rate of the current epoch;
- ``state_dict()`` / ``load_state_dict()`` — optimizers, schedule, scalers.

A new method (midas, dasvit, hardexit) subclasses ``Darts`` (or implements that
interface) and adds one line to ``METHODS``.
"""
from __future__ import annotations

from nasops.methods.darts import Darts, StepStats

METHODS: dict[str, type] = {
    "darts": Darts,
}


def get(name: str) -> type:
    """The method class called ``name``; ValueError listing the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}; got {name!r}") from None


__all__ = ["METHODS", "Darts", "StepStats", "get"]
