"""The shipped demo model: it loads with no arguments and draws what it is asked for.

One image per prompt "a <colour> <shape> on a <colour> background" for 24 prompts with
fixed seeds: every combination held out of the model's training set (`HELD_OUT`, 15) and
9 it saw. The colours are read back from the pixels (`classify_colours`), the shape from
the foreground's geometry (`classify_shape`, reported, not asserted)."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sdlab
from sdlab.training.shapes import COLOURS, HELD_OUT, SHAPES, caption_for, classify_colours, classify_shape

from .conftest import CPU_KINDS
from .tiny import psnr

N_PROMPTS = 24


@pytest.fixture(scope="module")
def demo():
    return sdlab.load(device="cpu")


def test_demo_loads_by_default(demo):
    assert demo.bundle.family.default_size == 64
    assert demo.bundle.source == sdlab.demo_model_path()


def test_demo_draws_the_named_colours(demo):
    rng = np.random.default_rng(2024)
    seen = [c for c in itertools.product(SHAPES, COLOURS, COLOURS) if c[1] != c[2] and c not in HELD_OUT]
    picks = sorted(HELD_OUT) + [seen[i] for i in rng.choice(len(seen), N_PROMPTS - len(HELD_OUT), replace=False)]
    hits = {group: np.zeros(3, dtype=int) for group in ("held out", "seen")}
    for i, (shape, fg, bg) in enumerate(picks):
        image = demo.txt2img(caption_for(shape, fg, bg), seed=500 + i, steps=12, cfg_scale=5.0)[0]
        got_fg, got_bg = classify_colours(image)
        hits["held out" if (shape, fg, bg) in HELD_OUT else "seen"] += [got_fg == fg, got_bg == bg,
                                                                         classify_shape(image) == shape]
    for group, (fg_ok, bg_ok, shape_ok) in hits.items():
        n = len(HELD_OUT) if group == "held out" else N_PROMPTS - len(HELD_OUT)
        print(f"demo model, {group} ({n}): foreground {fg_ok}/{n}, background {bg_ok}/{n}, shape {shape_ok}/{n}")
    fg_ok, bg_ok, _ = sum(hits.values())
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


@pytest.mark.parametrize("cpu_defaults", CPU_KINDS, indirect=True)
def test_default_path_stays_close_to_fp32(cpu_defaults):
    """The default CPU path of each kind of CPU (bf16 UNet and text encoder, convolution weights
    packed, where the CPU has AVX512-BF16/AMX, else fp32 with their matrices stored as fp16; fp32
    VAE, channels-last) against fp32 on the demo model: PSNR >= 30 dB per image."""
    import torch

    from sdlab.device import dtype_name
    from sdlab.models.storage import storage_dtype

    demo = sdlab.load(device="cpu")
    assert (demo.bundle.dtype, storage_dtype(demo.bundle.unet)) == (cpu_defaults.dtype, cpu_defaults.weight_dtype)
    reference = sdlab.load(device="cpu", dtype=torch.float32)
    psnrs = []
    for i, prompt in enumerate(["a red circle on a blue background", "a white star on a green background",
                                "an orange diamond on a purple background", "a black square on a yellow background"]):
        a, b = (p.txt2img(prompt, seed=700 + i, steps=12, cfg_scale=5.0)[0] for p in (reference, demo))
        psnrs.append(psnr(a, b))
    path = f"{dtype_name(demo.bundle.dtype)} compute, {dtype_name(storage_dtype(demo.bundle.unet))} weights"
    print(f"demo model, default path ({path}) vs fp32: PSNR " + ", ".join(f"{p:.1f}" for p in psnrs) + " dB")
    assert min(psnrs) >= 30
