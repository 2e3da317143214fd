"""Fixtures shared by the training tests: a small shapes data set and a tiny SD 1.x checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdlab.training.shapes import make_shapes_dataset
from tests.tiny import save_native, tiny_bundle


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(folder, 8, size=32, seed=1)
    return folder


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    return save_native(tiny_bundle("sd1", seed=0), tmp_path_factory.mktemp("base") / "tiny.safetensors")
