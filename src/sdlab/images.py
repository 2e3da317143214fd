"""Conversions between PIL images and tensors, masks, and latent previews."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import Tensor

from .errors import SdlabError

# The image files a folder of training images (or a data set beside them) may hold.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Pixels allowed in one decoded image: checked from the header before decoding, so a
# decompression bomb is refused without being expanded.
MAX_IMAGE_PIXELS = 8192 * 8192


def open_image(path_or_file, what: str = "image") -> Image.Image:
    """Open an image fully (not lazily) with a one-line error on failure."""
    name = getattr(path_or_file, "name", path_or_file)
    try:
        img = Image.open(path_or_file)
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise SdlabError(f"{name}: {what} is {img.width}x{img.height}, larger than sdlab accepts "
                             f"({MAX_IMAGE_PIXELS} pixels)")
        img.load()
        return img
    except SdlabError:
        raise
    except FileNotFoundError:
        raise SdlabError(f"{name}: no such {what} file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SdlabError(f"{name}: cannot read the {what} ({str(e).splitlines()[0][:120]})") from None


def to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> (1, 3, H, W) float in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2.0 - 1.0


def to_pil(x: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images (rounded to the nearest 8-bit value)."""
    x = ((x.float() + 1.0) / 2.0).clamp(0, 1)
    arr = (x.permute(0, 2, 3, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def mask_to_tensor(mask: Image.Image) -> Tensor:
    """L-mode mask -> (1, 1, H, W) in [0, 1]; white (1) = repaint."""
    arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None, None]


def blur_mask(mask: Image.Image, radius: float) -> Image.Image:
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def masked_bbox(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The box around the painted region plus padding, grown to the target aspect ratio
    and clipped to the image ("only masked" inpainting, as the web UIs crop)."""
    box = mask.convert("L").point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        raise SdlabError("the mask is empty: paint the area to repaint in white")
    x1, y1, x2, y2 = box
    x1, y1 = max(x1 - padding, 0), max(y1 - padding, 0)
    x2, y2 = min(x2 + padding, mask.width), min(y2 + padding, mask.height)
    # Grow the shorter side so the crop has the aspect ratio of the generation size.
    w, h = x2 - x1, y2 - y1
    ratio = width / height
    if w / h < ratio:
        grow = int(h * ratio) - w
        x1, x2 = x1 - grow // 2, x2 + grow - grow // 2
    else:
        grow = int(w / ratio) - h
        y1, y2 = y1 - grow // 2, y2 + grow - grow // 2
    # Shift back inside the image, then clip.
    if x1 < 0:
        x2, x1 = x2 - x1, 0
    if y1 < 0:
        y2, y1 = y2 - y1, 0
    if x2 > mask.width:
        x1, x2 = max(x1 - (x2 - mask.width), 0), mask.width
    if y2 > mask.height:
        y1, y2 = max(y1 - (y2 - mask.height), 0), mask.height
    return x1, y1, x2, y2


# The web UI's "Approx cheap" preview: a fixed linear map from SD latents to RGB.
_PREVIEW_COEFS = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173],
                               [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]])


def latent_preview(latents: Tensor) -> Image.Image | None:
    """A quick RGB look at the first latent of a batch (no VAE), for progress previews."""
    if latents.shape[1] != _PREVIEW_COEFS.shape[0]:
        return None
    rgb = torch.einsum("chw,cr->rhw", latents[0].float().cpu(), _PREVIEW_COEFS)
    return to_pil(rgb[None].clamp(-1, 1))[0]
