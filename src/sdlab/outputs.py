"""Saving generated images the way the web UI saves them (A1111 `modules/images.py`, default
settings): `<outputs>/txt2img-images/YYYY-MM-DD/NNNNN-SEED.png`, NNNNN one more than the largest
number any file in that day's folder starts with, and the infotext in the PNG's `parameters`
text chunk. Each file is written under a temporary name and renamed, so a folder watcher
never sees half an image."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from PIL import Image

from .checkpoints.io import atomic_write
from .infotext import png_info

# The web UI's folders under its outputs folder (options outdir_txt2img_samples, outdir_img2img_samples).
SAMPLES_FOLDERS = {"txt2img": "txt2img-images", "img2img": "img2img-images"}


def samples_folder(outputs: Path, mode: str, day: datetime.date | None = None) -> Path:
    """Where the images of a `mode` ("txt2img"; "img2img" and "inpaint" share the web UI's
    img2img folder) made on `day` (default today) go."""
    kind = "txt2img" if mode == "txt2img" else "img2img"
    return Path(outputs) / SAMPLES_FOLDERS[kind] / (day or datetime.date.today()).isoformat()


def next_sequence_number(folder: Path) -> int:
    """The web UI's `get_next_sequence_number`: one more than the largest number that a file
    name in `folder` starts with (before its first '-'), 0 for an empty or missing folder."""
    largest = -1
    if folder.is_dir():
        for name in os.listdir(folder):
            head = os.path.splitext(name)[0].split("-")[0]
            if head.isdigit():
                largest = max(largest, int(head))
    return largest + 1


def save_image(image: Image.Image, folder: Path, seed: int, infotext: str | None) -> Path:
    """Write `image` as `folder/NNNNN-SEED.png` with `infotext` in its `parameters` chunk;
    returns the path. One writer per folder at a time (the server's worker thread)."""
    folder.mkdir(parents=True, exist_ok=True)
    number = next_sequence_number(folder)
    while (path := folder / f"{number:05}-{seed}.png").exists():  # the web UI steps past a taken name too
        number += 1
    pnginfo = png_info(infotext) if infotext else None
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=pnginfo))
    return path
