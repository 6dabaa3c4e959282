"""Mechanized `torch.optim` optimizers as importable classes, for stacks that name an optimizer by its
class path in a config file: torchtune's ``_component_``, LightningCLI's ``--optimizer``, Hydra's
``_target_``, transformers' ``optimizer_cls_and_kwargs``.

    mechanic_fast.optim.AdamW(params, lr=1e-3, weight_decay=0.01, mechanic_s_decay=0.03)

`mechanic_fast.optim.AdamW` is `mechanize(torch.optim.AdamW)` itself: a subclass of both, picklable by
name. Mechanic's options are keyword arguments prefixed ``mechanic_`` (``mechanic_betas`` is Mechanic's,
``betas`` Adam's); an unknown ``mechanic_`` option is refused. One class for every optimizer in
`torch.optim` that Mechanic can wrap (all but LBFGS and SparseAdam).
"""

from __future__ import annotations

from typing import List

import torch

from . import _api, _named

__all__: List[str] = []
for _name in dir(torch.optim):
    _base = getattr(torch.optim, _name)
    if isinstance(_base, type) and _named.nameable(_base):
        globals()[_name] = _api.named_class(_base)
        __all__.append(_name)
