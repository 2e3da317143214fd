"""kohya's --dataset_config TOML: the three levels cascade as in kohya's `config_util`, each
subset keeps its own caption and augmentation options, regularization subsets are balanced, and
what sdlab does not do is refused by name."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sdlab.errors import SdlabError
from sdlab.training.config import load_config
from sdlab.training.data import CaptionedImageDataset
from sdlab.training.shapes import make_shapes_dataset
from tests.training.test_trainer import trainer


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    out = {}
    for name, count, seed in (("train", 4, 1), ("style", 2, 2), ("reg", 3, 3)):
        out[name] = tmp_path / name
        make_shapes_dataset(out[name], count, size=32, seed=seed)
    for caption in out["reg"].glob("*.txt"):
        caption.unlink()  # regularization images: captioned by class_tokens
    for caption in out["train"].glob("*.txt"):
        caption.write_text("hoge, red, round, small, bright", encoding="utf-8")  # tags to shuffle
    for caption in out["style"].glob("*.txt"):
        caption.rename(caption.with_suffix(".caption"))  # kohya's default caption extension
    return out


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dataset.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _config(tmp_path, folders) -> Path:
    return _write(tmp_path, f"""
        [general]
        shuffle_caption = true
        keep_tokens = 1
        caption_extension = ".txt"

        [[datasets]]
        resolution = 32
        batch_size = 2
        enable_bucket = false

          [[datasets.subsets]]
          image_dir = '{folders["train"]}'
          num_repeats = 3
          flip_aug = true

          [[datasets.subsets]]
          image_dir = '{folders["style"]}'
          caption_extension = ".caption"
          shuffle_caption = false
          caption_prefix = "style of x,"
          color_aug = true

          [[datasets.subsets]]
          image_dir = '{folders["reg"]}'
          class_tokens = "shape"
          is_reg = true
        """)


def test_levels_cascade_into_each_subsets_options(tmp_path, folders):
    cfg = load_config(None, [f"dataset_config={str(_config(tmp_path, folders))!r}", "mode='scratch'",
                             "model.preset='tiny'", f"output_dir={str(tmp_path / 'out')!r}"])
    assert cfg.batch_size == 2 and cfg.data.resolution == 32 and not cfg.data.enable_bucket
    assert [s.folder for s in cfg.data.subsets] == [folders["train"], folders["style"], folders["reg"]]
    ds = CaptionedImageDataset(cfg.data)
    by_folder = {}
    for r, record in enumerate(ds.records):
        by_folder.setdefault(record.path.parent.name, []).append((record, ds.options(r)))
    train, style, reg = by_folder["train"], by_folder["style"], by_folder["reg"]
    assert len(train) == 4 and all(rec.repeats == 3 and not rec.regularization for rec, _ in train)
    assert all(opt.flip_aug and opt.shuffle_caption and opt.keep_tokens == 1 for _, opt in train)
    assert all(not opt.flip_aug and not opt.shuffle_caption and opt.caption_prefix == "style of x," for _, opt in style)
    assert all(opt.color_aug for _, opt in style) and not any(opt.color_aug for _, opt in train + reg)
    assert all(rec.caption and rec.caption != "shape" for rec, _ in style)  # read from the .caption files
    # 3 regularization images balanced against 4 x 3 + 2 training items, captioned by class_tokens.
    assert all(rec.regularization and rec.caption == "shape" for rec, _ in reg)
    assert sum(rec.repeats for rec, _ in reg) == 14 and len(ds) == 28
    # Each subset's caption options act on its own images.
    i = next(i for i in range(len(ds)) if ds.records[ds._record_of_index[i]].path.parent.name == "style")
    assert ds[i]["caption"].startswith("style of x, ")
    shuffled = [ds[i]["caption"].split(", ") for i in range(12)]  # the 12 items of the first subset
    assert all(tags[0] == "hoge" and sorted(tags[1:]) == ["bright", "red", "round", "small"] for tags in shuffled)
    assert len({tuple(tags) for tags in shuffled}) > 1  # shuffled behind the kept first tag


def test_kohyas_default_caption_extension_and_this_configs_own_keys_win(tmp_path, folders):
    path = _write(tmp_path, f"""
        [[datasets]]
        resolution = [32, 32]
        enable_bucket = false
          [[datasets.subsets]]
          image_dir = '{folders["style"]}'
        """)
    cfg = load_config(None, [f"dataset_config={str(path)!r}", "mode='scratch'", "batch_size=3",
                             "data.resolution=64"])
    assert cfg.batch_size == 3 and cfg.data.resolution == 64
    assert cfg.data.subsets[0].options["caption_extension"] == ".caption"
    ds = CaptionedImageDataset(cfg.data)
    assert all(r.caption for r in ds.records)


@pytest.mark.parametrize("text, message", [
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='x'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='y'\n",
     "has 2 \\[\\[datasets\\]\\]"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='{train}'\nface_crop_aug_range=[2.0, 4.0]\n",
     "face_crop_aug_range is not supported"),
    ("[[datasets]]\n[[datasets.subsets]]\nmetadata_file='m.json'\nis_reg=true\n", "has its captions"),
    ("[[datasets]]\nresolutoin=512\n[[datasets.subsets]]\nimage_dir='{train}'\n", "unknown option 'resolutoin'"),
    ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats=2\n", "no image_dir \\(or metadata_file\\)"),
    ("[[datasets]]\nresolution=[512, 770]\n[[datasets.subsets]]\nimage_dir='{train}'\n", "multiple of 8"),
    ("[general]\n[[datasets]]\n", "subsets\\]\\] is empty"),
])
def test_dataset_config_errors(tmp_path, folders, text, message):
    path = _write(tmp_path, text.format(train=folders["train"]))
    with pytest.raises(SdlabError, match=message):
        load_config(None, [f"dataset_config={str(path)!r}", "mode='scratch'"])


def test_fine_tuning_subset_reads_kohyas_metadata_json(tmp_path, folders, caplog):
    """kohya's fine-tuning subsets: image keys are paths, or names without extension in image_dir;
    the caption is "caption, tags" (or the tags alone); keys without an image are skipped with a
    warning naming them."""
    import json

    images = sorted(folders["style"].glob("*.png"))
    metadata = {images[0].stem: {"caption": "a drawing", "tags": "red, round"},
                str(images[1]): {"tags": "blue, square"},
                "nowhere": {"caption": "lost"}}
    (tmp_path / "md.json").write_text(json.dumps(metadata), encoding="utf-8")
    path = _write(tmp_path, f"""
        [[datasets]]
        resolution = 32
        enable_bucket = false
          [[datasets.subsets]]
          image_dir = '{folders["style"]}'
          metadata_file = '{tmp_path / "md.json"}'
          num_repeats = 2
        """)
    cfg = load_config(None, [f"dataset_config={str(path)!r}", "mode='scratch'"])
    ds = CaptionedImageDataset(cfg.data)
    assert {(r.path, r.caption, r.repeats) for r in ds.records} == {
        (images[0], "a drawing, red, round", 2), (images[1], "blue, square", 2)}
    assert "nowhere" in caplog.text


def test_missing_image_dir_is_named(tmp_path, folders):
    path = _write(tmp_path, f"[[datasets]]\n[[datasets.subsets]]\nimage_dir='{tmp_path / 'nowhere'}'\n")
    cfg = load_config(None, [f"dataset_config={str(path)!r}", "mode='scratch'"])
    with pytest.raises(SdlabError, match="nowhere does not exist"):
        CaptionedImageDataset(cfg.data)


def test_train_command_takes_a_dataset_config(tmp_path, folders):
    from sdlab.cli import main

    main(["train", "--dataset-config", str(_config(tmp_path, folders)), "--mode", "scratch", "--steps", "2",
          "--output-dir", str(tmp_path / "out"), "--set", "model.preset='tiny'", "--set", "lr=1e-3"])
    assert (tmp_path / "out" / "model.safetensors").is_file()
    cfg = load_config(None, [f"dataset_config={str(_config(tmp_path, folders))!r}", "mode='scratch'",
                             "model.preset='tiny'", f"output_dir={str(tmp_path / 'out2')!r}", "steps=1"])
    assert trainer(cfg).dataset.regularization_items == 14
