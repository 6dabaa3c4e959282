"""The named mechanized classes of `mechanic_fast.optim`: how one is built from a torch.optim base.

Such a class is what `mechanize(Base)` gives with the default options, with a stable qualified name
(`mechanic_fast.optim.AdamW`), so that config files can name it and pickle finds it. Its constructor takes
the base's arguments and Mechanic's options as keyword arguments prefixed ``mechanic_`` (Mechanic's
``betas`` and ``eps`` would collide with Adam's); given ones are checked as `mechanize` checks them and
kept on the instance.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, Callable, Dict

import torch

from .optimizer import Mechanic, MechanicSpec

PREFIX = "mechanic_"
MODULE = "mechanic_fast.optim"
# LBFGS rescaled breaks its line search; SparseAdam takes sparse gradients (`check_base`)
UNSUPPORTED = (torch.optim.LBFGS, torch.optim.SparseAdam)


def check_base(Base: Any) -> None:
    """Refuse what is not an optimizer class, or one Mechanic cannot wrap."""
    if not (isinstance(Base, type) and issubclass(Base, torch.optim.Optimizer)):
        raise TypeError(f"mechanize expects a torch.optim.Optimizer subclass (or instance), got {Base!r}")
    if issubclass(Base, Mechanic):
        raise TypeError(f"{Base.__name__} is already mechanized")
    if issubclass(Base, UNSUPPORTED):
        raise TypeError(
            f"Mechanic cannot wrap {Base.__name__}: "
            + (
                "its line search and curvature history assume the step it took, which Mechanic rescales"
                if issubclass(Base, torch.optim.LBFGS)
                else "it takes sparse gradients, over which Mechanic's inner products are not implemented"
            )
        )


def nameable(Base: type) -> bool:
    """A torch.optim optimizer Mechanic can wrap: it has a named class."""
    return (
        getattr(torch.optim, Base.__name__, None) is Base
        and issubclass(Base, torch.optim.Optimizer)
        and Base is not torch.optim.Optimizer
        and not issubclass(Base, UNSUPPORTED)
    )


def build(
    Base: type,
    spec: MechanicSpec,
    options: Dict[str, inspect.Parameter],
    hints: Dict[str, Any],
    instance_options: Callable[[type, Dict[str, Any]], Dict[str, Any]],
) -> type:
    """The named class of `Base`: its `spec` (the default options), a constructor whose ``mechanic_*``
    keywords `instance_options` turns into the instance's own spec, its signature (`options`, annotated
    with `hints`) and its help."""

    def __init__(self: Mechanic, params: Any, *args: Any, **kwargs: Any) -> None:
        given = {name[len(PREFIX) :]: kwargs.pop(name) for name in list(kwargs) if name.startswith(PREFIX)}
        unknown = sorted(set(given) - set(options))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown Mechanic option(s) {[PREFIX + n for n in unknown]}; "
                f"its Mechanic options are {[PREFIX + n for n in options]}"
            )
        if given:
            self._mechanic_spec = dataclasses.replace(spec, **instance_options(Base, given))
        Mechanic.__init__(self, params, *args, **kwargs)

    __init__.__signature__ = _signature(Base, options, hints)  # type: ignore[attr-defined]
    doc = (
        f"torch.optim.{Base.__name__} tuned by Mechanic: mechanize(torch.optim.{Base.__name__}).\n\n"
        f"Takes the base's arguments, and Mechanic's options as keyword arguments prefixed {PREFIX!r} "
        f"({', '.join(PREFIX + n for n in options)}; see help(mechanic_fast.mechanize)).\n\n"
        f"torch.optim.{Base.__name__}:\n{inspect.getdoc(Base) or ''}"
    )
    __init__.__doc__ = doc
    return type(
        Base.__name__,
        (Mechanic, Base),
        {
            "_mechanic_spec": spec,
            "__init__": __init__,
            "__module__": MODULE,
            "__qualname__": Base.__name__,
            "__doc__": doc,
        },
    )


def _signature(
    Base: type, options: Dict[str, inspect.Parameter], ours_hints: Dict[str, Any]
) -> inspect.Signature:
    """The base's constructor parameters, then Mechanic's options as keyword-only ``mechanic_*`` ones
    (what `inspect.signature`, `help` and LightningCLI's argument parser read)."""
    base = inspect.signature(Base.__init__)
    hints = _hints(Base.__init__)
    params = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in base.parameters.values()
        if p.kind != p.VAR_KEYWORD
    ]
    ours = [
        inspect.Parameter(
            PREFIX + name,
            inspect.Parameter.KEYWORD_ONLY,
            default=p.default,
            annotation=ours_hints.get(name, Any),
        )
        for name, p in options.items()
    ]
    return base.replace(parameters=params + ours)


def _hints(fn: Any) -> Dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an annotation this Python cannot evaluate: left as written
        return {}
