"""Training data: discovery, buckets, augmentation, batching, latent cache, and the shapes data set."""

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from sdlab.errors import SdlabError
from sdlab.training.data import (
    BucketBatchSampler,
    CaptionedImageDataset,
    ColorAug,
    DataConfig,
    cache_latents,
    collate,
    draw_color_aug,
    make_buckets,
    process_caption,
    scan_folder,
)
from sdlab.training.shapes import (COLOURS, HELD_OUT, SHAPES, caption_for, classify_colours, classify_shape,
                                  make_shapes_dataset)

SMALL = dict(resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)


def save_image(path: Path, height: int = 32, width: int = 32, seed: int = 0, caption: str | None = None) -> Path:
    """A random RGB image (and a side-car caption if given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return path


def captions_by_name(records) -> dict[str, str]:
    return {r.path.name: r.caption for r in records}


# ----------------------------------------------------------------------------- discovery


def test_sidecar_captions(tmp_path):
    save_image(tmp_path / "a.png", caption="a cat")
    save_image(tmp_path / "b.jpg", seed=1, caption="a dog")
    save_image(tmp_path / "c.webp", seed=2)
    (tmp_path / "c.caption").write_text("a bird\nsecond line is a kohya wildcard alternative\n")
    assert captions_by_name(scan_folder(tmp_path)) == {"a.png": "a cat", "b.jpg": "a dog", "c.webp": ""}
    assert captions_by_name(scan_folder(tmp_path, caption_extension=".caption"))["c.webp"] == "a bird"


def test_metadata_jsonl(tmp_path):
    save_image(tmp_path / "x.png")
    save_image(tmp_path / "y.bmp", 40, 24, seed=1)
    rows = [{"file_name": "x.png", "text": "red square"}, {"file_name": "y.bmp", "text": "blue circle"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = scan_folder(tmp_path)
    assert captions_by_name(records) == {"x.png": "red square", "y.bmp": "blue circle"}
    assert {r.path.name: r.size for r in records}["y.bmp"] == (40, 24)  # (height, width)


def test_repeat_folders(tmp_path):
    save_image(tmp_path / "root.png", caption="root image")
    save_image(tmp_path / "3_sks dog" / "a.png", seed=1, caption="sks dog on grass")
    save_image(tmp_path / "3_sks dog" / "b.png", seed=2)  # no caption: the folder's class tokens
    save_image(tmp_path / "other" / "c.png", seed=3, caption="not a repeat folder")
    records = scan_folder(tmp_path)
    assert {r.path.name: (r.caption, r.repeats) for r in records} == {
        "root.png": ("root image", 1),
        "a.png": ("sks dog on grass", 3),
        "b.png": ("sks dog", 3),
    }
    ds = CaptionedImageDataset(DataConfig(tmp_path, **SMALL))
    assert len(ds) == 1 + 3 + 3
    assert sorted(ds[i]["caption"] for i in range(len(ds))).count("sks dog") == 3


@pytest.mark.parametrize("reg_images, repeats", [(2, [2, 1]), (5, [1, 1, 1]), (1, [3])])
def test_regularization_images_balanced_as_kohya(tmp_path, reg_images, repeats):
    """kohya's DreamBooth balance: as many regularization items per epoch as training items (3):
    in order with their repeats, the rest left out, or one more repeat each in turn. Uncaptioned
    class images take the folder's class ("1_dog" -> "dog"); their loss weight is prior_loss_weight."""
    for i in range(3):
        save_image(tmp_path / "train" / f"{i}.png", seed=i, caption=f"sks dog {i}")
    for i in range(reg_images):
        save_image(tmp_path / "reg" / "1_dog" / f"{i}.png", seed=10 + i)
    ds = CaptionedImageDataset(DataConfig(tmp_path / "train", resolution=32, enable_bucket=False,
                                          reg_folder=tmp_path / "reg", prior_loss_weight=0.25))
    reg = [r for r in ds.records if r.regularization]
    assert [r.repeats for r in reg] == repeats and {r.caption for r in reg} == {"dog"}
    assert len(ds) == 6 and ds.regularization_items == 3
    weights = sorted(ds[i]["loss_weight"] for i in range(len(ds)))
    assert weights == [0.25] * 3 + [1.0] * 3
    assert collate([ds[0], ds[5]])["loss_weight"].tolist() == [1.0, 0.25]


def test_corrupt_images_skipped_with_warning(tmp_path, caplog):
    save_image(tmp_path / "good.png", caption="good")
    (tmp_path / "noise.png").write_bytes(random.Random(0).randbytes(300))
    whole = save_image(tmp_path / "truncated.png", 64, 64, seed=1).read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "cut.jpg")
    jpg = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])  # passes PIL's verify(), fails to decode
    with caplog.at_level(logging.WARNING, logger="sdlab.training.data"):
        records = scan_folder(tmp_path)
    assert [r.path.name for r in records] == ["good.png"]
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for name in ("noise.png", "truncated.png", "cut.jpg"):
        assert name in warned


def test_empty_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(SdlabError) as err:
        CaptionedImageDataset(DataConfig(tmp_path, **SMALL))
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SdlabError, match="does not exist"):
        scan_folder(tmp_path / "missing")


def test_bad_metadata_line_names_the_line(tmp_path):
    save_image(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "ok"}\n{"file_name": "x.png"}\n')
    with pytest.raises(SdlabError, match="line 2"):
        scan_folder(tmp_path)


# ----------------------------------------------------------------------------- buckets


def test_buckets_equal_area_and_step_multiples():
    buckets = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0
        assert 256 <= h <= 1024 and 256 <= w <= 1024
        assert 0.8 * 512**2 <= h * w <= 512**2
        assert (w, h) in buckets.resos
    assert max(w / h for h, w in buckets) == 4.0  # 1024 x 256


@pytest.mark.parametrize("given, resolution, size", [
    (512, 512, (512, 512)), ("512", 512, (512, 512)), ((512, 512), 512, (512, 512)),
    ("768,512", (768, 512), (512, 768)), ((512, 768), (512, 768), (768, 512)),
])
def test_resolution_is_one_side_or_width_and_height(tmp_path, given, resolution, size):
    cfg = DataConfig(tmp_path, resolution=given)
    assert cfg.resolution == resolution and cfg.size == size


@pytest.mark.parametrize("given, message", [
    (30, "multiple of 8"), ("768,500", "multiple of 8"), ("512x768", "width,height"), ((1, 2, 3), "width,height"),
])
def test_bad_resolution_is_an_error(tmp_path, given, message):
    with pytest.raises(SdlabError, match=message):
        DataConfig(tmp_path, resolution=given)


def test_non_square_buckets_as_kohya():
    """kohya's make_bucket_resolutions for (width, height) = (768, 512): areas up to 768 * 512,
    the largest square (576), each size and its transpose."""
    buckets = make_buckets((768, 512))
    assert buckets.max_area == 768 * 512
    assert (576, 576) in buckets and (512, 768) in buckets and (768, 512) in buckets
    assert all(h * w <= 768 * 512 and (w, h) in buckets.resos for h, w in buckets)
    assert (640, 640) not in buckets
    with pytest.raises(SdlabError, match="max_bucket_reso"):
        make_buckets((1280, 512))


def test_non_square_resolution_without_buckets_crops_to_it(tmp_path):
    for i in range(2):
        save_image(tmp_path / f"{i}.png", height=40, width=40 + 40 * i, seed=i, caption="x")
    ds = CaptionedImageDataset(DataConfig(tmp_path, resolution=(48, 32), enable_bucket=False))
    assert all(ds[i]["pixels"].shape == (3, 32, 48) for i in range(len(ds)))


def test_bucket_resolution_out_of_range_is_an_error():
    with pytest.raises(SdlabError, match="min_bucket_reso"):
        make_buckets(128, min_reso=256)


def test_wide_image_keeps_its_aspect(tmp_path):
    # A 2:1 image with a circle in the middle: it must land in a wide bucket and the circle stay round.
    img = Image.new("RGB", (128, 64), "white")
    ImageDraw.Draw(img).ellipse((44, 12, 84, 52), fill="black")  # 40 px across
    img.save(tmp_path / "wide.png")
    ds = CaptionedImageDataset(DataConfig(tmp_path, **SMALL))
    fit = ds.fits[0]
    (bh, bw), (rh, rw) = fit.bucket, fit.resized
    assert bw > bh
    assert rh >= bh and rw >= bw  # covers the bucket, so only cropping, no padding
    assert abs(rw / rh - 2.0) < 1 / rh
    item = ds[0]
    assert item["pixels"].shape == (3, bh, bw)
    assert item["pixels"].min() >= -1 and item["pixels"].max() <= 1
    assert item["original_size"] == (64, 128) and item["target_size"] == (bh, bw)
    assert item["crop_top_left"] == ((rh - bh) // 2, (rw - bw) // 2)
    dark = item["pixels"].mean(0) < 0
    rows, cols = dark.any(1).nonzero(), dark.any(0).nonzero()
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(int(height) - int(width)) <= 1


def test_no_upscale_never_enlarges():
    buckets = make_buckets(64, 32, 128, 16, no_upscale=True)
    fit = buckets.fit(40, 50)
    assert fit.resized == (40, 50) and fit.bucket == (32, 48)
    big = buckets.fit(200, 100)
    assert big.bucket[0] * big.bucket[1] <= 64 * 64 and big.bucket[0] % 16 == 0 and big.bucket[1] % 16 == 0
    assert big.resized[0] >= big.bucket[0] and big.resized[1] >= big.bucket[1]


# ----------------------------------------------------------------------------- augmentation


def aug_dataset(tmp_path: Path, seed: int = 0, **over) -> CaptionedImageDataset:
    if not (tmp_path / "40_tags").exists():
        save_image(tmp_path / "40_tags" / "img.png", 32, 48, caption="trigger, red, square, blue, background")
    cfg = dict(SMALL, flip_aug=True, caption_dropout_rate=0.25, shuffle_caption=True, keep_tokens=1, seed=seed)
    cfg.update(over)
    return CaptionedImageDataset(DataConfig(tmp_path, **cfg))


def test_augmentations_are_deterministic_under_a_seed(tmp_path):
    a, b = aug_dataset(tmp_path), aug_dataset(tmp_path)
    items_a, items_b = [a[i] for i in range(len(a))], [b[i] for i in range(len(b))]
    for x, y in zip(items_a, items_b):
        assert x["caption"] == y["caption"] and x["crop_top_left"] == y["crop_top_left"]
        assert torch.equal(x["pixels"], y["pixels"])

    captions = [it["caption"] for it in items_a]
    assert 2 <= captions.count("") <= 20  # dropout at 0.25 of 40
    kept = [c for c in captions if c]
    assert all(c.split(", ")[0] == "trigger" for c in kept)  # keep_tokens=1
    assert all(sorted(c.split(", ")) == sorted("trigger, red, square, blue, background".split(", ")) for c in kept)
    assert len(set(kept)) > 5  # shuffled

    pixels = [it["pixels"] for it in items_a]
    flipped = [torch.equal(p, pixels[0].flip(-1)) for p in pixels]
    assert 5 <= sum(flipped) <= 35
    assert all(torch.equal(p, pixels[0]) or f for p, f in zip(pixels, flipped))

    a.set_epoch(1)
    assert [a[i]["caption"] for i in range(len(a))] != captions  # a new epoch draws anew
    c = aug_dataset(tmp_path, seed=1)
    assert [c[i]["caption"] for i in range(len(c))] != captions


def test_flip_mirrors_crop_left_for_sdxl(tmp_path):
    # Random crops of a 2:1 image: find each crop in the resized image and check the reported left edge,
    # which for a flipped crop is measured from the other side (what the model sees).
    save_image(tmp_path / "10_x" / "wide.png", 32, 64, caption="x")
    ds = CaptionedImageDataset(DataConfig(tmp_path, **SMALL, random_crop=True, flip_aug=True))
    (bh, bw), (rh, rw) = ds.fits[0].bucket, ds.fits[0].resized
    resized = Image.open(ds.records[0].path).resize((rw, rh), Image.Resampling.LANCZOS)
    full = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float().div(127.5).sub(1.0)
    kinds = set()
    for i in range(len(ds)):
        item = ds[i]
        top, reported = item["crop_top_left"]
        for left in range(rw - bw + 1):
            crop = full[:, top : top + bh, left : left + bw]
            if torch.equal(item["pixels"], crop):
                assert reported == left
                kinds.add("plain")
            elif torch.equal(item["pixels"], crop.flip(-1)):
                assert reported == rw - left - bw
                kinds.add("flipped")
    assert kinds == {"plain", "flipped"}


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: a 32 x 64 (h x w) file shows as 64 x 32
    Image.new("RGB", (64, 32), "red").save(tmp_path / "turned.jpg", exif=exif)
    ds = CaptionedImageDataset(DataConfig(tmp_path, **SMALL))
    assert ds.records[0].size == (64, 32)
    bh, bw = ds.fits[0].bucket
    assert bh > bw and ds[0]["pixels"].shape == (3, bh, bw)


def test_caption_tag_dropout_keeps_the_kept_tags(tmp_path):
    """kohya's caption_tag_dropout_rate: each tag after the `keep_tokens` ones is left out with
    that chance, with or without shuffling; the draws follow the seed."""
    caption = "sks, dog, red collar, grass, sunny, photo"
    every = DataConfig(tmp_path, keep_tokens=2, caption_tag_dropout_rate=1.0)
    assert process_caption(caption, every, np.random.default_rng(0)) == "sks, dog"
    half = DataConfig(tmp_path, keep_tokens=1, caption_tag_dropout_rate=0.5, shuffle_caption=True)
    kept = [process_caption(caption, half, np.random.default_rng(i)).split(", ") for i in range(200)]
    assert all(tags[0] == "sks" and set(tags) <= set(caption.split(", ")) for tags in kept)
    assert 2.0 < np.mean([len(tags) - 1 for tags in kept]) < 3.0  # about half of the other 5
    assert kept[7] == process_caption(caption, half, np.random.default_rng(7)).split(", ")
    assert process_caption(caption, DataConfig(tmp_path), np.random.default_rng(0)) == caption  # off: untouched


def test_wildcard_captions_are_kohyas(tmp_path):
    """enable_wildcard: a caption file's lines are alternatives and `{a|b}` picks one part, `{{` and
    `}}` staying literal braces; without it the first line is the caption, as kohya reads it."""
    save_image(tmp_path / "a.png", caption="a {red|blue} circle\n\nthe {{literal}} {square|star}")
    assert captions_by_name(scan_folder(tmp_path)) == {"a.png": "a {red|blue} circle"}
    assert scan_folder(tmp_path, all_lines=True)[0].caption == "a {red|blue} circle\nthe {{literal}} {square|star}"
    wild = DataConfig(tmp_path, **SMALL, enable_wildcard=True)
    ds = CaptionedImageDataset(wild)
    seen = set()
    for epoch in range(40):
        ds.set_epoch(epoch)
        seen.add(ds[0]["caption"])
    assert seen == {"a red circle", "a blue circle", "the {literal} square", "the {literal} star"}
    plain = CaptionedImageDataset(DataConfig(tmp_path, **SMALL))
    assert plain[0]["caption"] == "a {red|blue} circle"


def test_caption_dropout_every_n_epochs(tmp_path):
    """kohya's caption_dropout_every_n_epochs: every caption is empty in epochs n, 2n, ... (kohya
    counts epochs from 1, sdlab's `set_epoch` from 0), on top of caption_dropout_rate's draws."""
    save_image(tmp_path / "a.png", caption="a red circle")
    ds = CaptionedImageDataset(DataConfig(tmp_path, **SMALL, caption_dropout_every_n_epochs=3))
    captions = []
    for epoch in range(7):
        ds.set_epoch(epoch)
        captions.append(ds[0]["caption"])
    assert captions == ["a red circle", "a red circle", "", "a red circle", "a red circle", "", "a red circle"]


def test_secondary_separator_and_fixed_trailing_tags(tmp_path):
    """kohya's secondary_separator joins tags that move as one when shuffling, then reads as the
    caption separator; a second keep_tokens_separator keeps the tags after it at the end."""
    caption = "sks ||| red hair;;;long hair, smile, dress, hat ||| masterpiece, best quality"
    cfg = DataConfig(tmp_path, shuffle_caption=True, keep_tokens_separator="|||", secondary_separator=";;;")
    outs = {process_caption(caption, cfg, np.random.default_rng(i)) for i in range(30)}
    assert len(outs) > 5
    for out in outs:
        tags = out.split(", ")
        assert tags[0] == "sks" and tags[-2:] == ["masterpiece", "best quality"]
        assert sorted(tags[1:-2]) == ["dress", "hat", "red hair,long hair", "smile"]


def test_alpha_mask_follows_the_crop_and_flip(tmp_path):
    """alpha_mask: items carry the image's alpha channel as `mask` (1, H, W) in [0, 1], resized,
    cropped and flipped with the pixels; an image without alpha masks nothing."""
    rgba = np.zeros((32, 48, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, 24:, 3] = 255  # the right half is opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a")
    save_image(tmp_path / "b.png", 32, 48, caption="b")
    cfg = DataConfig(tmp_path, resolution=32, enable_bucket=False, alpha_mask=True)
    ds = CaptionedImageDataset(cfg)
    items = {ds.records[ds._record_of_index[i]].path.name: ds[i] for i in range(len(ds))}
    mask = items["a.png"]["mask"]
    assert mask.shape == (1, 32, 32) and mask.min() >= 0 and mask.max() <= 1
    # 48 x 32 px center-cropped to 32 x 32 from column 8: the opaque half starts at column 16
    assert mask[0, :, :15].max() < 0.05 and mask[0, :, 17:].min() > 0.95
    assert torch.equal(items["b.png"]["mask"], torch.ones(1, 32, 32))
    flips = set()
    for seed in range(6):  # the mask turns with the pixels
        ds = CaptionedImageDataset(DataConfig(tmp_path, resolution=32, enable_bucket=False, alpha_mask=True,
                                              flip_aug=True, seed=seed))
        item = next(ds[i] for i in range(len(ds)) if ds.records[ds._record_of_index[i]].path.name == "a.png")
        flipped = not torch.equal(item["pixels"], items["a.png"]["pixels"])
        assert torch.equal(item["mask"], mask.flip(-1) if flipped else mask)
        flips.add(flipped)
    assert flips == {True, False}
    batch = collate([items["a.png"], items["b.png"]])
    assert batch["mask"].shape == (2, 1, 32, 32)


def test_caption_prefix_and_suffix(tmp_path):
    save_image(tmp_path / "a.png", caption="a cat")
    ds = CaptionedImageDataset(DataConfig(tmp_path, **SMALL, caption_prefix="photo of", caption_suffix="high quality"))
    assert ds[0]["caption"] == "photo of a cat high quality"


# ----------------------------------------------------------------------------- batching


def test_bucket_batch_sampler_groups_and_splits_ranks():
    buckets = [(32, 32)] * 10 + [(32, 64)] * 7 + [(64, 32)] * 3
    ranks = [BucketBatchSampler(buckets, 4, seed=3, num_replicas=2, rank=k, drop_last=True) for k in range(2)]
    batches = [list(s) for s in ranks]
    assert len(batches[0]) == len(batches[1]) == len(ranks[0]) == len(ranks[1])
    seen = [set(i for b in bs for i in b) for bs in batches]
    assert not seen[0] & seen[1]
    for bs in batches:
        for b in bs:
            assert len({buckets[i] for i in b}) == 1 and 1 <= len(b) <= 4

    # Without drop_last the ranks still get equal counts and together cover every index.
    padded = [BucketBatchSampler(buckets, 4, seed=3, num_replicas=2, rank=k) for k in range(2)]
    lists = [list(s) for s in padded]
    assert len(lists[0]) == len(lists[1]) == len(padded[0])
    assert set(i for bs in lists for b in bs for i in b) == set(range(len(buckets)))

    # Same seed and epoch: same batches; another epoch: another order.
    again = BucketBatchSampler(buckets, 4, seed=3, num_replicas=2, rank=0, drop_last=True)
    assert list(again) == batches[0]
    again.set_epoch(1)
    assert list(again) != batches[0]


def test_more_ranks_than_batches_still_even():
    sampler = [list(BucketBatchSampler([(32, 32)] * 3, 4, num_replicas=4, rank=k)) for k in range(4)]
    assert all(len(s) == 1 for s in sampler)


def test_dataloader_batches_share_a_size(tmp_path):
    for i in range(4):
        save_image(tmp_path / f"sq{i}.png", 32, 32, seed=i, caption=f"square {i}")
        save_image(tmp_path / f"wide{i}.png", 32, 64, seed=10 + i, caption=f"wide {i}")
    ds = CaptionedImageDataset(DataConfig(tmp_path, **SMALL))
    loader = DataLoader(ds, batch_sampler=BucketBatchSampler(ds.item_buckets, 3, seed=0), collate_fn=collate)
    sizes = set()
    for batch in loader:
        b = len(batch["caption"])
        assert batch["pixels"].shape[0] == b and batch["original_size"].shape == (b, 2)
        assert batch["target_size"].dtype == torch.int64
        assert (batch["target_size"] == torch.tensor(batch["pixels"].shape[-2:])).all()
        sizes.add(tuple(batch["pixels"].shape[-2:]))
    assert len(sizes) == 2


# ----------------------------------------------------------------------------- latent cache


class CountingEncoder:
    """A fake VAE: average-pool by 8, counting the images it sees."""

    def __init__(self):
        self.images = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += pixels.shape[0]
        return F.avg_pool2d(pixels, 8)


def test_latent_cache_round_trip(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    for i in range(3):
        save_image(data / f"{i}.png", 32, 48, seed=i, caption=f"image {i}")
    save_image(data / "2_dup" / "copy.png", 32, 48, seed=0, caption="same pixels as 0.png")
    cfg = DataConfig(data, **SMALL, cache_latents_to_disk=True, latent_cache_dir=cache)
    ds = CaptionedImageDataset(cfg)
    expected = {i: ds[i]["pixels"] for i in range(len(ds))}  # nothing cached yet

    enc = CountingEncoder()
    assert cache_latents(ds, enc, progress=False) == 3  # the duplicate's content is encoded once
    assert enc.images == 3 and len(list(cache.glob("*.safetensors"))) == 3
    for i in range(len(ds)):
        item = ds[i]
        assert "pixels" not in item
        torch.testing.assert_close(item["latents"], F.avg_pool2d(expected[i][None], 8)[0])
    bh, bw = ds.fits[0].bucket
    assert collate([ds[0], ds[1]])["latents"].shape == (2, 3, bh // 8, bw // 8)

    fresh = CaptionedImageDataset(cfg)
    assert cache_latents(fresh, enc, progress=False) == 0 and enc.images == 3
    assert "latents" in fresh[0]


def test_latent_cache_in_memory(tmp_path):
    """kohya's cache_latents: the same entries, kept in the dataset instead of in files."""
    for i in range(2):
        save_image(tmp_path / f"{i}.png", 32, 48, seed=i, caption=f"image {i}")
    save_image(tmp_path / "2_dup" / "copy.png", 32, 48, seed=0, caption="same pixels as 0.png")
    ds = CaptionedImageDataset(DataConfig(tmp_path, **SMALL, cache_latents=True))
    expected = [ds[i]["pixels"] for i in range(len(ds))]
    enc = CountingEncoder()
    assert cache_latents(ds, enc, in_memory=True, progress=False) == 2 and enc.images == 2
    assert len(ds.latent_memory) == 2 and ds.latent_cache_dir is None and not (tmp_path / ".latent_cache").exists()
    for i in range(len(ds)):
        torch.testing.assert_close(ds[i]["latents"], F.avg_pool2d(expected[i][None], 8)[0])
    assert cache_latents(ds, enc, in_memory=True, progress=False) == 0 and enc.images == 2


def test_latent_cache_with_flip_stores_both(tmp_path):
    save_image(tmp_path / "8_a" / "a.png", 32, 32, caption="a")
    ds = CaptionedImageDataset(DataConfig(tmp_path, **SMALL, flip_aug=True))
    enc = CountingEncoder()
    assert cache_latents(ds, enc, tmp_path / "cache", progress=False) == 1 and enc.images == 2
    latents = [ds[i]["latents"] for i in range(len(ds))]
    assert any(torch.allclose(x, latents[0].flip(-1)) for x in latents[1:])
    assert not torch.allclose(latents[0], latents[0].flip(-1))


@pytest.mark.parametrize("aug", ["random_crop", "color_aug"])
def test_latent_cache_refuses_augmentations_that_change_pixels(tmp_path, aug):
    save_image(tmp_path / "a.png", caption="a")
    for option in ("cache_latents", "cache_latents_to_disk"):
        with pytest.raises(SdlabError, match=f"{option} cannot be combined with {aug}"):
            DataConfig(tmp_path, **{option: True, aug: True})
    ds = CaptionedImageDataset(DataConfig(tmp_path, **SMALL, **{aug: True}))
    with pytest.raises(SdlabError, match=aug):
        cache_latents(ds, CountingEncoder(), tmp_path / "cache", progress=False)


def test_color_aug_draws_as_kohya():
    """A third of the images change; of those half by hue (up to 16 degrees), half by gamma."""
    draws = [draw_color_aug(np.random.default_rng((0, i))) for i in range(3000)]
    hue = [d.hue_degrees for d in draws if d is not None and d.hue_degrees is not None]
    gamma = [d.gamma for d in draws if d is not None and d.gamma is not None]
    assert 0.30 < (len(hue) + len(gamma)) / len(draws) < 0.36 and 0.4 < len(hue) / (len(hue) + len(gamma)) < 0.6
    assert max(map(abs, hue)) <= 16 and max(hue) > 15 and min(hue) < -15
    assert 0.95 <= min(gamma) < 0.951 and 1.049 < max(gamma) <= 1.05


def test_color_aug_changes_hue_or_gamma_only():
    import colorsys

    rgb = np.array([[[200, 40, 40], [128, 128, 128]], [[0, 0, 0], [255, 255, 255]]], dtype=np.uint8)
    shifted = ColorAug(hue_degrees=12.0).apply(rgb)
    h0, s0, v0 = colorsys.rgb_to_hsv(*(rgb[0, 0] / 255))
    h1, s1, v1 = colorsys.rgb_to_hsv(*(shifted[0, 0] / 255))
    assert abs((h1 - h0) * 360 - 12) < 2.5 and abs(s1 - s0) < 0.02 and abs(v1 - v0) < 0.01
    assert np.array_equal(shifted[1:], rgb[1:]) and np.array_equal(shifted[0, 1], rgb[0, 1])  # greys keep
    darker = ColorAug(gamma=1.05).apply(rgb)
    assert darker[0, 1, 0] == round(255 * (128 / 255) ** 1.05) and np.array_equal(darker[1], rgb[1])


def test_color_aug_in_the_dataset(tmp_path):
    """On: some items' pixels change (the same ones each time for a seed and epoch), flips and
    crops are drawn as without it; off: no change."""
    for i in range(24):
        save_image(tmp_path / f"{i}.png", seed=i, caption="x")
    plain = CaptionedImageDataset(DataConfig(tmp_path, resolution=32, enable_bucket=False, flip_aug=True))
    aug = CaptionedImageDataset(DataConfig(tmp_path, resolution=32, enable_bucket=False, flip_aug=True, color_aug=True))
    changed = [i for i in range(24) if not torch.equal(plain[i]["pixels"], aug[i]["pixels"])]
    assert 2 <= len(changed) <= 16
    again = [i for i in range(24) if not torch.equal(plain[i]["pixels"], aug[i]["pixels"])]
    assert again == changed
    for i in range(24):  # the change is small: colours, not geometry
        assert (plain[i]["pixels"] - aug[i]["pixels"]).abs().mean() < 0.25


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("layout", ["kohya", "jsonl"])
def test_make_shapes_dataset_is_discoverable(tmp_path, layout):
    paths = make_shapes_dataset(tmp_path, 12, size=32, seed=5, layout=layout)
    assert len(paths) == 12 and all(p.is_file() for p in paths)
    assert len(list(tmp_path.glob("*.txt"))) == (12 if layout == "kohya" else 0)
    records = scan_folder(tmp_path)
    assert len(records) == 12
    for r in records:
        words = r.caption.split()
        assert r.caption == " ".join([words[0], words[1], words[2], "on", words[4], words[5], "background"])
        for article, colour in ((words[0], words[1]), (words[4], words[5])):
            assert article == ("an" if colour == "orange" else "a")
        assert words[1] in COLOURS and words[5] in COLOURS and words[1] != words[5] and words[2] in SHAPES
    assert not list(tmp_path.glob("*.tmp"))


def test_shapes_are_deterministic(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", 5, size=32, seed=1)
    b = make_shapes_dataset(tmp_path / "b", 8, size=32, seed=1)  # a prefix of the same sequence
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b[:5]]


def test_classify_colours_reads_the_caption(tmp_path):
    paths = make_shapes_dataset(tmp_path, 200, size=64, seed=0)
    hits = 0
    for p in paths:
        words = p.with_suffix(".txt").read_text().split()
        hits += classify_colours(Image.open(p)) == (words[1], words[5])
    assert hits >= 0.95 * len(paths)
    assert {w for p in paths for w in p.with_suffix(".txt").read_text().split()} >= set(SHAPES) | set(COLOURS)


def test_classify_shape_reads_the_caption(tmp_path):
    paths = make_shapes_dataset(tmp_path, 200, size=64, seed=0)
    hits = sum(classify_shape(Image.open(p)) == p.with_suffix(".txt").read_text().split()[2] for p in paths)
    assert hits >= 0.95 * len(paths)


def test_hold_out_leaves_the_held_out_captions_out(tmp_path):
    plain = make_shapes_dataset(tmp_path / "plain", 300, size=32, seed=0)
    held = make_shapes_dataset(tmp_path / "held", 300, size=32, seed=0, hold_out=True)
    held_captions = {caption_for(*c) for c in HELD_OUT}
    captions = [p.with_suffix(".txt").read_text().strip() for p in held]
    assert not held_captions & set(captions)
    # Only the images that drew a held-out combination change.
    plain_captions = [p.with_suffix(".txt").read_text().strip() for p in plain]
    changed = [a != b for a, b in zip(plain_captions, captions)]
    assert any(changed)
    assert all(c in held_captions for c, ch in zip(plain_captions, changed) if ch)
    # Every shape and colour still appears on both sides.
    words = [c.split() for c in captions]
    assert {w[2] for w in words} == set(SHAPES)
    assert {w[1] for w in words} == set(COLOURS) == {w[5] for w in words}
