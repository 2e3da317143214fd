"""The shipped demo model: it loads with no arguments and draws what it is asked for.

One image per prompt "a <colour> <shape> on a <colour> background" for 24 prompts
with fixed seeds; the colours are read back from the pixels (`classify_colours`)."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sdlab
from sdlab.training.shapes import COLOURS, SHAPES, caption_for, classify_colours

N_PROMPTS = 24


@pytest.fixture(scope="module")
def demo():
    return sdlab.load(device="cpu")


def test_demo_loads_by_default(demo):
    assert demo.bundle.family.default_size == 64
    assert demo.bundle.source == sdlab.demo_model_path()


def test_demo_draws_the_named_colours(demo):
    rng = np.random.default_rng(2024)
    combos = [c for c in itertools.product(SHAPES, COLOURS, COLOURS) if c[1] != c[2]]
    picks = [combos[i] for i in rng.choice(len(combos), N_PROMPTS, replace=False)]
    fg_ok = bg_ok = 0
    for i, (shape, fg, bg) in enumerate(picks):
        image = demo.txt2img(caption_for(shape, fg, bg), seed=500 + i, steps=12, cfg_scale=5.0)[0]
        got_fg, got_bg = classify_colours(image)
        fg_ok += got_fg == fg
        bg_ok += got_bg == bg
    print(f"demo model: foreground {fg_ok}/{N_PROMPTS}, background {bg_ok}/{N_PROMPTS}")
    assert bg_ok / N_PROMPTS >= 0.90
    assert fg_ok / N_PROMPTS >= 0.75


def test_main_job_command(tmp_path):
    """The README's first command, after the install: the demo model, one PNG, in seconds."""
    r = subprocess.run([sys.executable, "-m", "sdlab", "generate", "a red circle on a blue background",
                        "-o", str(tmp_path / "out.png")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    image = Image.open(tmp_path / "out.png")
    assert image.size == (64, 64) and "Model: demo" in image.info["parameters"]
    assert classify_colours(image) == ("red", "blue")
