"""Outpainting (recipes/outpaint.py): ComfyUI's padded canvas and feathered mask, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdlab.errors import SdlabError
from sdlab.infotext import parse_infotext

from .tiny import save_native, tiny_bundle

PROMPT = "a red circle on a blue background"

def test_outpaint_pad_matches_comfyui_feathered_mask():
    from sdlab.recipes.outpaint import pad_for_outpaint

    img = Image.fromarray(np.full((20, 24, 3), 200, np.uint8))
    canvas, mask = pad_for_outpaint(img, left=8, right=0, top=0, bottom=4, feathering=5, fill="solid")
    assert canvas.size == (32, 24) and mask.size == (32, 24)
    m = np.asarray(mask) / 255.0
    c = np.asarray(canvas)
    assert (c[:20, 8:] == 200).all() and (c[:, :8] == 128).all() and (c[20:] == 128).all()
    assert (m[:, :8] == 1).all() and (m[20:] == 1).all()
    # ComfyUI's rule written out: inside, v**2 of the distance to the nearest padded side (left, bottom)
    for i, j in ((0, 0), (0, 3), (10, 2), (19, 12), (17, 23), (5, 15)):
        d = min(j, 20 - i)
        expect = ((5 - d) / 5) ** 2 if d < 5 else 0.0
        assert abs(m[i, 8 + j] - expect) <= 0.5 / 255, (i, j)
    edge, _ = pad_for_outpaint(Image.fromarray(np.arange(20 * 24 * 3, dtype=np.uint8).reshape(20, 24, 3)), right=8)
    e = np.asarray(edge)
    assert (e[:, 24:] == e[:, 23:24]).all()  # the last column stretched
    with pytest.raises(SdlabError, match="nothing to outpaint"):
        pad_for_outpaint(img.resize((24, 24)))


def test_outpaint_cli_keeps_the_image_and_paints_the_new_area(tmp_path):
    from sdlab.cli import main

    model = save_native(tiny_bundle("sd1"), tmp_path / "tiny.safetensors")
    src = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    src.save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert main(["outpaint", str(tmp_path / "in.png"), PROMPT, "-m", str(model), "--right", "16", "--steps", "2",
                 "--seed", "1", "--feather", "4", "-o", str(out)]) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (32, 48, 3)
    # away from the feathered edge the image comes back unchanged (the mask is 0 there)
    assert (img[:, :24] == np.asarray(src)[:, :24]).all()
    assert parse_infotext(Image.open(out).info["parameters"])["Size"] == "48x32"
