"""Outpainting: extend the canvas and inpaint the new area, as a recipe over the ordinary inpaint
request (no sampling of its own).

The canvas and mask are ComfyUI's `ImagePadForOutpaint` (`nodes.py`): the image at (left, top)
on a larger canvas, the mask 1 over the padded area and, inside the image, `v**2` with
`v = (feathering - d) / feathering` where `d` is the distance to the nearest padded edge (sides
not padded do not count), so the model blends into the old pixels. Feathering applies only while
`2 * feathering` is under the image's height and width, as there. ComfyUI fills the new area with
grey; `fill` also offers the edge pixels stretched outward and seeded noise, which give the model
colours to continue from (the web UI's scripts use the original's edges or matched noise).

The canvas is grown on the right and bottom to a multiple of 8 (the model's size multiple) when
the padding does not land on one; those pixels are padding like the rest.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

from ..errors import SdlabError
from ..request import GenerationRequest, GenerationResult

if TYPE_CHECKING:
    from ..pipeline import Pipeline

__all__ = ["FILLS", "outpaint", "outpaint_request", "pad_for_outpaint"]

Fill = Literal["edge", "noise", "solid"]
FILLS = ("edge", "noise", "solid")


def pad_for_outpaint(image: Image.Image, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0,
                     feathering: int = 40, fill: Fill = "edge", color: tuple[int, int, int] = (128, 128, 128),
                     seed: int = 0, multiple: int = 8) -> tuple[Image.Image, Image.Image]:
    """The padded RGB canvas and its "L" mask (white = paint) for outpainting `image`.

    Args:
        left, top, right, bottom: pixels added on each side (>= 0, at least one above 0).
        feathering: how far into the image, from each padded side, the mask fades out.
        fill: what the new area starts as: "edge" (the border pixels stretched outward), "noise"
            (uniform noise from `seed`) or "solid" (`color`, ComfyUI's 0.5 grey by default).
        multiple: the canvas is grown on the right and bottom to a multiple of this.
    """
    if min(left, top, right, bottom) < 0:
        raise SdlabError(f"outpaint padding must not be negative, got left {left}, top {top}, right {right}, "
                         f"bottom {bottom}")
    if fill not in FILLS:
        raise SdlabError(f"unknown outpaint fill {fill!r}; choose one of: {', '.join(FILLS)}")
    if feathering < 0:
        raise SdlabError(f"feathering must not be negative, got {feathering}")
    src = np.asarray(image.convert("RGB"))
    h, w = src.shape[:2]
    right += -(w + left + right) % multiple
    bottom += -(h + top + bottom) % multiple
    if left + top + right + bottom == 0:
        raise SdlabError("nothing to outpaint: give padding on at least one side (e.g. --right 128)")
    pad = ((top, bottom), (left, right), (0, 0))
    if fill == "edge":
        canvas = np.pad(src, pad, mode="edge")
    else:
        if fill == "noise":
            rng = np.random.default_rng(seed)
            canvas = rng.integers(0, 256, (h + top + bottom, w + left + right, 3), dtype=np.uint8)
        else:
            canvas = np.empty((h + top + bottom, w + left + right, 3), np.uint8)
            canvas[:] = np.asarray(color, np.uint8)
        canvas[top:top + h, left:left + w] = src
    mask = np.ones(canvas.shape[:2], np.float64)
    inner = np.zeros((h, w), np.float64)
    if feathering > 0 and feathering * 2 < h and feathering * 2 < w:
        i = np.arange(h)[:, None]
        j = np.arange(w)[None, :]
        far_h, far_w = np.full((h, 1), h), np.full((1, w), w)
        d = np.minimum.reduce(np.broadcast_arrays(i if top else far_h, h - i if bottom else far_h,
                                                  j if left else far_w, w - j if right else far_w))
        v = (feathering - d) / feathering
        inner = np.where(d < feathering, v * v, 0.0)
    mask[top:top + h, left:left + w] = inner
    return Image.fromarray(canvas), Image.fromarray(np.round(mask * 255).astype(np.uint8), "L")


def outpaint_request(req: GenerationRequest, image: Image.Image, left: int = 0, top: int = 0, right: int = 0,
                     bottom: int = 0, feathering: int = 40, fill: Fill = "edge") -> GenerationRequest:
    """`req` made the inpaint request that outpaints `image`: the padded canvas and mask, at the
    canvas's size. The noise fill is seeded with the request's seed (when it has one)."""
    seed = req.seed if req.seed is not None and req.seed >= 0 else 0
    canvas, mask = pad_for_outpaint(image, left, top, right, bottom, feathering, fill, seed=seed)
    return replace(req, init_image=canvas, mask=mask, width=canvas.width, height=canvas.height,
                   inpaint_full_res=False)


def outpaint(pipe: Pipeline, image: Image.Image, prompt: str = "", *, left: int = 0, top: int = 0, right: int = 0,
             bottom: int = 0, feathering: int = 40, fill: Fill = "edge", **params) -> GenerationResult:
    """Outpaint `image` with `pipe`: the canvas grown by the padding, the new area painted.

    `params` are GenerationRequest fields (steps, seed, sampler, ...); the denoising strength
    defaults to 1 and the mask blur to 0 (the feathered mask is soft already).
    """
    params.setdefault("denoising_strength", 1.0)
    params.setdefault("mask_blur", 0)
    req = outpaint_request(GenerationRequest(prompt=prompt, **params), image, left, top, right, bottom, feathering,
                           fill)
    return pipe.generate(req)
