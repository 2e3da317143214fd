"""ComfyUI's image and latent resizing (`comfy.utils.common_upscale`): the upscale methods by
name, "center" crop to the target's aspect first, and 0 for one side keeping the aspect."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = ["scale_bchw"]


def _resize(x: Tensor, method: str, size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) resized by one of ComfyUI's upscale methods (bislerp: bicubic; lanczos: PIL's, on 8-bit pixels)."""
    if method == "nearest-exact":
        return F.interpolate(x, size=size, mode="nearest-exact")
    if method == "area":
        return F.interpolate(x, size=size, mode="area")
    if method == "bilinear":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if method == "lanczos":
        return torch.stack([_pil_resize(i, size) for i in x])
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


def _pil_resize(img: Tensor, size: tuple[int, int]) -> Tensor:
    arr = np.clip(255.0 * img.permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8)
    out = Image.fromarray(arr).resize((size[1], size[0]), Image.LANCZOS)
    return torch.from_numpy(np.asarray(out, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _center_crop(x: Tensor, width: int, height: int) -> Tensor:
    old_w, old_h = x.shape[-1], x.shape[-2]
    old_aspect, new_aspect = old_w / old_h, width / height
    x0 = y0 = 0
    if old_aspect > new_aspect:
        x0 = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y0 = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return x[..., y0:old_h - y0, x0:old_w - x0]


def scale_bchw(x: Tensor, method: str, width: int, height: int, crop: str) -> Tensor:
    """(B, C, H, W) to width x height (0: from the other side and the aspect) by a ComfyUI method."""
    if width == 0 and height == 0:
        return x
    if width == 0:
        width = max(1, round(x.shape[-1] * height / x.shape[-2]))
    elif height == 0:
        height = max(1, round(x.shape[-2] * width / x.shape[-1]))
    if crop == "center":
        x = _center_crop(x, width, height)
    return _resize(x, method, (height, width))
