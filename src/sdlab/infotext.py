"""The web UIs' infotext: the generation parameters written into every PNG's
`parameters` text chunk, and the reader that turns it back into fields.

Format (AUTOMATIC1111 `create_infotext`):

    <prompt>
    Negative prompt: <negative prompt>          (only when there is one)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

from PIL import Image, PngImagePlugin

# Keys in the order the web UI writes them; unknown keys follow in insertion order.
KEY_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE",
    "Variation seed", "Variation seed strength", "Seed resize from", "Denoising strength",
    "Conditional mask weight", "Clip skip", "ENSD", "Token merging ratio", "Token merging ratio hr",
    "Init image hash", "RNG", "Tiling",
)
TRAILING_KEYS = ("Version", "User")

_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def quote(value: object) -> str:
    """Quote a value the way the web UI does: JSON string when it holds , : or a newline."""
    text = format_value(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}" if value == round(value, 6) else repr(value)
    return str(value)


def create_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """Build the infotext. Values that are None are dropped, as the web UI does."""
    ordered = [k for k in KEY_ORDER if k in params]
    ordered += [k for k in params if k not in KEY_ORDER and k not in TRAILING_KEYS]
    ordered += [k for k in TRAILING_KEYS if k in params]
    pairs = []
    for k in ordered:
        v = params[k]
        if v is None:
            continue
        pairs.append(k if format_value(v) == k else f"{k}: {quote(v)}")
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def parse_infotext(text: str) -> dict[str, str]:
    """Read an infotext back into a dict of strings: "Prompt", "Negative prompt" and
    every key of the parameters line (values unquoted). `Size` also gives
    "Size-1"/"Size-2" (width, height) as the web UI's reader does."""
    lines = text.strip("\n").split("\n")
    params_line = ""
    if lines and len(_RE_PARAM.findall(lines[-1])) >= 3:
        params_line = lines.pop()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].lstrip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _RE_PARAM.findall(params_line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key.strip()] = value
        if key.strip() == "Size" and (m := _RE_SIZE.match(value)):
            out["Size-1"], out["Size-2"] = m.group(1), m.group(2)
    return out


def png_info(infotext: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    return info


def exif_info(infotext: str) -> Image.Exif:
    """EXIF with the infotext as its UserComment, as the web UI writes JPEG and WebP files
    (piexif's `UserComment.dump(text, encoding="unicode")`); `read_infotext` reads it back."""
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + infotext.encode("utf-16-be")  # Exif IFD, UserComment
    return exif


class InfotextImage(Image.Image):
    """A generated image that keeps its infotext (`info["parameters"]`) when saved: Pillow writes
    a PNG's text chunks only when handed `pnginfo`, so a plain `image.save("out.png")` would drop
    it. PNG gets the `parameters` chunk, JPEG and WebP the EXIF UserComment, unless the call
    gives `pnginfo` / `exif` itself. In every other way an ordinary PIL image; what Pillow makes
    from it (`copy`, `convert`, `resize`, ...) is a plain one, with the same `info`."""

    def save(self, fp, format: str | None = None, **params) -> None:
        text = self.info.get("parameters")
        kind = (format or _format_of(fp) or "").upper()
        if text and kind == "PNG":
            params.setdefault("pnginfo", png_info(text))
        elif text and kind in ("JPEG", "WEBP"):
            params.setdefault("exif", exif_info(text))
        super().save(fp, format, **params)


def with_infotext(image: Image.Image, infotext: str) -> InfotextImage:
    """`image` (a plain PIL image; its pixels are shared, not copied) as an InfotextImage."""
    out = InfotextImage()
    out.__dict__.update(image.__dict__)  # pixels, mode, size: the state Pillow keeps on the instance
    out.info = {**image.info, "parameters": infotext}
    return out


def _format_of(fp) -> str | None:
    """The format Pillow would choose from a file name's extension, as `Image.save` does."""
    name = fp if isinstance(fp, (str, bytes, os.PathLike)) else getattr(fp, "name", None)
    if not isinstance(name, (str, bytes, os.PathLike)):
        return None
    return Image.registered_extensions().get(os.path.splitext(os.fsdecode(name))[1].lower())


def read_infotext(image: Image.Image) -> str | None:
    """The `parameters` text of a PNG (or the EXIF UserComment of a JPEG/WebP)."""
    text = image.info.get("parameters")
    if text is None:
        exif = image.getexif().get_ifd(0x8769).get(0x9286) if hasattr(image, "getexif") else None
        if isinstance(exif, bytes):
            text = exif[8:].decode("utf-16-be" if exif.startswith(b"UNICODE") else "utf-8", errors="ignore")
    return text
