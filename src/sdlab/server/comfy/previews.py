"""ComfyUI's live previews: a JPEG of the sampler's current x0 after each step, sent on the
prompt's websocket as a binary frame, only when the prompt asks for them.

- Asked per prompt with `extra_data.preview_method` (`execution.py` calls
  `set_preview_method(extra_data.get("preview_method"))`): "auto", "latent2rgb" or "taesd";
  "none", "default" or none at all fall back to the server's `--preview-method`, whose default is
  none (`comfy/cli_args.py`). sdlab has no TAESD decoders, so "taesd" falls back to latent2rgb,
  as ComfyUI does when the decoder file is missing (`latent_preview.get_previewer`).
- latent2rgb (`latent_preview.Latent2RGBPreviewer`): the first latent of the batch mapped to RGB
  by the latent format's `latent_rgb_factors` (and bias), then ((v + 1) / 2) clamped, times 255,
  cut to 8 bits. Factors from comfy/latent_formats.py (Comfy-Org/ComfyUI 75399d7): SD15 (SD 1.x,
  2.x), SDXL (base and refiner), SD3 (SD3, SD3.5).
- The frame (`server.py send_image`, `encode_bytes`): big-endian u32 event 1 (PREVIEW_IMAGE),
  u32 image type 1 (JPEG), then the JPEG (quality 95) of the image fitted into 512 x 512
  (`ImageOps.contain`, bilinear; `--preview-size`'s default).
"""

from __future__ import annotations

import io
import struct

import torch
from PIL import Image, ImageOps
from torch import Tensor

from ...families import Family

__all__ = ["PREVIEW_IMAGE", "asks_for_previews", "latent_format", "preview_frame", "preview_image"]

PREVIEW_IMAGE = 1  # protocol.py BinaryEventTypes.PREVIEW_IMAGE
JPEG = 1
MAX_PREVIEW_RESOLUTION = 512
PREVIEW_METHODS = ("auto", "latent2rgb", "taesd")

# (latent_rgb_factors: one (R, G, B) row per latent channel, bias or None)
LATENT_RGB: dict[str, tuple[list[list[float]], list[float] | None]] = {
    "sd15": ([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
              [-0.2120, -0.2616, -0.7177]], None),
    "sdxl": ([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362],
              [-0.3165, -0.2492, -0.2188]], [0.1084, -0.0175, -0.0011]),
    "sd3": ([[-0.0922, -0.0175, 0.0749], [0.0311, 0.0633, 0.0954], [0.1994, 0.0927, 0.0458],
             [0.0856, 0.0339, 0.0902], [0.0587, 0.0272, -0.0496], [-0.0006, 0.1104, 0.0309],
             [0.0978, 0.0306, 0.0427], [-0.0042, 0.1038, 0.1358], [-0.0194, 0.0020, 0.0669],
             [-0.0488, 0.0130, -0.0268], [0.0922, 0.0988, 0.0951], [-0.0278, 0.0524, -0.0542],
             [0.0332, 0.0456, 0.0895], [-0.0069, -0.0030, -0.0810], [-0.0596, -0.0465, -0.0293],
             [-0.1448, -0.1463, -0.1189]], [0.2394, 0.2135, 0.1925]),
}


def asks_for_previews(extra_data: dict) -> bool:
    """Whether a prompt's `extra_data` asks for previews (the server's own default is none)."""
    return extra_data.get("preview_method") in PREVIEW_METHODS


def latent_format(family: Family) -> str:
    """ComfyUI's latent format of a family: its preview factors."""
    if family.is_flow:
        return "sd3"
    return "sdxl" if family.name.startswith("sdxl") else "sd15"


def preview_image(x0: Tensor, family: Family) -> Image.Image | None:
    """latent2rgb of the batch's first latent (None for a latent the factors do not fit)."""
    factors, bias = LATENT_RGB[latent_format(family)]
    if x0.shape[1] != len(factors):
        return None
    weight = torch.tensor(factors, dtype=torch.float32).transpose(0, 1)  # (3, C)
    rgb = torch.nn.functional.linear(x0[0].float().cpu().movedim(0, -1), weight,
                                     None if bias is None else torch.tensor(bias, dtype=torch.float32))
    pixels = ((rgb + 1.0) / 2.0).clamp(0, 1).mul(0xFF).to(torch.uint8)  # truncated, as ComfyUI's
    return Image.fromarray(pixels.numpy())


def preview_frame(image: Image.Image) -> bytes:
    """The websocket frame of a preview image."""
    image = ImageOps.contain(image, (MAX_PREVIEW_RESOLUTION, MAX_PREVIEW_RESOLUTION), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return struct.pack(">I", PREVIEW_IMAGE) + struct.pack(">I", JPEG) + buf.getvalue()
