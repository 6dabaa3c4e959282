"""Help where the code is: the version, the docstring of `mechanize`, and the warning for Adam's betas."""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import HANG_LIMIT_S

import mechanic_fast
from mechanic_fast import mechanize


def test_version_is_the_installed_one_and_the_cli_prints_it():
    from importlib.metadata import version

    assert mechanic_fast.__version__ == version("mechanic-fast")
    out = subprocess.run(
        [sys.executable, "-m", "mechanic_fast", "--version"],
        capture_output=True,
        text=True,
        timeout=HANG_LIMIT_S,
    )
    assert out.returncode == 0 and out.stdout.strip() == f"mechanic-fast {mechanic_fast.__version__}"


def test_mechanize_docstring_describes_every_option():
    doc = inspect.getdoc(mechanize)
    for name in inspect.signature(mechanize).parameters:
        assert f"{name}:" in doc or f"{name}," in doc, name
    assert "not the base optimizer's betas" in doc


def test_package_ships_its_type_information():
    from importlib.resources import files

    assert files("mechanic_fast").joinpath("py.typed").is_file()


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9, 0.95), (0.95, 0.98)])
def test_adam_like_betas_warn_and_say_what_mechanics_betas_are(betas):
    with pytest.warns(UserWarning, match=r"Mechanic's betas.*Adam's betas go to the base optimizer"):
        cls = mechanize(torch.optim.AdamW, betas=betas)
    assert cls._mechanic_spec.config.betas == betas  # a warning, not a refusal: the option is kept


@pytest.mark.parametrize("betas", [None, (0.9, 0.99, 0.999), (0.999,), (0.99, 0.9)])
def test_mechanics_own_betas_do_not_warn(betas):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mechanize(torch.optim.AdamW) if betas is None else mechanize(torch.optim.AdamW, betas=betas)
