"""Data sets as Hugging Face publishes them: parquet files (the Pokémon-captions schema: an `image`
struct of PNG bytes and a `text` column) and `save_to_disk` Arrow folders, read lazily."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.errors import SdlabError
from sdlab.training.data import CaptionedImageDataset, DataConfig
from sdlab.training.shapes import make_shapes_dataset

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402


def _png(size: tuple[int, int], seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _pokemon_like(path: Path, n: int = 7, bad: int | None = 3) -> list[bytes]:
    """The schema of the Pokémon captions set as the Hub serves it: `image` the datasets Image
    struct, `text` the caption; two row groups; images of two shapes; row `bad` corrupt."""
    images = [_png((32, 32) if i % 2 else (64, 16), i) for i in range(n)]
    stored = list(images)
    if bad is not None:
        stored[bad] = b"\x89PNG\r\n\x1a\nnot really"
    table = pa.table({"image": [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(stored)],
                      "text": [f"a pokemon number {i}" for i in range(n)]})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=4)
    return images


def _decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_pokemon_schema_parquet_reads_lazily_with_buckets(tmp_path, caplog):
    path = tmp_path / "pokemon" / "data" / "train-00000-of-00001.parquet"
    images = _pokemon_like(path)
    # a folder of the Hub's layout, and the file itself, read the same
    with caplog.at_level(logging.WARNING):
        ds = CaptionedImageDataset(DataConfig(tmp_path / "pokemon", resolution=32, min_bucket_reso=16,
                                              max_bucket_reso=64, bucket_reso_steps=16))
    assert "row 3" in caplog.text  # the corrupt row, named by its index
    assert [r.caption for r in ds.records] == [f"a pokemon number {i}" for i in (0, 1, 2, 4, 5, 6)]
    assert [(r.row.group, r.row.row) for r in ds.records] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert {r.size for r in ds.records} == {(16, 64), (32, 32)}  # (height, width): two buckets
    assert len(ds.bucket_counts()) == 2
    item = ds[4]  # row 5: a 32x32 image at 32x32, so the pixels are the PNG's own
    assert item["caption"] == "a pokemon number 5"
    expected = torch.from_numpy(np.array(_decoded(images[5]))).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(item["pixels"], expected, rtol=0, atol=0)
    same = CaptionedImageDataset(DataConfig(path, resolution=32, min_bucket_reso=16, max_bucket_reso=64,
                                            bucket_reso_steps=16))
    assert torch.equal(same[0]["pixels"], ds[0]["pixels"])
    # DataLoader workers get a pickled copy: files and kept row groups are opened again there
    import pickle

    assert torch.equal(pickle.loads(pickle.dumps(ds))[4]["pixels"], ds[4]["pixels"])


def test_columns_binary_and_paths_and_clear_errors(tmp_path):
    a, b = _png((32, 32), 0), _png((32, 32), 1)
    (tmp_path / "b.png").write_bytes(b)
    path = tmp_path / "set.parquet"
    # plain binary column named otherwise, and a caption column that is a list of strings
    pq.write_table(pa.table({"img": [a, None], "captions": [["first", "second"], ["x"]]}), path)
    with pytest.raises(SdlabError, match=r"no image column 'image' \(its columns: img, captions\); "
                                         r"set data.image_column"):
        CaptionedImageDataset(DataConfig(path, resolution=32, enable_bucket=False))
    with pytest.raises(SdlabError, match="no caption column 'text'"):
        CaptionedImageDataset(DataConfig(path, resolution=32, enable_bucket=False, image_column="img"))
    ds = CaptionedImageDataset(DataConfig(path, resolution=32, enable_bucket=False, image_column="img",
                                          caption_column="captions"))
    assert [r.caption for r in ds.records] == ["first"]  # the row without an image is skipped
    # the Image struct with a path and no bytes: read relative to the file
    pq.write_table(pa.table({"image": [{"bytes": None, "path": "b.png"}], "text": ["by path"]}), path)
    ds = CaptionedImageDataset(DataConfig(path, resolution=32, enable_bucket=False))
    assert np.array_equal(((ds[0]["pixels"] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy(),
                          np.asarray(_decoded(b)))


def test_save_to_disk_arrow_folders_and_splits(tmp_path):
    """`datasets.save_to_disk`: Arrow stream files with state.json; a DatasetDict has a folder
    per split and dataset_dict.json."""
    images = [_png((32, 32), i) for i in range(3)]
    table = pa.table({"image": [{"bytes": b, "path": None} for b in images], "text": ["a", "b", "c"]})
    for split in ("train", "test"):
        folder = tmp_path / "dd" / split
        folder.mkdir(parents=True)
        with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, \
                pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table if split == "train" else table.slice(0, 1))
        (folder / "state.json").write_text("{}")
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    ds = CaptionedImageDataset(DataConfig(tmp_path / "dd", resolution=32, enable_bucket=False))
    assert [r.caption for r in ds.records] == ["a", "b", "c"]
    assert np.array_equal(((ds[2]["pixels"] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy(),
                          np.asarray(_decoded(images[2])))
    assert len(CaptionedImageDataset(DataConfig(tmp_path / "dd", resolution=32, enable_bucket=False,
                                                split="test"))) == 1
    assert len(CaptionedImageDataset(DataConfig(tmp_path / "dd" / "train", resolution=32,
                                                enable_bucket=False))) == 3
    with pytest.raises(SdlabError, match="splits test, train, not 'validation'"):
        CaptionedImageDataset(DataConfig(tmp_path / "dd", resolution=32, split="validation"))


def test_make_dataset_parquet_trains_a_lora_with_cached_latents(tmp_path, base_model):
    """`sdlab make-dataset --layout parquet` writes what the Hub serves (datasets' Image feature in
    the schema); a LoRA trains on it through `--data` with latents cached to disk beside the file."""
    from sdlab.training.config import load_config
    from sdlab.training.trainer import Trainer

    [path] = make_shapes_dataset(tmp_path / "shapes", 6, size=32, seed=2, layout="parquet")
    assert path == tmp_path / "shapes" / "data" / "train-00000-of-00001.parquet"
    meta = json.loads(pq.read_schema(path).metadata[b"huggingface"])
    assert meta["info"]["features"]["image"] == {"_type": "Image"}
    cfg = load_config(None, [f"data.folder={str(path)!r}", "data.resolution=32", "data.enable_bucket=false",
                             "data.cache_latents_to_disk=true", f"output_dir={str(tmp_path / 'out')!r}",
                             "batch_size=2", "lr=1e-2", "mode='lora'", f"base_model={str(base_model)!r}",
                             "lora.rank=2", "steps=2"])
    t = Trainer(cfg, progress_bar=False)
    try:
        out = t.train()
    finally:
        t.close()
    assert out.is_file() and len(list((tmp_path / "shapes" / "data" / ".latent_cache").rglob("*.safetensors"))) == 6
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["ss_dataset_dirs"]) == {"data": {"n_repeats": 1, "img_count": 6}}


def _write_noise_parquet(path: Path, n: int) -> None:
    """n rows of 64x64 noise PNGs stored uncompressed (12 KiB a row), row groups of 100."""
    pngs = []
    for i in range(40):
        buf = io.BytesIO()
        rgb = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(buf, "PNG", compress_level=0)
        pngs.append(buf.getvalue())
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("text", pa.string())])
    # no dictionary: 40 distinct images stand for 2,000, so the file holds every row's bytes
    with pq.ParquetWriter(path, schema, use_dictionary=False, compression="none") as w:
        for start in range(0, n, 100):
            rows = [{"bytes": pngs[i % len(pngs)], "path": None} for i in range(start, min(n, start + 100))]
            w.write_table(pa.table({"image": rows, "text": ["x"] * len(rows)}, schema=schema), row_group_size=100)


_RSS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from sdlab.training.data import CaptionedImageDataset, DataConfig

    out = []
    for path in sys.argv[1:]:  # scan every row, then read 300 items in shuffled order
        ds = CaptionedImageDataset(DataConfig(path, resolution=32, enable_bucket=False))
        for i in np.random.default_rng(1).permutation(len(ds))[:300]:
            ds[int(i)]
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # peak, MiB
    print(out)
""")


def test_peak_memory_does_not_grow_with_the_rows(tmp_path):
    """Peak RSS after scanning a 2,000-row set (23 MiB of images) and reading from it in shuffled
    order is within a few MiB of the peak after a 200-row one: a whole-table read would add the
    23 MiB, a whole-set decode four times that."""
    paths = [tmp_path / f"{n}.parquet" for n in (200, 2000)]
    for n, path in zip((200, 2000), paths):
        _write_noise_parquet(path, n)
    out = subprocess.run([sys.executable, "-c", _RSS, *map(str, paths)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    small, large = eval(out.stdout.strip().splitlines()[-1])
    print(f"peak RSS after 200 rows {small:.1f} MiB, after 2,000 rows ({paths[1].stat().st_size / 2**20:.1f} MiB) "
          f"{large:.1f} MiB")
    assert paths[1].stat().st_size > 20 * 2**20
    assert large - small < 8
