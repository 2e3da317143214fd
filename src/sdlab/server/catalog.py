"""The models folder as the HTTP API sees it: checkpoints, LoRAs and embeddings by name.

A thin adapter over `sdlab.models_dir.ModelsDir`, adding the web UI's view of a
checkpoint (title "name.safetensors [hash]", model_name, aliases) and a listing that
stays the same between rescans (POST refresh-checkpoints), as the web UI's does.

A name from a client is first matched against the listed files, then resolved by
`ModelsDir.resolve_checkpoint`, which refuses names that lead outside the folder; only
a file that is in the listing is ever loaded.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SdlabError
from ..models_dir import KINDS, ModelsDir

log = logging.getLogger(__name__)

CHECKPOINT_DIR = KINDS["checkpoint"].folder


class NotFound(SdlabError):
    """A name that matches nothing in the models folder (answered 404)."""


@dataclass(frozen=True)
class CheckpointEntry:
    name: str  # path relative to Stable-diffusion/ with "/" separators and the extension, as the web UI shows it
    path: Path
    sha256: str | None = None  # known once the file was hashed (a 2-7 GB file takes seconds)

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
    name: str  # file stem: what a <lora:NAME:1> tag or an embedding trigger uses
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)


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
        self.models = ModelsDir(root)
        self.root = self.models.root.resolve()
        # A checkpoint the operator named by path on the command line (trusted; may live
        # elsewhere), or the built-in demo model.
        self.extra_checkpoint = extra_checkpoint.resolve() if extra_checkpoint is not None else None
        self._lock = threading.Lock()
        self._hashes: dict[Path, str] = {}
        self._checkpoints: list[CheckpointEntry] = []
        self.refresh()

    # -- checkpoints ------------------------------------------------------------

    def refresh(self) -> None:
        folder = self.models.folder("checkpoint")
        entries = []
        for m in self.models.list_checkpoints():
            # ModelFile.name has no extension; the web UI's checkpoint name keeps it.
            name = m.name + (m.path.suffix if m.path.is_file() else "")
            path = m.path.resolve()
            entries.append(CheckpointEntry(name, path, self._hashes.get(path)))
        if self.extra_checkpoint is not None and all(e.path != self.extra_checkpoint for e in entries):
            p = self.extra_checkpoint
            entries.insert(0, CheckpointEntry(p.name, p, self._hashes.get(p)))
        with self._lock:
            self._checkpoints = entries
        log.debug("%d checkpoints in %s", len(entries), folder)

    def checkpoints(self) -> list[CheckpointEntry]:
        with self._lock:
            return list(self._checkpoints)

    def find_checkpoint(self, name: str) -> CheckpointEntry:
        """The checkpoint a client named: file name, title, model name, hash, or anything
        `ModelsDir.resolve_checkpoint` accepts; never a file outside the listing."""
        wanted = name.strip()
        entries = self.checkpoints()
        for entry in entries:
            if wanted in entry.names():
                return entry
        try:
            path = self.models.resolve_checkpoint(wanted).resolve()
        except SdlabError as e:  # ModelsDir's message lists what is there, or says why the name is refused
            raise NotFound(f"no checkpoint named {name!r} in the models folder: {e}") from None
        for entry in entries:
            if entry.path == path:
                return entry
        raise NotFound(f"checkpoint {name!r} is not in the listing yet; POST /sdapi/v1/refresh-checkpoints")

    def sha256(self, entry: CheckpointEntry) -> str:
        """Hash a checkpoint file (cached by ModelsDir across runs) and remember it for the listing."""
        sha = self._hashes.get(entry.path) or self.models.sha256(entry.path)
        with self._lock:
            self._hashes[entry.path] = sha
            self._checkpoints = [CheckpointEntry(e.name, e.path, sha) if e.path == entry.path else e
                                 for e in self._checkpoints]
        return sha

    def default_checkpoint(self) -> CheckpointEntry | None:
        entries = self.checkpoints()
        return entries[0] if entries else None

    # -- LoRAs and embeddings ------------------------------------------------------

    def loras(self) -> list[FileEntry]:
        return [FileEntry(m.path.stem, m.path, _safetensors_metadata(m.path)) for m in self.models.list_loras()]

    def embeddings(self) -> list[FileEntry]:
        return [FileEntry(m.path.stem, m.path) for m in self.models.list_embeddings()]
