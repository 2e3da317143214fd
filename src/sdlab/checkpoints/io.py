"""Reading and writing weight files: .safetensors (memory-mapped) and .ckpt/.pt/.pth.

Pickled checkpoints are only ever opened with `torch.load(weights_only=True)`:
a file whose unpickling needs anything but tensors and plain containers is
refused, and none of its code runs.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import pickle
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..errors import SdlabError

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers


class _LightningCallbackPlaceholder:
    """Stands in for the PyTorch Lightning callback objects that training runs leave
    in SD .ckpt files. It only receives their state; nothing is executed."""

    def __setstate__(self, state: object) -> None:
        self.state = state


# Globals some released .ckpt files reference besides tensors. Each is data, not code.
_SAFE_CKPT_GLOBALS = [
    (_LightningCallbackPlaceholder, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
]


class StateDict(Mapping[str, Tensor]):
    """A read-only, lazy view of a checkpoint's tensors.

    For .safetensors the tensors are read from the memory-mapped file on access,
    one at a time, so building a model from it never holds a second full copy.
    """

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype],
                 get: "callable[[str, torch.dtype | None], Tensor]", metadata: dict[str, str] | None = None):
        self.path = path
        self.shapes = shapes
        self.dtypes = dtypes
        self.metadata = metadata or {}
        self._get = get

    def __getitem__(self, key: str) -> Tensor:
        return self.read(key)

    def read(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        """The tensor, cast to `dtype` if it is floating point and a dtype is given.

        Same result as `sd[key].to(dtype)`, but a file reader can cast without keeping
        the stored copy resident (see `_read_safetensors`).
        """
        if key not in self.shapes:
            raise KeyError(key)
        return self._get(key, dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], path: Path | str = "<memory>",
                     metadata: dict[str, str] | None = None) -> StateDict:
        tensors = dict(tensors)
        return cls(Path(path), {k: tuple(v.shape) for k, v in tensors.items()},
                   {k: v.dtype for k, v in tensors.items()}, lambda k, dtype: cast_floating(tensors[k], dtype), metadata)


def cast_floating(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    """`t` in `dtype` if it is floating point and a dtype is given; integer tensors stay as they are."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Open a weight file lazily; raise SdlabError naming the file on any problem."""
    path = Path(path)
    if not path.exists():
        raise SdlabError(f"{path}: no such file")
    if path.is_dir():
        raise SdlabError(f"{path}: is a folder; give a .safetensors/.ckpt file or a diffusers folder with model_index.json")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise SdlabError(f"{path}: unknown file type {suffix!r}; expected .safetensors, .ckpt, .pt, .pth or .bin")


def _read_safetensors(path: Path) -> StateDict:
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")  # validates the header
        keys = list(handle.keys())
        shapes, dtypes, foreign = {}, {}, set()
        for k in keys:
            sl = handle.get_slice(k)
            shapes[k] = tuple(sl.get_shape())
            dtypes[k] = _SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.float32)
            if sl.get_dtype() not in _SAFETENSORS_DTYPES:
                foreign.add(k)
        metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise SdlabError(f"{path}: not a readable .safetensors file ({_first_line(e)}); "
                         "the download may be truncated or corrupt, fetch it again") from None
    header, data_start = _safetensors_header(path)

    def get(key: str, dtype: torch.dtype | None) -> Tensor:
        # Each tensor is a view of a mapping of its own, unmapped when the tensor is freed. Through
        # safetensors' one mapping of the whole file, every page read stays resident (counted in
        # RSS) while any tensor of the file lives: casting an fp32 SD 1.5 file to bf16 peaked at
        # file + model (6.2 GiB) instead of model + one tensor (2.3 GiB), and a weight replaced
        # later (channels-last) kept its old pages. Tensors not cast stay views of the file: no copy.
        try:
            if key in foreign:  # a dtype torch has no name for here: let safetensors read it
                return cast_floating(handle.get_tensor(key), dtype)
            begin, end = header[key]["data_offsets"]
            return cast_floating(_map_bytes(path, data_start + begin, end - begin).view(dtypes[key]).reshape(shapes[key]),
                         dtype)
        except (SafetensorError, OSError, ValueError) as e:
            raise SdlabError(f"{path}: tensor {key!r} cannot be read ({_first_line(e)}); "
                             "the file is truncated or corrupt, fetch it again") from None

    _check_safetensors_size(path, header, data_start)
    return StateDict(path, shapes, dtypes, get, metadata)


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header (tensor name -> dtype, shape, data_offsets) and where the data starts."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return header, 8 + header_len


def _check_safetensors_size(path: Path, header: dict, data_start: int) -> None:
    """safetensors validates the header but lets a truncated data section through until a
    tensor past the end is read; check the file is as long as its header says."""
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    have = path.stat().st_size - data_start
    if have < end:
        raise SdlabError(f"{path}: truncated .safetensors file ({have} of {end} data bytes); fetch it again")


def _map_bytes(path: Path, offset: int, nbytes: int) -> Tensor:
    """`nbytes` bytes of the file from `offset`, as a uint8 tensor on a mapping of its own that
    is unmapped when the tensor is freed. Copy-on-write, so torch may take it as writable."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), offset + nbytes - start, offset=start, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mapped, dtype=torch.uint8, offset=offset - start, count=nbytes)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _read_pickle(path: Path) -> StateDict:
    try:
        with torch.serialization.safe_globals(_SAFE_CKPT_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own warnings would add lines to our one-line error
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        message = str(e)
        if "GLOBAL" not in message and "Unsupported" not in message:
            raise SdlabError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)}); "
                             "the file may be truncated or not a model file") from None
        what = message.split("GLOBAL ")[-1].split(" was")[0] if "GLOBAL" in message else "non-tensor objects"
        raise SdlabError(f"{path}: refused: loading this pickle would run code ({what}); sdlab never runs code "
                         "from checkpoints. Use a .safetensors version of the model") from None
    except Exception as e:  # a damaged file fails anywhere inside the unpickler
        raise SdlabError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)}); "
                         "the file may be truncated or not a model file") from None

    tensors = _find_state_dict(obj)
    if tensors is None:
        raise SdlabError(f"{path}: contains no tensors (expected a state dict, or one under 'state_dict')")
    # sdlab's .ckpt files keep what a .safetensors file has as metadata next to the state dict.
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if isinstance(meta, Mapping):
        meta = {k: v for k, v in meta.items() if isinstance(k, str) and isinstance(v, str)}
    return StateDict.from_tensors(tensors, path, meta if isinstance(meta, dict) else None)


def _find_state_dict(obj: object) -> dict[str, Tensor] | None:
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model", "module", "adapter"):  # "adapter": some T2I-Adapter .pth files
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
        return strip_wrapper_prefixes(tensors) if tensors else None
    return None


def strip_wrapper_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove `_orig_mod.` / `module.` left by torch.compile and DDP, in one place."""
    for prefix in WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`, renamed over it only if the block succeeds,
    so a crash never leaves a half-written file under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); give it the mode any newly created file gets.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    """The process's umask, read without changing it where /proc says it (os.umask can only set)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(tmp_path)` then rename over `path` (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        write(tmp)


def save_safetensors(tensors: Mapping[str, Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors to a .safetensors file atomically (contiguous, shared storage broken)."""
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(data, str(tmp), metadata=dict(metadata or {})))
