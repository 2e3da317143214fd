"""The X/Y/Z plot (`recipes/xyz.py`, `sdlab grid`): the web UI's value syntax, its axis list,
the labelled grid, and a grid whose every cell is the image `sdlab generate` makes alone."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdlab.cli import build_parser, main
from sdlab.errors import SdlabError
from sdlab.infotext import parse_infotext
from sdlab.recipes import xyz
from sdlab.request import GenerationRequest

from .tiny import save_native, tiny_bundle


def values(label: str, text: str, mode: str = "txt2img") -> list:
    return xyz.parse_values(xyz.find_axis(label, mode), text)


# -- values and axes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("10,20,30", [10, 20, 30]),
    ("1-5", [1, 2, 3, 4, 5]),
    ("1-5 (+2)", [1, 3, 5]),
    ("10-1 (-3)", [10, 7, 4]),  # the end is end+1, as range() in the web UI
    ("1-10 [5]", [1, 3, 5, 7, 10]),  # np.linspace, truncated
    (" 1-3 , 8", [1, 2, 3, 8]),
])
def test_int_values_and_ranges(text, expected):
    assert values("Steps", text) == expected


@pytest.mark.parametrize("text, expected", [
    ("5-9 (+2)", [5.0, 7.0, 9.0]),
    ("0.5-1 (+0.25)", [0.5, 0.75, 1.0]),
    ("0-1 [3]", [0.0, 0.5, 1.0]),
    ("7, 7.5", [7.0, 7.5]),
])
def test_float_values_and_ranges(text, expected):
    assert values("CFG Scale", text) == expected


def test_text_values_are_csv_and_prompt_order_permutes():
    assert values("Prompt S/R", 'cat, "red, round", dog') == ["cat", "red, round", "dog"]
    assert values("Prompt order", "a, b") == [("a", "b"), ("b", "a")]
    assert values("Nothing", "whatever") == [0]


@pytest.mark.parametrize("text, words", [
    ("1-5 (2)", "the step has its sign"),  # the web UI's rule: (2) does not parse
    ("5-1", "gives no values"),
    ("ten", "not a whole number"),
    ("1-5 (+0)", "step of 0"),
    ("", "no values"),
])
def test_bad_values_are_one_clear_line(text, words):
    with pytest.raises(SdlabError) as e:
        values("Steps", text)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_axis_indices_are_the_web_ui_1_10_lists():
    t2i = {i: o.label for i, o in enumerate(xyz.axis_options("txt2img"))}
    i2i = {i: o.label for i, o in enumerate(xyz.axis_options("img2img"))}
    assert (t2i[0], t2i[1], t2i[4], t2i[6], t2i[7], t2i[9], t2i[11], t2i[17], t2i[24], t2i[25], t2i[28], t2i[41]) == (
        "Nothing", "Seed", "Steps", "CFG Scale", "Prompt S/R", "Sampler", "Checkpoint name", "Schedule type",
        "Clip skip", "Denoising", "Hires upscaler", "Size")
    assert len(t2i) == 42 and len(i2i) == 41
    assert (i2i[5], i2i[6], i2i[9], i2i[10]) == ("CFG Scale", "Image CFG Scale", "Sampler", "Checkpoint name")
    assert xyz.find_axis("cfg scale", "txt2img").label == "CFG Scale"  # labels in any case (sdlab's)


@pytest.mark.parametrize("which, words", [
    (13, "'Sigma Churn' axis is not supported"),
    (99, "out of range 0-41"),
    ("Fancy", "unknown axis 'Fancy'"),
    ("Hires steps", "unknown axis"),  # a txt2img axis, asked for on img2img
])
def test_unknown_or_unsupported_axes_are_refused(which, words):
    mode = "img2img" if which == "Hires steps" else "txt2img"
    with pytest.raises(SdlabError) as e:
        xyz.find_axis(which, mode)
    assert words in str(e.value)


def test_plan_fixes_seeds_applies_values_and_runs_the_costliest_axis_outermost():
    base = GenerationRequest(prompt="a cat, on a mat", seed=-1, steps=5)
    x = xyz.AxisSpec(xyz.find_axis("Prompt S/R", "txt2img"), "cat, dog")
    y = xyz.AxisSpec(xyz.find_axis("Checkpoint name", "txt2img"), "a.safetensors, b.safetensors")
    p = xyz.plan(base, x, y, vary_seeds=(True, False, False))
    seeds = {c.request.seed for c in p.cells}
    assert len(seeds) == 2 and min(seeds) + 1 == max(seeds)  # one fixed seed, +ix
    assert [(c.checkpoint, c.request.prompt) for c in p.cells] == [
        ("a.safetensors", "a cat, on a mat"), ("a.safetensors", "a dog, on a mat"),
        ("b.safetensors", "a cat, on a mat"), ("b.safetensors", "a dog, on a mat")]
    assert p.labels(0) == ["cat", "dog"] and p.labels(1) == ["a.safetensors", "b.safetensors"]
    size = xyz.plan(base, xyz.AxisSpec(xyz.find_axis("Size", "txt2img"), "64x32"))
    assert (size.cells[0].request.width, size.cells[0].request.height) == (64, 32)
    assert xyz.plan(base, x, no_fixed_seeds=True).cells[0].request.seed == -1
    with pytest.raises(SdlabError, match="did not find 'bird'"):
        xyz.plan(base, xyz.AxisSpec(x.option, "bird, dog"))
    with pytest.raises(SdlabError, match="unknown sampler 'Eulr'"):
        xyz.plan(base, xyz.AxisSpec(xyz.find_axis("Sampler", "txt2img"), "Euler, Eulr"))


def test_grid_annotations_draw_labels_on_top_and_left():
    cells = [Image.new("RGB", (128, 96), (100, 100, 100)) for _ in range(6)]
    grid = xyz.image_grid(cells, rows=2)
    assert grid.size == (384, 192)
    out = xyz.draw_grid_annotations(grid, 128, 96, ["Steps: 10", "Steps: 20", "Steps: 30"],
                                    ["CFG Scale: 5.0", "CFG Scale: 7.0"], margin=4)
    pad_left = 128 * 3 // 4
    pad_top = out.height - 192 - 4
    assert out.width == 384 + pad_left + 2 * 4 and pad_top > 0
    arr = np.asarray(out)
    assert (arr[:pad_top, pad_left:] < 128).any()  # column labels drawn above
    assert (arr[pad_top:, :pad_left] < 128).any()  # row labels drawn to the left
    assert (arr[pad_top:pad_top + 96, pad_left:pad_left + 128] == 100).all()  # the cell itself, untouched
    # Without Y labels there is no left pad; without any label the grid is unchanged.
    assert xyz.draw_grid_annotations(grid, 128, 96, ["a", "b", "c"], ["", ""]).width == 384
    assert xyz.draw_grid_annotations(grid, 128, 96, ["", "", ""], ["", ""]).size == (384, 192)


def test_grid_infotext_is_the_first_cells_with_the_script_keys():
    text = "a cat\nSteps: 1, Sampler: Euler, CFG scale: 5, Seed: 3, Size: 32x32, Version: sdlab 0"
    out = xyz.add_params(text, {"Script": "X/Y/Z plot", "X Type": "Steps", "X Values": "1,2,3"})
    assert out.endswith('X Type: Steps, X Values: "1,2,3", Version: sdlab 0')
    assert parse_infotext(out)["X Values"] == "1,2,3"


# -- the command line --------------------------------------------------------------------------------

def _run(*args) -> None:
    parsed = build_parser().parse_args(list(args))
    parsed.func(parsed)


def test_cli_grid_cells_equal_sdlab_generate_alone(tmp_path, monkeypatch):
    """A 3x2 grid over steps and CFG: each cell (in the grid and in its own file) is pixel for pixel
    the image `sdlab generate` makes with those settings."""
    import sdlab

    loaded = {}
    real_load = sdlab.load

    def load_once(model, **kwargs):  # one load for the grid and the seven commands: seconds, not a minute
        key = (str(model), repr(sorted(kwargs.items())))
        if key not in loaded:
            loaded[key] = real_load(model, **kwargs)
        return loaded[key]

    monkeypatch.setattr(sdlab, "load", load_once)
    model = tmp_path / "tiny.safetensors"
    save_native(tiny_bundle("sd1", seed=0), model)
    common = ["-m", str(model), "-W", "32", "-H", "32", "--seed", "7", "--device", "cpu"]
    out = tmp_path / "grid.png"
    _run("grid", "a red circle", "--x", "Steps: 1-3", "--y", "CFG scale: 5-9 (+4)", *common, "-o", str(out))
    grid = Image.open(out)
    info = parse_infotext(grid.info["parameters"])
    assert (info["Script"], info["X Type"], info["X Values"], info["Y Type"], info["Y Values"]) == (
        "X/Y/Z plot", "Steps", "1-3", "CFG Scale", "5-9 (+4)")
    assert info["Steps"] == "1" and info["CFG scale"] == "5"  # the first cell's
    pad_left, pad_top = 32 * 3 // 4, grid.height - 2 * 32
    assert grid.width == 3 * 32 + pad_left and pad_top > 0
    cells = sorted((tmp_path / "grid-cells").glob("*.png"))
    assert len(cells) == 6
    arr = np.asarray(grid.convert("RGB"))
    for n, path in enumerate(cells):
        ix, iy = n % 3, n // 3
        alone = tmp_path / f"alone{n}.png"
        _run("generate", "a red circle", "--steps", str(ix + 1), "--cfg", str(5 + 4 * iy), *common, "-o", str(alone))
        want = np.asarray(Image.open(alone).convert("RGB"))
        assert (np.asarray(Image.open(path).convert("RGB")) == want).all(), path
        x0, y0 = pad_left + 32 * ix, pad_top + 32 * iy
        assert (arr[y0:y0 + 32, x0:x0 + 32] == want).all(), (ix, iy)
        assert Image.open(path).info["parameters"] == Image.open(alone).info["parameters"]
    assert len(loaded) == 1


def test_cli_grid_refuses_bad_axes_before_loading_a_model(tmp_path, capsys):
    for axis, words in (("Steps: 1-5 (2)", "the step has its sign"), ("Sigma Churn: 1,2", "not supported"),
                        ("Steps 1,2", "is not 'AXIS: VALUES'"), ("Prompt S/R: dog, cat", "did not find 'dog'")):
        assert main(["grid", "a red circle", "--x", axis, "-m", str(tmp_path / "none.safetensors")]) == 1
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
