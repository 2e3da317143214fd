"""kohya's `--dataset_config` TOML (`docs/config_README-en.md`), read into sdlab's data options.

The file has three levels, each filling in what the one above leaves out::

    [general]                      # any option, for every subset
    shuffle_caption = true
    caption_extension = ".txt"

    [[datasets]]                   # bucketing and batch size
    resolution = 512
    batch_size = 4

      [[datasets.subsets]]         # one image folder and how its captions are read
      image_dir = "train/hoge"
      num_repeats = 10
      class_tokens = "hoge girl"   # the caption of images without a caption file (DreamBooth)

      [[datasets.subsets]]
      image_dir = "reg/girl"
      class_tokens = "girl"
      is_reg = true                # regularization images (prior preservation)

      [[datasets.subsets]]         # fine-tuning style: captions from kohya's metadata JSON
      image_dir = "train/piyo"     # where the keys that are not paths are looked up
      metadata_file = "piyo_md.json"

sdlab trains on one data set: a file with several `[[datasets]]` is refused (their subsets can
go into one). Captions default to kohya's `.caption` files, as kohya's DreamBooth subsets do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SdlabError

# kohya's dataset-level options and the [data] fields they set (batch_size is the run's).
DATASET_OPTIONS = ("resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                   "bucket_reso_steps", "bucket_no_upscale")
# kohya's subset options that sdlab reads per subset.
SUBSET_OPTIONS = ("caption_extension", "shuffle_caption", "keep_tokens", "keep_tokens_separator",
                  "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix", "flip_aug", "color_aug",
                  "random_crop", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                  "caption_tag_dropout_rate", "caption_separator")
SUBSET_KEYS = ("image_dir", "num_repeats", "class_tokens", "is_reg", "metadata_file")
# Options kohya has that sdlab does not: a clear refusal rather than a silent difference.
UNSUPPORTED = {
    "face_crop_aug_range": "not implemented; leave it out",
    "token_warmup_min": "not implemented; leave it out",
    "token_warmup_step": "not implemented; leave it out",
    "conditioning_data_dir": "ControlNet training is not supported",
}
# Read and ignored: they change nothing sdlab does.
IGNORED = ("cache_info",)
KOHYA_CAPTION_EXTENSION = ".caption"


def dataset_fields(raw: dict[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`[data]` fields, top-level fields) for a kohya dataset config (`raw`, read from `path`):
    `subsets` lists each subset's folder, repeats, class tokens, `is_reg` and caption options;
    the first subset's folder is `folder` (where a latent cache goes by default).

    Raises:
        SdlabError: no subsets, several data sets, unknown or unsupported keys.
    """
    unknown = sorted(set(raw) - {"general", "datasets"})
    if unknown:
        raise SdlabError(f"{path}: unknown table {unknown[0]!r}; kohya's dataset config has [general] and [[datasets]]")
    datasets = raw.get("datasets") or []
    if len(datasets) != 1:
        raise SdlabError(f"{path}: has {len(datasets)} [[datasets]]; sdlab trains on one (put all the "
                         "[[datasets.subsets]] under one [[datasets]])")
    general, dataset = raw.get("general", {}), dict(datasets[0])
    subsets = dataset.pop("subsets", None) or []
    if not subsets:
        raise SdlabError(f"{path}: [[datasets.subsets]] is empty; give each image folder as image_dir")
    for where, table in (("[general]", general), ("[[datasets]]", dataset)):
        _check_keys(path, where, table, DATASET_OPTIONS + SUBSET_OPTIONS)

    data: dict[str, Any] = {}
    top: dict[str, Any] = {}
    merged = {**general, **dataset}  # a data set's own options win over [general]
    for key in DATASET_OPTIONS:
        if key in merged:
            (top if key == "batch_size" else data)[key] = merged[key]

    out = []
    for i, subset in enumerate(subsets):
        where = f"subset {i + 1}"
        _check_keys(path, where, subset, SUBSET_OPTIONS + SUBSET_KEYS)
        if "image_dir" not in subset and "metadata_file" not in subset:
            raise SdlabError(f"{path}: {where} has no image_dir (or metadata_file)")
        if "metadata_file" in subset and (subset.get("is_reg") or "class_tokens" in subset):
            raise SdlabError(f"{path}: {where}: a metadata_file subset has its captions; is_reg and class_tokens "
                             "are for image folders")
        # Relative paths: to the working directory, as kohya reads them.
        folder = Path(subset.get("image_dir") or Path(subset["metadata_file"]).parent)
        options = {"caption_extension": KOHYA_CAPTION_EXTENSION}
        options.update({k: v for k, v in {**merged, **subset}.items() if k in SUBSET_OPTIONS})
        out.append({"folder": str(folder), "num_repeats": int(subset.get("num_repeats", 1)),
                    "class_tokens": str(subset.get("class_tokens", "")), "is_reg": bool(subset.get("is_reg", False)),
                    "metadata_file": subset.get("metadata_file"), "options": options})
    data["subsets"] = out
    data["folder"] = out[0]["folder"]
    return data, top


def _check_keys(path: Path, where: str, table: dict, known: tuple[str, ...]) -> None:
    for key in table:
        if key in UNSUPPORTED:
            raise SdlabError(f"{path}: {where}: {key} is not supported: {UNSUPPORTED[key]}")
        if key not in known and key not in IGNORED:
            raise SdlabError(f"{path}: {where}: unknown option {key!r}; known: {', '.join(sorted(known))}")
