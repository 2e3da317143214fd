"""Saved prompt styles (the web UI's styles.csv), from Python and the command line; `--tiling` too."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sdlab.errors import SdlabError
from sdlab.pipeline import GenerationRequest, Pipeline
from sdlab.styles import PromptStyle, apply_styles, merge_prompts, read_styles
from tests.tiny import save_native, tiny_bundle

STYLES = ('name,prompt,negative_prompt\n'
          'film,"a photo of {prompt}, film grain",blurry\n'
          'sharp, sharp focus,\n'
          '# old, x, y\n'
          ',nameless,\n')


def test_read_styles_as_the_web_ui_reads_them(tmp_path):
    """utf-8 with or without a BOM (Excel writes one), spaces after commas skipped, comment rows and
    rows without a name left out, the old name,text layout read too; no file: no styles."""
    path = tmp_path / "styles.csv"
    path.write_bytes(b"\xef\xbb\xbf" + STYLES.encode())
    assert read_styles(path) == {"film": PromptStyle("film", "a photo of {prompt}, film grain", "blurry"),
                                 "sharp": PromptStyle("sharp", "sharp focus", "")}
    path.write_text("name,text\nold,watercolor\n")
    assert read_styles(path) == {"old": PromptStyle("old", "watercolor", "")}
    assert read_styles(tmp_path / "none.csv") == {}
    path.write_text("title,prompt\nx,y\n")
    with pytest.raises(SdlabError, match="no 'name' column"):
        read_styles(path)


def test_merge_prompts():
    assert merge_prompts("a photo of {prompt}, film grain", "a cat") == "a photo of a cat, film grain"
    assert merge_prompts("sharp focus", " a cat ") == "a cat, sharp focus"
    assert merge_prompts("sharp focus", "") == "sharp focus"
    assert merge_prompts("", "a cat") == "a cat"


def test_apply_styles_in_order_and_refuses_a_missing_name(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(STYLES)
    req = GenerationRequest(prompt="a cat", negative_prompt="ugly", styles=["film", "sharp"])
    styled = apply_styles(req, path)
    assert (styled.prompt, styled.negative_prompt) == ("a photo of a cat, film grain, sharp focus", "ugly, blurry")
    assert styled.styles == ["film", "sharp"] and req.prompt == "a cat"
    assert apply_styles(GenerationRequest(prompt="a cat", styles=["sharp", "film"]), path).prompt == \
        "a photo of a cat, sharp focus, film grain"
    assert apply_styles(GenerationRequest(prompt="a cat"), tmp_path / "missing.csv").prompt == "a cat"
    with pytest.raises(SdlabError, match=r"no style named 'nope' in .*styles.csv \(styles there: 'film', 'sharp'\)"):
        apply_styles(GenerationRequest(prompt="a cat", styles=["film", "nope"]), path)


def test_pipeline_applies_styles_from_the_models_folder(tmp_path):
    """The one generation path merges the styles: the image and infotext equal those of the
    prompts written out, and the infotext records the styled prompts, as the web UI's does."""
    from sdlab.models_dir import ModelsDir

    (tmp_path / "styles.csv").write_text(STYLES)
    pipe = Pipeline(tiny_bundle("sd1"), models=ModelsDir(tmp_path))
    assert pipe.styles_file == tmp_path / "styles.csv"
    params = {"width": 32, "height": 32, "steps": 2, "seed": 4}
    styled = pipe.generate(GenerationRequest(prompt="a cat", negative_prompt="ugly", styles=["film"], **params))
    written = pipe.generate(GenerationRequest(prompt="a photo of a cat, film grain", negative_prompt="ugly, blurry",
                                              **params))
    assert styled.images[0].tobytes() == written.images[0].tobytes() and styled.infotexts == written.infotexts
    assert styled.infotexts[0].startswith("a photo of a cat, film grain\nNegative prompt: ugly, blurry\n")


def test_cli_style_and_tiling_flags(tmp_path, monkeypatch, capsys):
    """`sdlab generate --style NAME --styles-file FILE --tiling`: the same request fields as the
    server's; the PNG's infotext has the styled prompt and "Tiling: True", and --from reads it back."""
    import sdlab.device
    from sdlab.cli import main

    monkeypatch.setattr(sdlab.device, "configure_threads", lambda: None)  # leave this process's threads
    model = save_native(tiny_bundle("sd1"), tmp_path / "tiny.safetensors")
    styles = tmp_path / "my-styles.csv"
    styles.write_text(STYLES)
    common = ["-m", str(model), "-W", "32", "-H", "32", "--steps", "2", "--seed", "3", "--dtype", "fp32"]
    assert main(["generate", "a cat", "--style", "film", "--style", "sharp", "--styles-file", str(styles),
                 "--tiling", *common, "-o", str(tmp_path / "a.png")]) == 0
    text = Image.open(tmp_path / "a.png").info["parameters"]
    assert text.startswith("a photo of a cat, film grain, sharp focus\nNegative prompt: blurry\n")
    assert ", Tiling: True, " in text
    assert main(["generate", "--from", str(tmp_path / "a.png"), *common, "-o", str(tmp_path / "b.png")]) == 0
    again = Image.open(tmp_path / "b.png")
    assert again.info["parameters"] == text and again.tobytes() == Image.open(tmp_path / "a.png").tobytes()
    assert main(["generate", "a cat", "--style", "nope", "--styles-file", str(styles), *common, "-o",
                 str(tmp_path / "c.png")]) == 1
    assert "no style named 'nope'" in capsys.readouterr().err
    assert not Path(tmp_path / "c.png").exists()
