"""The models folder as the HTTP API sees it: checkpoints, LoRAs and embeddings by name.

A thin adapter over `sdlab.models_dir.ModelsDir` (the models-folder module) when it is
installed, with a small scan of its own otherwise, so the server does not depend on the
order the two land in. Either way a name coming from a client is only ever *matched
against the files found by scanning the folder*; it is never joined onto a path, so
`../../etc/passwd` cannot name anything outside it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SdlabError

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")

# The web UI's folder names inside the models folder.
CHECKPOINT_DIR, LORA_DIR, EMBEDDING_DIR = "Stable-diffusion", "Lora", "embeddings"


class NotFound(SdlabError):
    """A name that matches nothing in the models folder (answered 404)."""


@dataclass(frozen=True)
class CheckpointEntry:
    name: str  # path relative to Stable-diffusion/ with "/" separators, as the web UI shows it
    path: Path
    sha256: str | None = None  # known once the file was hashed (hashing a 2-7 GB file takes seconds)

    @property
    def model_name(self) -> str:
        # A1111: os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        return os.path.splitext(self.name.replace("/", "_"))[0]

    @property
    def short_hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.short_hash}]" if self.short_hash else self.name

    def names(self) -> set[str]:
        """Every string a client may use for this checkpoint (the web UI's checkpoint aliases)."""
        out = {self.name, self.title, self.model_name, os.path.splitext(self.name)[0], self.path.name}
        if self.sha256:
            out |= {self.sha256, self.short_hash, f"{self.name} [{self.sha256[:8]}]"}
        return out


@dataclass(frozen=True)
class FileEntry:
    name: str  # stem, what a prompt tag or an embedding trigger uses
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)


def _scan(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file()]
    return sorted(found, key=lambda p: str(p.relative_to(folder)).lower())


def _as_path(item: object) -> Path:
    """An item of ModelsDir's listings as a path: a Path, a str, or an object with `.path`."""
    if isinstance(item, (str, os.PathLike)):
        return Path(item)
    for attr in ("path", "filename", "file"):
        value = getattr(item, attr, None)
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
    raise TypeError(f"cannot read a path from {item!r}")


def _safetensors_metadata(path: Path) -> dict[str, str]:
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # a broken LoRA must not break the listing
        log.warning("%s: cannot read its metadata (%s)", path, str(e).splitlines()[0][:120])
        return {}


class ModelCatalog:
    """Thread-safe listing of one models folder, rescanned on `refresh()`."""

    def __init__(self, root: Path, extra_checkpoint: Path | None = None):
        self.root = Path(root).expanduser().resolve()
        # A checkpoint file the operator named on the command line (trusted, may live elsewhere).
        self.extra_checkpoint = extra_checkpoint.resolve() if extra_checkpoint is not None else None
        self._lock = threading.Lock()
        self._hashes: dict[Path, str] = {}
        self._checkpoints: list[CheckpointEntry] = []
        self._models_dir = self._open_models_dir()
        self.refresh()

    def _open_models_dir(self):
        try:
            from ..models_dir import ModelsDir
        except ImportError:
            return None
        try:
            return ModelsDir(self.root)
        except Exception as e:
            log.warning("models folder %s: %s; using the server's own scan", self.root, e)
            return None

    # -- checkpoints ------------------------------------------------------------

    def _checkpoint_files(self) -> list[Path]:
        if self._models_dir is not None and hasattr(self._models_dir, "list_checkpoints"):
            try:
                return [_as_path(x) for x in self._models_dir.list_checkpoints()]
            except Exception as e:
                log.warning("ModelsDir.list_checkpoints failed (%s); using the server's own scan", e)
        return _scan(self.root / CHECKPOINT_DIR, CHECKPOINT_SUFFIXES)

    def refresh(self) -> None:
        folder = self.root / CHECKPOINT_DIR
        entries = []
        for path in self._checkpoint_files():
            path = path if path.is_absolute() else folder / path
            try:
                name = path.relative_to(folder).as_posix()
            except ValueError:
                name = path.name
            entries.append(CheckpointEntry(name, path, self._hashes.get(path)))
        if self.extra_checkpoint is not None and all(e.path != self.extra_checkpoint for e in entries):
            p = self.extra_checkpoint
            entries.insert(0, CheckpointEntry(p.name, p, self._hashes.get(p)))
        with self._lock:
            self._checkpoints = entries

    def checkpoints(self) -> list[CheckpointEntry]:
        with self._lock:
            return list(self._checkpoints)

    def find_checkpoint(self, name: str) -> CheckpointEntry:
        """The checkpoint a client named: file name, title, model name or hash."""
        wanted = name.strip()
        entries = self.checkpoints()
        for entry in entries:
            if wanted in entry.names():
                return entry
        # "name [hash]" with a hash we have not computed yet
        if wanted.endswith("]") and " [" in wanted:
            base = wanted.rsplit(" [", 1)[0]
            for entry in entries:
                if base in entry.names():
                    return entry
        listed = ", ".join(e.name for e in entries) or f"none; put checkpoints in {self.root / CHECKPOINT_DIR}"
        raise NotFound(f"no checkpoint named {name!r} in the models folder; available: {listed}")

    def set_hash(self, path: Path, sha256: str) -> None:
        with self._lock:
            self._hashes[path] = sha256
            self._checkpoints = [CheckpointEntry(e.name, e.path, sha256) if e.path == path else e
                                 for e in self._checkpoints]

    def default_checkpoint(self) -> CheckpointEntry | None:
        entries = self.checkpoints()
        return entries[0] if entries else None

    # -- LoRAs and embeddings ------------------------------------------------------

    def _listed(self, method: str, folder: str, suffixes: tuple[str, ...]) -> list[Path]:
        if self._models_dir is not None and hasattr(self._models_dir, method):
            try:
                return [_as_path(x) for x in getattr(self._models_dir, method)()]
            except Exception as e:
                log.warning("ModelsDir.%s failed (%s); using the server's own scan", method, e)
        return _scan(self.root / folder, suffixes)

    def loras(self) -> list[FileEntry]:
        return [FileEntry(p.stem, p, _safetensors_metadata(p)) for p in self._listed("list_loras", LORA_DIR, LORA_SUFFIXES)]

    def embeddings(self) -> list[FileEntry]:
        return [FileEntry(p.stem, p) for p in self._listed("list_embeddings", EMBEDDING_DIR, EMBEDDING_SUFFIXES)]
