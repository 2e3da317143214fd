"""Data sets as Hugging Face publishes them: parquet files of image bytes and captions, and the
Arrow files `datasets.Dataset.save_to_disk` writes, read with `pyarrow` (the `train` extra).

What `DataConfig.folder` may name:

- one `.parquet` (or `.arrow`) file;
- a folder of them, e.g. a Hub data set's `data/train-00000-of-00002.parquet` ... (the files of
  `DataConfig.split`, "train" by default, when their names or folders say which split they hold;
  otherwise all of them);
- a `save_to_disk` folder (`data-00000-of-00001.arrow` + `state.json`), or one of a `DatasetDict`
  (`dataset_dict.json` and a folder per split).

The image column (`image_column`, default "image") holds encoded image bytes: the `datasets`
Image feature's struct `{"bytes": ..., "path": ...}` (a path alone is read relative to the file),
plain binary, or a path string; the caption column (`caption_column`, default "text") a string
(a list of strings: its first). Nothing is decoded up front: the scan streams one row group at a
time and keeps only each row's caption, image size and place; an item then reads its row's row
group again (the last few are kept, so neighbours come cheap). Memory stays bounded by a few row
groups whatever the number of rows. Rows whose image does not decode are skipped by index with a
warning, as unreadable files in a folder are.
"""

from __future__ import annotations

import io
import json
import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import SdlabError
from ..images import IMAGE_EXTENSIONS
from ..optional import require

logger = logging.getLogger(__name__)

TABLE_SUFFIXES = (".parquet", ".arrow")
# datasets' row groups for image data sets (config.PARQUET_ROW_GROUP_SIZE_FOR_IMAGE_DATASETS)
ROW_GROUP_SIZE = 100
_SCAN_BATCH = 64
_KEPT_GROUPS = 4  # row groups kept decoded (as Arrow, not as images) per process


@dataclass(frozen=True)
class Row:
    """Where one image lies: file `file` of the table, row group `group`, row `row` within it
    (Arrow files: group 0, `row` counted over the whole file)."""

    file: int
    group: int
    row: int


def table_files(path: Path, split: str = "train") -> list[Path] | None:
    """The parquet / Arrow files of the data set at `path`, or None when `path` is not one (an
    image folder). A folder with images of its own is an image folder, whatever else it holds."""
    path = Path(path)
    if path.is_file():
        return [path] if path.suffix.lower() in TABLE_SUFFIXES else None
    if not path.is_dir():
        return None
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir() if p.is_file()):
        return None
    if (path / "dataset_dict.json").is_file():  # a DatasetDict saved to disk: a folder per split
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        if split not in splits:
            raise SdlabError(f"{path} is a data set with the splits {', '.join(splits)}, not {split!r}: "
                             f"set data.split")
        path = path / split
    files = [p for p in sorted(path.rglob("*")) if p.suffix.lower() in TABLE_SUFFIXES and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    if not files:
        return None
    # The Hub's layout names the split in the file (train-00000-of-00001.parquet) or the folder.
    of_split = [p for p in files if p.name.startswith((f"{split}-", f"{split}.", f"{split}_"))
                or split in p.relative_to(path).parts[:-1]]
    return of_split or files


class TableImages:
    """The rows of a data set's parquet / Arrow files: captions and image bytes, read lazily.

    Picklable (DataLoader workers): open files and kept row groups stay behind and are opened
    again where needed."""

    def __init__(self, files: list[Path], image_column: str = "image", caption_column: str = "text"):
        require("pyarrow", extra="train", purpose="reading parquet / Arrow data sets")
        self.files, self.image_column, self.caption_column = [Path(f) for f in files], image_column, caption_column
        self._open: dict[int, object] = {}
        self._groups: OrderedDict[tuple[int, int], object] = OrderedDict()
        for i in range(len(self.files)):
            self._check_columns(i)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}, "_groups": OrderedDict()}

    # -- files

    def _file(self, i: int):
        """A `pyarrow.parquet.ParquetFile`, or the (memory-mapped) table of an Arrow file."""
        if i not in self._open:
            import pyarrow as pa
            import pyarrow.parquet as pq

            path = self.files[i]
            try:
                if path.suffix.lower() == ".parquet":
                    self._open[i] = pq.ParquetFile(path)
                else:  # Arrow IPC, as save_to_disk writes it (stream format), or the file format
                    source = pa.memory_map(str(path))
                    try:
                        self._open[i] = pa.ipc.open_stream(source).read_all()
                    except pa.ArrowInvalid:
                        self._open[i] = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
            except (OSError, pa.ArrowException) as e:
                raise SdlabError(f"{path}: not a readable {path.suffix[1:]} file ({str(e).splitlines()[0][:200]})") from None
        return self._open[i]

    def _schema(self, i: int):
        f = self._file(i)
        return f.schema_arrow if hasattr(f, "schema_arrow") else f.schema

    def _check_columns(self, i: int) -> None:
        names = self._schema(i).names
        for what, column in (("image", self.image_column), ("caption", self.caption_column)):
            if column not in names:
                raise SdlabError(f"{self.files[i]} has no {what} column {column!r} (its columns: {', '.join(names)}); "
                                 f"set data.{what}_column")

    def _batches(self, i: int, columns: list[str]) -> Iterator[tuple[int, int, object]]:
        """(group, first row, record batch) over file `i`, a bounded number of rows at a time."""
        f = self._file(i)
        if hasattr(f, "iter_batches"):
            for g in range(f.num_row_groups):
                start = 0
                for batch in f.iter_batches(batch_size=_SCAN_BATCH, row_groups=[g], columns=columns):
                    yield g, start, batch
                    start += batch.num_rows
        else:
            for start in range(0, f.num_rows, _SCAN_BATCH):
                yield 0, start, f.select(columns).slice(start, _SCAN_BATCH)

    # -- values

    def _image_bytes(self, value, i: int, where: str) -> bytes:
        """The encoded image of one cell: the Image feature's struct, bytes, or a path."""
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if data is not None:
                return data
            value = path
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, str) and value:
            path = Path(value) if Path(value).is_absolute() else self.files[i].parent / value
            return path.read_bytes()
        raise ValueError(f"{where}: no image in column {self.image_column!r}")

    @staticmethod
    def _caption(value) -> str:
        if isinstance(value, (list, tuple)):
            value = value[0] if value else ""
        return "" if value is None else str(value)

    def scan(self) -> Iterator[tuple[Row, str, bytes | None, str]]:
        """Every row once, a batch at a time: (place, caption, image bytes or None, where)."""
        for i in range(len(self.files)):
            for g, start, batch in self._batches(i, [self.image_column, self.caption_column]):
                images = batch.column(self.image_column).to_pylist()
                captions = batch.column(self.caption_column).to_pylist()
                for k, (image, caption) in enumerate(zip(images, captions)):
                    row = Row(i, g, start + k)
                    where = f"{self.files[i].name} row {self.row_number(row)}"
                    try:
                        data = self._image_bytes(image, i, where)
                    except (ValueError, OSError) as e:
                        logger.warning("skipping %s: %s", where, e)
                        data = None
                    yield row, self._caption(caption), data, where

    def row_number(self, row: Row) -> int:
        """The row's index in its file (what a warning names)."""
        f = self._file(row.file)
        if not hasattr(f, "metadata"):
            return row.row
        return sum(f.metadata.row_group(g).num_rows for g in range(row.group)) + row.row

    def image(self, row: Row) -> bytes:
        """The encoded image of one row: its row group is read (and kept, a few at a time)."""
        key = (row.file, row.group)
        if key in self._groups:
            self._groups.move_to_end(key)
            column = self._groups[key]
        else:
            f = self._file(row.file)
            if hasattr(f, "read_row_group"):
                column = f.read_row_group(row.group, columns=[self.image_column]).column(0)
            else:
                column = f.column(self.image_column)  # memory-mapped: slicing copies nothing
            self._groups[key] = column
            while len(self._groups) > _KEPT_GROUPS:
                self._groups.popitem(last=False)
        where = f"{self.files[row.file].name} row {self.row_number(row)}"
        return self._image_bytes(column[row.row].as_py(), row.file, where)


def open_image_bytes(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))


# ----------------------------------------------------------------------------- writing


def _hf_features(image_column: str, caption_column: str) -> dict[str, str]:
    """The schema metadata `datasets` reads its features from: the image column as its Image."""
    info = {"info": {"features": {image_column: {"_type": "Image"},
                                  caption_column: {"dtype": "string", "_type": "Value"}}}}
    return {"huggingface": json.dumps(info)}


def write_parquet(rows: Iterable[tuple[bytes, str, str]], path: Path, image_column: str = "image",
                  caption_column: str = "text", row_group_size: int = ROW_GROUP_SIZE) -> int:
    """Write (encoded image, file name, caption) rows as `datasets` writes an image data set: the
    image as the Image feature's `{"bytes", "path"}` struct, row groups of `row_group_size`, the
    features in the schema metadata (so `datasets.load_dataset("parquet", ...)` decodes images).
    Streams: a row group in memory at a time. Written to a temporary name and renamed.

    Returns:
        The number of rows written.
    """
    pa = require("pyarrow", extra="train", purpose="writing parquet data sets")
    import pyarrow.parquet as pq

    from ..checkpoints.io import atomic_path

    schema = pa.schema([(image_column, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        (caption_column, pa.string())], metadata=_hf_features(image_column, caption_column))
    n = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, pq.ParquetWriter(str(tmp), schema) as writer:
        chunk: list[tuple[bytes, str, str]] = []

        def flush() -> None:
            images = [{"bytes": b, "path": name} for b, name, _ in chunk]
            writer.write_table(pa.table({image_column: images, caption_column: [c for _, _, c in chunk]},
                                        schema=schema), row_group_size=row_group_size)
            chunk.clear()

        for row in rows:
            chunk.append(row)
            n += 1
            if len(chunk) == row_group_size:
                flush()
        if chunk:
            flush()
    return n
