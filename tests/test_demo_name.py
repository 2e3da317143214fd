"""`demo`, the name the infotext and the server give the built-in demo model, names it wherever
a model is named; a file, folder or models-folder checkpoint of that name comes first."""

from __future__ import annotations

import pytest
from PIL import Image

import sdlab
from sdlab.cli import build_parser, main
from sdlab.errors import SdlabError
from sdlab.generate_cli import _resolve_model
from sdlab.infotext import parse_infotext

from .tiny import save_native, tiny_bundle


def test_load_demo():
    pipe = sdlab.load("demo", device="cpu")
    assert pipe.bundle.source == sdlab.demo_model_path() and pipe.bundle.name == "demo"


def test_info_demo(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["info", "demo"]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line.startswith("file"))
    assert rows["file"].strip() == str(sdlab.demo_model_path())


def test_generate_with_model_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["generate", "a red circle on a blue background", "-m", "demo", "--steps", "1",
                                      "--device", "cpu", "-o", "out.png"])
    args.func(args)
    assert parse_infotext(Image.open(tmp_path / "out.png").info["parameters"])["Model"] == "demo"


def test_a_file_named_demo_comes_first(capsys, tmp_path, monkeypatch):
    """The user's own `demo` is opened, not the built-in model (this one is no model: the error
    names it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_bytes(b"not a model")
    assert main(["info", "demo"]) == 1
    assert "demo: unknown file type" in capsys.readouterr().err
    with pytest.raises(SdlabError, match="unknown file type"):
        sdlab.load("demo", device="cpu")


def test_a_checkpoint_named_demo_in_the_models_folder_comes_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    args = build_parser().parse_args(["generate", "x", "--models-dir", str(tmp_path / "models")])
    assert _resolve_model(args, "demo") == "demo"  # nothing there: the built-in model, by its name
    mine = save_native(tiny_bundle("sd1"), folder / "demo.safetensors")
    assert _resolve_model(args, "demo") == str(mine.resolve())
