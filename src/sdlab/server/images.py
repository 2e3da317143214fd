"""Images as the API carries them: base64 in (size-checked before decoding), PNG with infotext out."""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image, UnidentifiedImageError

from ..errors import SdlabError
from ..infotext import png_info
from .errors import BadInput, TooLarge
from .settings import Limits

__all__ = ["decode_image", "encode_png"]

_DATA_URL = re.compile(r"^data:[\w/+.-]+;base64,", re.I)


# -- images ---------------------------------------------------------------------------

def decode_image(data: str, what: str, limits: Limits) -> Image.Image:
    """A base64 image from a client, refused before decoding if it claims too many pixels."""
    text = _DATA_URL.sub("", data.strip(), count=1)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{what}: not valid base64") from None
    if not raw:
        raise BadInput(f"{what}: empty image")
    try:
        img = Image.open(io.BytesIO(raw))
        if img.width * img.height > limits.max_image_pixels:
            raise TooLarge(f"{what}: {img.width}x{img.height} is more pixels than this server accepts "
                           f"({limits.max_image_pixels})")
        img.load()
    except SdlabError:
        raise
    except Image.DecompressionBombError:
        raise TooLarge(f"{what}: its header claims far more pixels than this server accepts "
                       f"({limits.max_image_pixels}); refused as a decompression bomb") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        reason = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise BadInput(f"{what}: not a readable image ({reason})") from None
    return img


def encode_png(img: Image.Image, infotext: str | None) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=png_info(infotext) if infotext else None)
    return base64.b64encode(buf.getvalue()).decode("ascii")
