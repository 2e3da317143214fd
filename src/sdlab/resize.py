"""How an img2img init image is fitted to the generation size: the web UI's `resize_mode`.

Modes 0-2 are `modules/images.py` `resize_image` (web UI 1.10) on the image (and, with the same
geometry, on the mask); mode 3 is `modules/processing.py`'s "latent upscale": the image is encoded
at its own size and its latent is resized bilinearly to the generation size.

    0 "Just resize"                    stretch to width x height (LANCZOS)
    1 "Crop and resize"                scale to cover, centre, crop the excess
    2 "Resize and fill"                scale to fit, centre, and fill each empty side by stretching
                                       the image's outermost row / column across it
    3 "Just resize (latent upscale)"   the latent of the image at its own size, interpolated
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor

from .errors import SdlabError

__all__ = ["RESIZE_MODES", "LATENT_UPSCALE", "check_resize_mode", "resize_image", "resize_latent"]

# The web UI's names, in its order (the index is the API's resize_mode).
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
LATENT_UPSCALE = 3


def check_resize_mode(mode: int) -> None:
    if mode not in range(len(RESIZE_MODES)):
        raise SdlabError(f"resize mode {mode!r} is not one of 0-3 ("
                         + ", ".join(f"{i} {name}" for i, name in enumerate(RESIZE_MODES)) + ")")


def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` fitted to `width` x `height` by resize mode 0, 1 or 2 (mode 3 resizes the latent,
    `resize_latent`, and leaves the image alone: it is returned as it is). An "L" mask keeps its
    mode; the web UI's upscaler for img2img is its default, none (LANCZOS only)."""
    check_resize_mode(mode)
    if mode == LATENT_UPSCALE:
        return image
    if mode == 0:
        return image.resize((width, height), Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == 1:
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), Image.LANCZOS)
    # The web UI pastes on a new black RGB canvas; a mask stays a mask here.
    out = Image.new("L" if image.mode == "L" else "RGB", (width, height))
    out.paste(resized, (width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == 2:
        if ratio < src_ratio:  # bands above and below: the first / last row stretched over them
            fill = height // 2 - src_h // 2
            if fill > 0:
                out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), (0, 0))
                out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                          (0, fill + src_h))
        elif ratio > src_ratio:  # bands left and right: the first / last column
            fill = width // 2 - src_w // 2
            if fill > 0:
                out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), (0, 0))
                out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                          (fill + src_w, 0))
    return out


def resize_latent(latent: Tensor, shape: tuple[int, int]) -> Tensor:
    """Mode 3: the init image's latent, encoded at the image's own size, resized to the
    generation's latent size `(h, w)` as the web UI does (bilinear, no antialias)."""
    if tuple(latent.shape[-2:]) == tuple(shape):
        return latent
    return torch.nn.functional.interpolate(latent, size=tuple(shape), mode="bilinear")
