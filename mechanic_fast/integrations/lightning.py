"""`MechanicCallback` for PyTorch Lightning: logs ``mechanic/scale`` and ``mechanic/effective_lr`` (and per
group where the groups' lrs differ) of every mechanized optimizer through the LightningModule's own
`log`, so they reach its loggers at their logging steps (as 0-d tensors: no host sync until then).

    trainer = lightning.pytorch.Trainer(callbacks=[MechanicCallback()])

`LearningRateMonitor` keeps logging the scheduler's lr: the effective lr is S times it.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from .._api import is_mechanized, mechanic_log_values


class MechanicCallback(Callback):
    """Logs Mechanic's scale and effective lr after every training batch (Lightning keeps the step's
    values and writes them at its logging steps)."""

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        optimizers = [opt for opt in trainer.optimizers if is_mechanized(opt)]
        for i, opt in enumerate(optimizers):
            values = mechanic_log_values(opt)
            if len(optimizers) > 1:
                values = {f"{name}/optimizer_{i}": value for name, value in values.items()}
            pl_module.log_dict(values, on_step=True, on_epoch=False)
