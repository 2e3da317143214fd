"""Training data: a folder of captioned images, bucketed by aspect ratio, as kohya's sd-scripts reads it.

Layouts found in `DataConfig.folder` (and in kohya repeat folders `10_name/` inside it, whose
images count 10 times per epoch and whose name after the number is the fallback caption):

- `name.png` + `name.txt` side by side (the extension is `caption_extension`, e.g. ".caption");
- a `metadata.jsonl` with one `{"file_name": ..., "text": ...}` per line (Hugging Face imagefolder).

Sizes are (height, width) everywhere in this module, as torch and SDXL's size conditioning order
them (kohya writes buckets as (width, height)).

Typical use::

    ds = CaptionedImageDataset(DataConfig(folder, resolution=512))
    sampler = BucketBatchSampler(ds.item_buckets, batch_size=4, seed=0, num_replicas=world, rank=rank)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2)
    for epoch in range(epochs):
        ds.set_epoch(epoch)        # per-item augmentation seed; not seen by persistent_workers
        sampler.set_epoch(epoch)   # batch order
        for batch in loader: ...
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from sdlab.checkpoints.io import atomic_path
from sdlab.errors import SdlabError
from sdlab.images import IMAGE_EXTENSIONS
from sdlab.training.hf_dataset import Row, TableImages, open_image_bytes, table_files

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"
_REPEAT_DIR = re.compile(r"^(\d+)_(.*)$")  # kohya DreamBooth folders: "10_sks dog"
_EXIF_ORIENTATION = 0x0112
_EXIF_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height
# Augmentations that draw new pixels each epoch: their images have no latents to cache.
_PER_EPOCH_PIXELS = ("random_crop", "color_aug")

Size = tuple[int, int]  # (height, width)


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DataConfig:
    """What to read and how to augment it. Field names follow kohya's dataset options."""

    folder: Path
    # One number for a square, or kohya's (width, height) (also "768,512"): bucket areas are at
    # most width * height; without buckets every image is cropped to exactly that size.
    resolution: int | tuple[int, int] = 512
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64  # bucket sides are multiples of this (a multiple of 8, the VAE's factor)
    bucket_no_upscale: bool = False  # never enlarge an image; buckets then follow each image's own size
    random_crop: bool = False  # otherwise center crop to the bucket
    flip_aug: bool = False  # random horizontal flip
    color_aug: bool = False  # kohya's: a third of the images get a small hue shift or gamma change
    caption_extension: str = ".txt"
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_dropout_rate: float = 0.0  # chance of an empty caption, which teaches the unconditional branch of CFG
    caption_dropout_every_n_epochs: int = 0  # kohya's: every caption empty in every n-th epoch (counted from 1)
    caption_tag_dropout_rate: float = 0.0  # chance of leaving out each tag after the kept ones
    shuffle_caption: bool = False  # shuffle the `caption_separator`-separated tags
    keep_tokens: int = 0  # the first N tags stay in front when shuffling
    # If set and present (kohya's "|||"), the tags before it stay fixed in front, and those after a
    # second one at the end.
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    # Joins tags that shuffle and drop out as one, then reads as caption_separator (kohya's, e.g. ";;;").
    secondary_separator: str = ""
    # kohya's: a caption file's lines are alternatives, one picked each time, and `{a|b|c}` picks
    # one of a, b, c (`{{` and `}}` are literal braces); otherwise the first line is the caption.
    enable_wildcard: bool = False
    num_repeats: int = 1  # for images not in an `N_name/` repeat folder
    # DreamBooth's prior preservation (kohya's reg_data_dir / prior_loss_weight): images of the
    # class (repeat folders such as `1_dog/` caption uncaptioned images "dog"), repeated or cut to
    # as many per epoch as the training images, their loss weighted by prior_loss_weight.
    reg_folder: Path | None = None
    prior_loss_weight: float = 1.0
    alpha_mask: bool = False  # items carry the image's alpha channel as `mask`, for masked_loss
    cache_latents: bool = False  # encode each image once and keep its latents in memory (kohya's)
    cache_latents_to_disk: bool = False  # ... and in files, for the next run too
    latent_cache_dir: Path | None = None  # default: `<folder>/.latent_cache` (beside a parquet file)
    seed: int = 0
    # A Hugging Face data set (`folder` a .parquet / .arrow file or a folder of them, `hf_dataset`):
    # the columns of the encoded images and of the captions, and which split of a folder to read.
    image_column: str = "image"
    caption_column: str = "text"
    split: str = "train"
    # kohya's dataset-config subsets (`kohya_dataset.dataset_fields`): image folders, each
    # with its repeats and own caption and augmentation options. Given, they replace `folder`'s
    # images (`folder` stays where a latent cache goes by default).
    subsets: tuple[Subset, ...] = ()

    @property
    def size(self) -> Size:
        """The training resolution as (height, width)."""
        r = self.resolution
        return (r, r) if isinstance(r, int) else (r[1], r[0])

    def __post_init__(self) -> None:
        # Normalise user input once here (frozen, hence object.__setattr__).
        object.__setattr__(self, "folder", Path(self.folder))
        object.__setattr__(self, "subsets", tuple(s if isinstance(s, Subset) else Subset(**s) for s in self.subsets))
        for s in self.subsets:
            self.for_subset(s)  # a bad option fails now
        if self.latent_cache_dir is not None:
            object.__setattr__(self, "latent_cache_dir", Path(self.latent_cache_dir))
        if self.reg_folder is not None:
            object.__setattr__(self, "reg_folder", Path(self.reg_folder))
        ext = self.caption_extension
        object.__setattr__(self, "caption_extension", ext if ext.startswith(".") else f".{ext}")

        object.__setattr__(self, "resolution", _parse_resolution(self.resolution))
        if self.bucket_reso_steps <= 0 or self.bucket_reso_steps % 8:
            raise SdlabError(f"bucket_reso_steps must be a positive multiple of 8, got {self.bucket_reso_steps}")
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SdlabError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.caption_dropout_every_n_epochs < 0:
            raise SdlabError(f"caption_dropout_every_n_epochs must be 0 or more, "
                             f"got {self.caption_dropout_every_n_epochs}")
        if self.keep_tokens < 0:
            raise SdlabError(f"keep_tokens must be 0 or more, got {self.keep_tokens}")
        if self.num_repeats < 1:
            raise SdlabError(f"num_repeats must be 1 or more, got {self.num_repeats}")
        if self.prior_loss_weight < 0:
            raise SdlabError(f"prior_loss_weight must be 0 or more, got {self.prior_loss_weight}")
        if self.seed < 0:
            raise SdlabError(f"seed must be 0 or more, got {self.seed}")
        for name in ("cache_latents", "cache_latents_to_disk"):
            for aug in _PER_EPOCH_PIXELS:
                if getattr(self, name) and getattr(self, aug):
                    raise SdlabError(f"{name} cannot be combined with {aug}: turn one of them off")

    def for_subset(self, subset: Subset) -> DataConfig:
        """The options that apply to `subset`'s images: these, with the subset's own."""
        known = {f.name for f in fields(DataConfig)} - {"folder", "subsets"}
        unknown = sorted(set(subset.options) - known)
        if unknown:
            raise SdlabError(f"subset {subset.folder}: unknown option {unknown[0]!r}")
        return replace(self, folder=subset.folder, subsets=(), **subset.options)


@dataclass(frozen=True)
class Subset:
    """One image folder of a kohya dataset config."""

    folder: Path
    num_repeats: int = 1
    class_tokens: str = ""  # the caption of its images without a caption (kohya's DreamBooth subsets)
    is_reg: bool = False  # regularization images
    # kohya's fine-tuning JSON: {image key: {"caption": ..., "tags": ...}}, a key being an image's
    # path or its name without extension in `folder`; captions come from it, not caption files.
    metadata_file: Path | None = None
    options: dict = field(default_factory=dict)  # DataConfig fields for its images (caption_extension, flip_aug, ...)

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))
        if self.metadata_file is not None:
            object.__setattr__(self, "metadata_file", Path(self.metadata_file))
        if self.num_repeats < 1:
            raise SdlabError(f"subset {self.folder}: num_repeats must be 1 or more, got {self.num_repeats}")


# ----------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class ImageRecord:
    """One image found on disk."""

    path: Path
    caption: str
    repeats: int
    size: Size  # (height, width) after EXIF orientation
    regularization: bool = False  # a class image for prior preservation
    subset: int = 0  # whose options apply: 0 the data config's, i the i-th of its `subsets`
    row: Row | None = None  # a row of a parquet / Arrow data set (then `path` is its file)


def _check_image(path: Path | bytes) -> Size:
    """Size of a readable image (a file, or its encoded bytes); raises on a corrupt or truncated one.

    `verify()` checks PNG chunk CRCs without decoding, but it passes a truncated JPEG,
    so a JPEG without its end-of-image marker is decoded in full to be sure (some valid
    files carry trailing data after the marker, so the marker alone cannot decide).
    """
    def source():
        return open_image_bytes(path) if isinstance(path, bytes) else Image.open(path)

    with source() as im:
        im.verify()  # must come first: it leaves the image unusable, hence the second open below
    with source() as im:
        width, height = im.size
        fmt = im.format
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    if fmt == "JPEG":
        if isinstance(path, bytes):
            tail = path[-2:]
        else:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 2))
                tail = f.read(2)
        if tail != b"\xff\xd9":
            with source() as im:
                im.load()
    if width <= 0 or height <= 0:
        raise OSError("image has no pixels")
    return (width, height) if orientation in _EXIF_TRANSPOSED else (height, width)


def _read_caption(path: Path, all_lines: bool = False) -> str:
    # kohya reads the first line, or with enable_wildcard all of them (alternatives, one per line).
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    return "\n".join(lines) if all_lines else (lines[0] if lines else "")


def _read_metadata(path: Path) -> dict[Path, str]:
    """`file_name` (relative to the metadata file's folder) -> `text`."""
    captions: dict[Path, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[path.parent / row["file_name"]] = str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SdlabError(
                f"{path} line {n} is not a JSON object with 'file_name' and 'text' ({e}): fix or remove that line"
            ) from None
    return captions


def _scan_subset(folder: Path, caption_extension: str, repeats: int, class_tokens: str,
                 all_lines: bool) -> list[ImageRecord]:
    metadata = _read_metadata(folder / METADATA_FILE) if (folder / METADATA_FILE).is_file() else {}
    images = {p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}
    for p in metadata:
        if p.is_file():
            images.add(p)
        else:
            logger.warning("%s lists %s, which does not exist; skipping it", folder / METADATA_FILE, p)

    records, uncaptioned = [], []
    for path in sorted(images):
        try:
            size = _check_image(path)
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad files
            logger.warning("skipping unreadable image %s: %s", path, e)
            continue
        sidecar = path.with_suffix(caption_extension)
        if path in metadata:
            caption = metadata[path]
        elif sidecar.is_file():
            caption = _read_caption(sidecar, all_lines)
        else:
            caption = class_tokens
            if not class_tokens:
                uncaptioned.append(path.name)
        records.append(ImageRecord(path, caption, repeats, size))
    if uncaptioned:
        logger.warning(
            "%d images in %s have no caption (no %s file, not in %s); using an empty caption: %s",
            len(uncaptioned), folder, caption_extension, METADATA_FILE, ", ".join(uncaptioned[:5])
            + (", ..." if len(uncaptioned) > 5 else ""),
        )  # fmt: skip
    return records


def scan_folder(folder: Path, caption_extension: str = ".txt", num_repeats: int = 1,
                all_lines: bool = False) -> list[ImageRecord]:
    """Find the captioned images in `folder` and in its kohya repeat folders (`N_name/`).
    A caption file gives its first line, or with `all_lines` every line (enable_wildcard).

    Unreadable images are skipped with a warning naming each one. Other subfolders are
    ignored, as kohya does, so a `test/` split next to the training images stays out.

    Raises:
        SdlabError: the folder is missing or holds no readable image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SdlabError(f"data folder {folder} does not exist or is not a folder")
    subsets = [(folder, num_repeats, "")]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if m := _REPEAT_DIR.match(sub.name):
            subsets.append((sub, int(m[1]), m[2].strip()))
        else:
            logger.info("ignoring subfolder %s: not a kohya repeat folder (N_name)", sub)
    records = [r for sub, n, tokens in subsets if n > 0
               for r in _scan_subset(sub, caption_extension, n, tokens, all_lines)]
    if not records:
        raise SdlabError(
            f"no readable images in {folder}: expected {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files with "
            f"{caption_extension} captions beside them or a {METADATA_FILE}, there or in repeat folders like 10_name/"
        )
    return records


def scan_table(table: TableImages, num_repeats: int = 1) -> list[ImageRecord]:
    """The rows of a parquet / Arrow data set as records (`hf_dataset`): streamed a batch of rows
    at a time, each image's header read for its size; rows that do not decode are skipped by index
    with a warning.

    Raises:
        SdlabError: no row holds a readable image.
    """
    records, bad = [], []
    for row, caption, data, where in tqdm(table.scan(), desc="scanning rows", unit="row", disable=None, leave=False):
        if data is None:
            bad.append(where)
            continue
        try:
            size = _check_image(data)
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad data
            logger.warning("skipping %s: its image does not decode (%s)", where, e)
            bad.append(where)
            continue
        records.append(ImageRecord(table.files[row.file], caption, num_repeats, size, row=row))
    if bad:
        logger.warning("%d rows skipped (no readable image): %s", len(bad),
                       ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else ""))
    if not records:
        raise SdlabError(f"no readable images in {', '.join(str(f) for f in table.files[:3])} "
                         f"(column {table.image_column!r})")
    return records


def _scan_subsets(config: DataConfig, options: Sequence[DataConfig]) -> list[ImageRecord]:
    """The images of a kohya dataset config's subsets (`options[i]` applies to subset i, from 1),
    its regularization subsets balanced against the rest as kohya does."""
    train: list[ImageRecord] = []
    reg: list[ImageRecord] = []
    for i, subset in enumerate(config.subsets, start=1):
        if subset.metadata_file is not None:
            found = _scan_kohya_metadata(subset)
        elif not subset.folder.is_dir():
            raise SdlabError(f"dataset config: image_dir {subset.folder} does not exist or is not a folder")
        else:
            found = _scan_subset(subset.folder, options[i].caption_extension, subset.num_repeats,
                                 subset.class_tokens, options[i].enable_wildcard)
        (reg if subset.is_reg else train).extend(replace(r, subset=i) for r in found)
    if not train:
        raise SdlabError("dataset config: no readable images in its training subsets (those without is_reg): "
                         + ", ".join(str(s.folder) for s in config.subsets if not s.is_reg))
    return train + (balance_regularization(reg, sum(r.repeats for r in train)) if reg else [])


def _scan_kohya_metadata(subset: Subset) -> list[ImageRecord]:
    """The images of a kohya fine-tuning subset, as kohya's FineTuningDataset finds them: a key
    that is a path, else `<folder>/<key>.<image extension>`. The caption is the entry's "caption",
    its "tags" after ", ", or the tags alone. Missing or unreadable images are skipped with a
    warning; kohya's precomputed buckets ("train_resolution") are not used: sdlab buckets itself."""
    path = subset.metadata_file
    try:
        metadata = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise SdlabError(f"dataset config: metadata_file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise SdlabError(f"dataset config: metadata_file {path} is not valid JSON ({e})") from None
    if not isinstance(metadata, dict):
        raise SdlabError(f"dataset config: metadata_file {path} is not a JSON object of image keys")
    records, missing = [], []
    for key, entry in metadata.items():
        image = Path(key) if Path(key).is_file() else next(
            (p for ext in IMAGE_EXTENSIONS if (p := subset.folder / f"{key}{ext}").is_file()), None)
        if image is None:
            missing.append(key)
            continue
        try:
            size = _check_image(image)
        except Exception as e:  # PIL raises many types for bad files
            logger.warning("skipping unreadable image %s: %s", image, e)
            continue
        entry = entry if isinstance(entry, dict) else {}
        caption, tags = entry.get("caption"), entry.get("tags")
        caption = tags if caption is None else f"{caption}, {tags}" if tags else caption
        records.append(ImageRecord(image, caption or "", subset.num_repeats, size))
    if missing:
        logger.warning("%s: %d image keys match no image (in %s): %s", path, len(missing), subset.folder,
                       ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""))
    return records


def balance_regularization(reg: list[ImageRecord], train_items: int) -> list[ImageRecord]:
    """Regularization images for an epoch of `train_items` training items, as kohya's DreamBooth
    dataset takes them: in order with their own repeats until there are as many, the rest left
    out; if all of them are fewer, one more repeat each in turn until they are as many."""
    out, n = [], 0
    for record in reg:
        if n >= train_items:
            break
        out.append(replace(record, regularization=True))
        n += record.repeats
    i = 0
    while n < train_items:
        out[i] = replace(out[i], repeats=out[i].repeats + 1)
        n, i = n + 1, (i + 1) % len(out)
    return out


# ----------------------------------------------------------------------------- buckets


@dataclass(frozen=True)
class BucketFit:
    """Where one image goes: resize it to `resized`, then crop `bucket` out of it."""

    bucket: Size
    resized: Size  # covers the bucket on both sides, same aspect ratio as the image (up to rounding)


def _cover(size: Size, bucket: Size) -> Size:
    """The image size scaled, aspect kept, to the smallest size that covers `bucket`."""
    (h, w), (bh, bw) = size, bucket
    scale = max(bh / h, bw / w)
    return max(bh, int(h * scale + 0.5)), max(bw, int(w * scale + 0.5))


@dataclass(frozen=True)
class Buckets:
    """A set of bucket sizes and the rule that assigns an image to one of them."""

    resos: tuple[Size, ...]  # sorted (height, width); the candidates unless no_upscale
    max_area: int
    step: int
    no_upscale: bool = False

    def __iter__(self) -> Iterator[Size]:
        return iter(self.resos)

    def __len__(self) -> int:
        return len(self.resos)

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.step

    def fit(self, height: int, width: int) -> BucketFit:
        """The bucket for an image of this size and the size to resize it to before cropping."""
        if self.no_upscale:
            return self._fit_no_upscale(height, width)
        if (height, width) in self.resos:
            return BucketFit((height, width), (height, width))
        # Nearest aspect ratio in log space, so 2:1 and 1:2 are judged alike (kohya compares w/h linearly).
        log_ar = math.log(width / height)
        bucket = min(self.resos, key=lambda r: (abs(math.log(r[1] / r[0]) - log_ar), -r[0] * r[1]))
        return BucketFit(bucket, _cover((height, width), bucket))

    def _fit_no_upscale(self, height: int, width: int) -> BucketFit:
        # kohya's BucketManager.select_bucket for bucket_no_upscale: shrink only if the area is too
        # large, then the bucket is the (possibly shrunk) size rounded down to steps, so it is cropped.
        ar = width / height
        if height * width > self.max_area:
            rw = math.sqrt(self.max_area * ar)
            rh = self.max_area / rw
            bw_r = self._round(rw)  # round the width to steps, or the height: keep whichever distorts less
            ar_w = bw_r / max(self.step, self._round(bw_r / ar))
            bh_r = self._round(rh)
            ar_h = max(self.step, self._round(bh_r * ar)) / max(self.step, bh_r)
            if abs(ar_w - ar) < abs(ar_h - ar):
                resized = (int(bw_r / ar + 0.5), bw_r)
            else:
                resized = (bh_r, int(bh_r * ar + 0.5))
        else:
            resized = (height, width)
        if min(resized) < self.step:
            # Thinner than one step: the one exception to "no upscale", or the bucket would have no side.
            scale = self.step / min(resized)
            resized = (math.ceil(resized[0] * scale), math.ceil(resized[1] * scale))
        bucket = (resized[0] - resized[0] % self.step, resized[1] - resized[1] % self.step)
        return BucketFit(bucket, resized)


def make_buckets(
    resolution: int | tuple[int, int], min_reso: int = 256, max_reso: int = 1024, step: int = 64,
    no_upscale: bool = False,
) -> Buckets:
    """kohya's bucket sizes: sides multiples of `step` in [min_reso, max_reso], area at most
    width * height of `resolution` (one number for a square, or (width, height)).

    For each width the height is the largest step multiple that keeps the area within that,
    and each size is also added transposed, plus the largest square.

    Raises:
        SdlabError: a side of the resolution outside [min_reso, max_reso].
    """
    if step <= 0:
        raise SdlabError(f"bucket step must be positive, got {step}")
    sides = (resolution, resolution) if isinstance(resolution, int) else resolution
    if not min_reso <= min(sides) <= max(sides) <= max_reso:
        raise SdlabError(
            f"resolution {resolution} must lie between min_bucket_reso {min_reso} and max_bucket_reso {max_reso}"
        )
    max_area = sides[0] * sides[1]
    side = int(math.sqrt(max_area) // step) * step
    resos = {(side, side)}
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, (max_area // width) // step * step)
        if height >= min_reso:
            resos.update({(height, width), (width, height)})
    return Buckets(tuple(sorted(resos)), max_area, step, no_upscale)


def _parse_resolution(value) -> int | tuple[int, int]:
    """A square's side, or (width, height) where they differ: from 512, "512", "768,512",
    [768, 512] or (512, 512)."""
    parts = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        sides = [int(p) for p in parts]
        if len(sides) not in (1, 2):
            raise ValueError
    except (TypeError, ValueError):
        raise SdlabError(f"resolution must be one number or width,height (e.g. 512 or 768,512), got {value!r}") from None
    if any(side <= 0 or side % 8 for side in sides):
        raise SdlabError(f"each side of resolution must be a positive multiple of 8, got {value!r}")
    return sides[0] if len(set(sides)) == 1 else (sides[0], sides[1])


@dataclass(frozen=True)
class ColorAug:
    """One image's colour augmentation: a hue shift in degrees, or a gamma (one is None)."""

    hue_degrees: float | None = None
    gamma: float | None = None

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """The (H, W, 3) uint8 image with this change."""
        if self.gamma is not None:
            return np.clip(255.0 * (rgb / 255.0) ** self.gamma + 0.5, 0, 255).astype(np.uint8)
        hsv = np.array(Image.fromarray(rgb).convert("HSV"))  # 8-bit HSV (hue 0..255), as OpenCV's (0..179)
        hsv[..., 0] = (hsv[..., 0].astype(np.float64) + self.hue_degrees * 256 / 360).round().astype(np.int64) % 256
        return np.array(Image.fromarray(hsv, "HSV").convert("RGB"))


def draw_color_aug(rng: np.random.Generator) -> ColorAug | None:
    """kohya's color_aug draw: a third of the images change, half of those by a hue shift of up
    to 16 degrees (8 of OpenCV's 180 hue steps), half by a gamma in [0.95, 1.05]. kohya raises the
    0..255 values themselves to the gamma (255 ** 1.05 clips every value above 195 to white);
    this is the gamma on 0..1 that its comment names (albumentations' RandomGamma((95, 105)))."""
    if rng.random() > 0.33:
        return None
    if rng.random() > 0.5:
        return ColorAug(hue_degrees=float(rng.uniform(-16.0, 16.0)))
    return ColorAug(gamma=float(rng.uniform(0.95, 1.05)))


# ----------------------------------------------------------------------------- captions


def process_caption(caption: str, config: DataConfig, rng: np.random.Generator, epoch: int = 0) -> str:
    """Prefix/suffix, caption dropout, wildcards, then tag shuffling and tag dropout between the
    kept leading (and trailing) tags, then the secondary separator, as kohya's process_caption.
    `epoch` counts from 0 (kohya's from 1)."""
    if config.caption_prefix:
        caption = f"{config.caption_prefix} {caption}"
    if config.caption_suffix:
        caption = f"{caption} {config.caption_suffix}"
    dropped = config.caption_dropout_rate > 0 and rng.random() < config.caption_dropout_rate
    n = config.caption_dropout_every_n_epochs
    if dropped or (n > 0 and (epoch + 1) % n == 0):
        return ""
    caption = _pick_wildcards(caption, rng) if config.enable_wildcard else caption.split("\n")[0]
    if config.shuffle_caption or config.caption_tag_dropout_rate > 0:
        caption = _shuffle_tags(caption, config, rng)
    if config.secondary_separator:
        caption = caption.replace(config.secondary_separator, config.caption_separator)
    return caption


def _pick_wildcards(caption: str, rng: np.random.Generator) -> str:
    """One of the caption's lines, its `{a|b|c}` each replaced by one of their parts."""
    lines = caption.split("\n")
    caption = lines[int(rng.integers(len(lines)))] if len(lines) > 1 else caption
    # `{{` and `}}` stand for literal braces: hidden behind markers the caption does not contain.
    left, right = "\u2985", "\u2986"
    while left in caption or right in caption:
        left, right = left + "\u2985", right + "\u2986"
    caption = caption.replace("{{", left).replace("}}", right)
    caption = re.sub(r"\{([^}]+)\}", lambda m: (parts := m[1].split("|"))[int(rng.integers(len(parts)))], caption)
    return caption.replace(left, "{").replace(right, "}")


def _shuffle_tags(caption: str, config: DataConfig, rng: np.random.Generator) -> str:
    sep, keep = config.caption_separator, config.keep_tokens_separator
    suffix: list[str] = []
    if keep and keep in caption:
        fixed_part, flex_part = caption.split(keep, 1)
        if keep in flex_part:
            flex_part, suffix_part = flex_part.split(keep, 1)
            suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
        fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
        flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
    else:
        tokens = [t.strip() for t in caption.split(sep) if t.strip()]
        fixed, flex = tokens[: config.keep_tokens], tokens[config.keep_tokens :]
    if config.shuffle_caption:
        flex = [flex[i] for i in rng.permutation(len(flex))]
    if config.caption_tag_dropout_rate > 0:
        flex = [tag for tag in flex if rng.random() >= config.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + suffix)  # kohya joins with ", " whatever the separator


# ----------------------------------------------------------------------------- dataset


def _to_rgb(im: Image.Image) -> Image.Image:
    # Transparent pixels often hold black RGB; show them over white as image viewers do.
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


class CaptionedImageDataset(Dataset):
    """Captioned images as training items, each resized and cropped to its aspect-ratio bucket.

    An item is a dict with `pixels` ((3, H, W) float in [-1, 1]) or, when a latent cache entry
    exists (in `latent_memory` or `latent_cache_dir`, see `cache_latents`), `latents`; `caption`
    (str); `loss_weight` (`prior_loss_weight` for a regularization image, else 1); and for SDXL's
    size conditioning `original_size`, `crop_top_left` and `target_size`, all (height, width) /
    (top, left) int pairs. Index `i`
    covers the images with their repeats; its augmentation is a pure function of
    (config.seed, epoch, i).
    """

    def __init__(self, config: DataConfig):
        self.config = config
        # The options of each record's images: the config's own, then each subset's.
        self.subset_configs: tuple[DataConfig, ...] = (config, *(config.for_subset(s) for s in config.subsets))
        self.table: TableImages | None = None
        files = None if config.subsets else table_files(config.folder, config.split)
        if files is not None:  # a Hugging Face data set: parquet / Arrow files
            self.table = TableImages(files, config.image_column, config.caption_column)
            records = scan_table(self.table, config.num_repeats)
        else:
            records = _scan_subsets(config, self.subset_configs) if config.subsets else scan_folder(
                config.folder, config.caption_extension, config.num_repeats, config.enable_wildcard)
        if config.reg_folder is not None:
            reg = scan_folder(config.reg_folder, config.caption_extension, config.num_repeats, config.enable_wildcard)
            records += balance_regularization(reg, sum(r.repeats for r in records))
        self.records: tuple[ImageRecord, ...] = tuple(records)
        if config.enable_bucket:
            self.buckets = make_buckets(
                config.resolution,
                config.min_bucket_reso,
                config.max_bucket_reso,
                config.bucket_reso_steps,
                config.bucket_no_upscale,
            )
        else:
            height, width = config.size
            self.buckets = Buckets(((height, width),), height * width, config.bucket_reso_steps)
        self.fits: tuple[BucketFit, ...] = tuple(self.buckets.fit(*r.size) for r in self.records)
        self._record_of_index: list[int] = [i for i, r in enumerate(self.records) for _ in range(r.repeats)]
        self.latent_memory: dict[str, dict[str, Tensor]] | None = None
        self.latent_cache_dir: Path | None = None
        if config.cache_latents_to_disk:
            folder = config.folder.parent if config.folder.is_file() else config.folder  # a .parquet file
            self.latent_cache_dir = config.latent_cache_dir or folder / ".latent_cache"
        self.epoch = 0
        self._content_hashes: dict[int, str] = {}
        logger.info(
            "%d images (%d with repeats, %d of them regularization) in %s, %d buckets in use",
            len(self.records), len(self), self.regularization_items, config.folder, len(set(f.bucket for f in self.fits)),
        )  # fmt: skip

    @property
    def regularization_items(self) -> int:
        return sum(r.repeats for r in self.records if r.regularization)

    def __len__(self) -> int:
        return len(self._record_of_index)

    @property
    def item_buckets(self) -> list[Size]:
        """The bucket (height, width) of every index, for `BucketBatchSampler`."""
        return [self.fits[r].bucket for r in self._record_of_index]

    def bucket_counts(self) -> dict[Size, int]:
        """Items per bucket (with repeats), e.g. for logging or `ss_bucket_info`."""
        counts: dict[Size, int] = defaultdict(int)
        for bucket in self.item_buckets:
            counts[bucket] += 1
        return dict(sorted(counts.items()))

    def set_epoch(self, epoch: int) -> None:
        """Draw fresh augmentations (flip, crop, colour, caption shuffle and dropout) for this epoch."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        r = self._record_of_index[index]
        record, fit = self.records[r], self.fits[r]
        cfg = self.options(r)
        # Separate streams so that turning one augmentation on does not change the draws of another.
        rng = np.random.default_rng((cfg.seed, self.epoch, index, 0))
        caption = process_caption(record.caption, cfg, rng, self.epoch)
        rng = np.random.default_rng((cfg.seed, self.epoch, index, 1))
        flip = cfg.flip_aug and bool(rng.random() < 0.5)
        (bh, bw), (rh, rw) = fit.bucket, fit.resized
        if cfg.random_crop:
            top, left = int(rng.integers(0, rh - bh + 1)), int(rng.integers(0, rw - bw + 1))
        else:
            top, left = (rh - bh) // 2, (rw - bw) // 2
        colour = draw_color_aug(np.random.default_rng((cfg.seed, self.epoch, index, 2))) if cfg.color_aug else None

        item: dict = {
            "caption": caption,
            "original_size": record.size,
            # SDXL conditions on the crop as seen in the image it is shown: a flipped crop starts
            # from the other side (as diffusers' SDXL training script computes it).
            "crop_top_left": (top, rw - left - bw if flip else left),
            "target_size": fit.bucket,
            "loss_weight": cfg.prior_loss_weight if record.regularization else 1.0,
        }
        latents = self._cached_latents(r, flip)
        img = self._open(r) if latents is None or cfg.alpha_mask else None  # decoded once for both
        if latents is not None:
            item["latents"] = latents
        else:
            item["pixels"] = self._pixels(img, r, top, left, flip, colour)
        if cfg.alpha_mask:
            item["mask"] = self._mask(img, r, top, left, flip)
        return item

    def options(self, r: int) -> DataConfig:
        """The data options that apply to record `r` (its subset's)."""
        return self.subset_configs[self.records[r].subset]

    def _open(self, r: int) -> Image.Image:
        path, row = self.records[r].path, self.records[r].row
        if row is not None:
            path = f"{path} row {self.table.row_number(row)}"
        try:
            with (Image.open(path) if row is None else open_image_bytes(self.table.image(row))) as im:
                im = ImageOps.exif_transpose(im)
                im.load()
                return im
        except Exception as e:  # a file that passed the scan can still fail to decode (or change on disk)
            raise SdlabError(f"cannot read image {path} ({e}): remove or re-save it") from None

    def _place(self, img: Image.Image, r: int, top: int, left: int, flip: bool) -> np.ndarray:
        """Resize to the record's bucket fit, crop at (top, left), flip: the same for pixels and mask."""
        (bh, bw), (rh, rw) = self.fits[r].bucket, self.fits[r].resized
        if img.size != (rw, rh):
            img = img.resize((rw, rh), Image.Resampling.LANCZOS)
        img = img.crop((left, top, left + bw, top + bh))
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.array(img)

    def _load_pixels(self, r: int, top: int, left: int, flip: bool) -> Tensor:
        return self._pixels(self._open(r), r, top, left, flip)

    def _pixels(self, img: Image.Image, r: int, top: int, left: int, flip: bool,
                colour: ColorAug | None = None) -> Tensor:
        pixels = self._place(_to_rgb(img), r, top, left, flip)
        if colour is not None:
            pixels = colour.apply(pixels)
        return torch.from_numpy(pixels).permute(2, 0, 1).float().div(127.5).sub(1.0)  # (3, H, W)

    def _mask(self, img: Image.Image, r: int, top: int, left: int, flip: bool) -> Tensor:
        """(1, H, W) opacity in [0, 1] from the image's alpha channel, placed as the pixels are;
        all ones for an image without one (kohya's alpha_mask)."""
        if not (img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)):
            return torch.ones(1, *self.fits[r].bucket)
        alpha = self._place(img.convert("RGBA").getchannel("A"), r, top, left, flip)
        return torch.from_numpy(alpha).float().div(255.0).unsqueeze(0)

    # --- latent cache

    def _content_hash(self, r: int) -> str:
        if r not in self._content_hashes:
            h = hashlib.blake2b(digest_size=16)
            if (row := self.records[r].row) is not None:
                h.update(self.table.image(row))
            else:
                with open(self.records[r].path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
            self._content_hashes[r] = h.hexdigest()
        return self._content_hashes[r]

    def _cache_key(self, r: int) -> str:
        """The cache entry of record `r`: keyed by file content, bucket, resize, crop and flip storage."""
        (bh, bw), (rh, rw) = self.fits[r].bucket, self.fits[r].resized
        crop = f"{(rh - bh) // 2},{(rw - bw) // 2}"
        key = f"{self._content_hash(r)}|{bh}x{bw}|{rh}x{rw}|{crop}|flip={self.options(r).flip_aug}"
        return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()

    def _cache_path(self, r: int, cache_dir: Path) -> Path:
        return cache_dir / f"{self._cache_key(r)}.safetensors"

    def _cached_latents(self, r: int, flip: bool) -> Tensor | None:
        name = "latents_flipped" if flip else "latents"
        if self.latent_memory is not None and (entry := self.latent_memory.get(self._cache_key(r))) is not None:
            return entry[name]
        if self.latent_cache_dir is not None and (path := self._cache_path(r, self.latent_cache_dir)).is_file():
            return load_file(path)[name]
        return None


def cache_latents(
    dataset: CaptionedImageDataset,
    encode_fn: Callable[[Tensor], Tensor],
    cache_dir: Path | None = None,
    *,
    in_memory: bool = False,
    batch_size: int = 4,
    progress: bool = True,
) -> int:
    """Encode every image not yet in the latent cache and point the dataset at the cache.

    On disk, one `.safetensors` per image and bucket holds `latents` (and `latents_flipped` when
    `flip_aug` is on, as kohya caches both), written atomically; `in_memory` keeps the same
    entries in `dataset.latent_memory` instead (kohya's cache_latents). Whatever `encode_fn` returns
    is stored as is: it takes (B, 3, H, W) pixels in [-1, 1] of one bucket and returns
    (B, C, H/f, W/f); scaling and sampling the VAE's distribution are its choice, and a
    different VAE needs a different `cache_dir`. In multi-process training call it on the
    main process only, then wait for it on the others.

    Args:
        dataset: the dataset; its `latent_cache_dir` is set to the folder used.
        encode_fn: pixels -> latents, run under `torch.no_grad()`.
        cache_dir: where to cache on disk; default the dataset's own (from its config).
        in_memory: keep the latents in memory, not in files (`cache_dir` is not used).
        batch_size: images per `encode_fn` call.
        progress: show a progress bar.

    Returns:
        The number of images encoded (0 when everything was cached already).

    Raises:
        SdlabError: random_crop or color_aug is on (each epoch draws new pixels), or there is no cache folder.
    """
    for aug in _PER_EPOCH_PIXELS:
        if any(getattr(c, aug) for c in dataset.subset_configs):
            raise SdlabError(f"latents cannot be cached with {aug} on (each epoch draws new pixels): "
                             f"turn {aug} off or do not cache")
    if in_memory:
        memory = dataset.latent_memory = dataset.latent_memory or {}
    else:
        cache_dir = Path(cache_dir) if cache_dir is not None else dataset.latent_cache_dir
        if cache_dir is None:
            raise SdlabError("no latent cache folder: pass cache_dir or set cache_latents_to_disk in the data config")
        cache_dir.mkdir(parents=True, exist_ok=True)
        dataset.latent_cache_dir = cache_dir

    todo: dict[Size, list[int]] = defaultdict(list)
    seen: set[str] = set()
    for r in range(len(dataset.records)):
        key = dataset._cache_key(r)
        cached = key in memory if in_memory else dataset._cache_path(r, cache_dir).is_file()
        if key not in seen and not cached:  # identical files in two folders are encoded once
            seen.add(key)
            todo[dataset.fits[r].bucket].append(r)
    total = sum(len(rs) for rs in todo.values())
    if total == 0:
        return 0

    with tqdm(total=total, desc="caching latents", unit="img", disable=not progress) as bar, torch.no_grad():
        for rs in todo.values():
            for start in range(0, len(rs), batch_size):
                chunk = rs[start : start + batch_size]
                fits = [dataset.fits[r] for r in chunk]
                crops = [((f.resized[0] - f.bucket[0]) // 2, (f.resized[1] - f.bucket[1]) // 2) for f in fits]
                pixels = torch.stack([dataset._load_pixels(r, t, l, False) for r, (t, l) in zip(chunk, crops)])
                latents = encode_fn(pixels).detach().cpu()
                flips = [dataset.options(r).flip_aug for r in chunk]
                flipped = encode_fn(pixels.flip(-1)).detach().cpu() if any(flips) else None
                for i, r in enumerate(chunk):
                    tensors = {"latents": latents[i].contiguous()}
                    if flips[i]:
                        tensors["latents_flipped"] = flipped[i].contiguous()
                    if in_memory:
                        memory[dataset._cache_key(r)] = tensors
                        continue
                    with atomic_path(dataset._cache_path(r, cache_dir)) as tmp:
                        save_file(tensors, str(tmp), metadata={"source": str(dataset.records[r].path)})
                bar.update(len(chunk))
    logger.info("cached latents of %d images %s", total, "in memory" if in_memory else f"in {cache_dir}")
    return total


# ----------------------------------------------------------------------------- batching


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices that share a bucket, reshuffled every epoch, split across ranks.

    Each bucket's indices are shuffled and cut into batches (the last one may be short, as
    in kohya), then the batch order is shuffled. All ranks draw the same list from
    (seed, epoch) and rank `k` takes every `num_replicas`-th batch from `k`, so ranks see
    disjoint indices and, like `DistributedSampler`, the same number of batches: the list is
    padded with batches from its start, or with `drop_last` cut to a multiple of `num_replicas`.
    Pass this sampler's shards to the DataLoader as they are; do not let a wrapper shard again.
    """

    def __init__(
        self,
        item_buckets: Sequence[Size],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be 0 or more, got {seed}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.groups: dict[Size, list[int]] = defaultdict(list)
        for i, bucket in enumerate(item_buckets):
            self.groups[tuple(bucket)].append(i)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _num_batches_total(self) -> int:
        return sum(math.ceil(len(g) / self.batch_size) for g in self.groups.values())

    def __len__(self) -> int:
        n = self._num_batches_total()
        return n // self.num_replicas if self.drop_last else math.ceil(n / self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        batches: list[list[int]] = []
        for indices in self.groups.values():
            order = rng.permutation(len(indices)) if self.shuffle else range(len(indices))
            shuffled = [indices[i] for i in order]
            batches += [shuffled[s : s + self.batch_size] for s in range(0, len(shuffled), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        n = len(self) * self.num_replicas
        while len(batches) < n:  # pad (a loop, since there may be fewer batches than ranks)
            batches += batches[: n - len(batches)]
        yield from batches[self.rank : n : self.num_replicas]


def collate(items: list[dict]) -> dict:
    """Stack items of one bucket: `pixels` or `latents` (B, C, H, W), `caption` list[str], and
    `original_size`, `crop_top_left`, `target_size` as (B, 2) int64 tensors, `loss_weight` (B,), and
    with alpha_mask `mask` (B, 1, H, W)."""
    kinds = {"latents" if "latents" in it else "pixels" for it in items}
    if len(kinds) != 1:
        raise ValueError("a batch mixes cached latents and pixels: cache all images or none (cache_latents)")
    kind = kinds.pop()
    shapes = {tuple(it[kind].shape) for it in items}
    if len(shapes) != 1:
        raise ValueError(f"items of different sizes {sorted(shapes)} in one batch: batch with BucketBatchSampler")
    batch: dict = {kind: torch.stack([it[kind] for it in items]), "caption": [it["caption"] for it in items]}
    for key in ("original_size", "crop_top_left", "target_size"):
        batch[key] = torch.tensor([it[key] for it in items], dtype=torch.int64)
    batch["loss_weight"] = torch.tensor([it.get("loss_weight", 1.0) for it in items], dtype=torch.float32)
    if all("mask" in it for it in items):
        batch["mask"] = torch.stack([it["mask"] for it in items])
    return batch
