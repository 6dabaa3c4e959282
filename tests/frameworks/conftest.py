"""The frameworks' tests leave the process environment as they found it."""

from __future__ import annotations

import os
from unittest import mock

import pytest


@pytest.fixture(autouse=True)
def _framework_environment():
    """The frameworks set process environment variables of their own (Lightning:
    PYTORCH_NVML_BASED_CUDA_CHECK); they end with the test."""
    with mock.patch.dict(os.environ):
        yield
