"""`sdlab serve --model demo`: the built-in demo model, listed beside the folder's checkpoints and
switched to by its name, unless the folder has a checkpoint of that name."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from sdlab import demo_model_path  # noqa: E402
from sdlab.cli import build_parser  # noqa: E402
from sdlab.server.catalog import NotFound  # noqa: E402
from sdlab.server.cli import settings_from_args  # noqa: E402
from sdlab.server.state import ServerState  # noqa: E402
from tests.tiny import save_native, tiny_bundle  # noqa: E402


def _state(models, *argv: str) -> ServerState:
    return ServerState(settings_from_args(build_parser().parse_args(["serve", "--models-dir", str(models), *argv])))


@pytest.fixture
def models(tmp_path):
    folder = tmp_path / "Stable-diffusion"
    folder.mkdir()
    save_native(tiny_bundle("sd1"), folder / "tiny.safetensors")
    return tmp_path


def test_serve_model_demo(models, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    state = _state(models, "--model", "demo")
    demo = demo_model_path().resolve()
    assert state.selected.path == demo and state.selected.model_name == "demo"
    assert {e.model_name for e in state.catalog.checkpoints()} == {"demo", "tiny"}
    assert state.catalog.find_checkpoint("demo").path == demo  # what a client switching back sends
    assert state.catalog.find_checkpoint("tiny").path == (models / "Stable-diffusion" / "tiny.safetensors").resolve()


def test_the_folders_demo_comes_first(models, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    mine = save_native(tiny_bundle("sd1"), models / "Stable-diffusion" / "demo.safetensors").resolve()
    state = _state(models, "--model", "demo")
    assert state.selected.path == mine and all(e.path != demo_model_path().resolve() for e in state.catalog.checkpoints())


def test_an_unknown_model_is_refused(models):
    with pytest.raises(NotFound, match="nowhere"):
        _state(models, "--model", "nowhere")
