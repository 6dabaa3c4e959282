"""`MechanicCallback` for the Hugging Face Trainer: adds ``mechanic/scale`` and ``mechanic/effective_lr``
(and per group where the groups' lrs differ) to the Trainer's own logs, at its logging steps.

    trainer = Trainer(..., optimizer_cls_and_kwargs=(mechanic_fast.optim.AdamW, {"lr": 1e-3}))
    MechanicCallback.attach(trainer)

`attach` puts it first among the Trainer's callbacks, so that the reporting integrations after it
(TensorBoard, W&B, ...) see the values; it also adds them to `trainer.state.log_history`. The Trainer's
own ``learning_rate`` stays the scheduler's lr: the effective lr is S times it.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from transformers import TrainerCallback

from .._api import is_mechanized, mechanic_log_values


class MechanicCallback(TrainerCallback):
    """Adds Mechanic's scale and effective lr to the logs (one host read per logging step)."""

    @classmethod
    def attach(cls, trainer: Any) -> MechanicCallback:
        """Add a MechanicCallback to `trainer`, ahead of the callbacks that report its logs."""
        callback = cls()
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_log(
        self,
        args: Any,
        state: Any,
        control: Any,
        logs: Optional[Dict[str, float]] = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or optimizer is None or not is_mechanized(optimizer):
            return
        values = {name: value.item() for name, value in mechanic_log_values(optimizer).items()}
        if isinstance(logs.get("learning_rate"), float):  # the lr of the step just taken, as logged
            values["mechanic/effective_lr"] = values["mechanic/scale"] * logs["learning_rate"]
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
