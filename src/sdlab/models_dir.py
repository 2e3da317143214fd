"""The models folder, laid out as the web UI's: `Stable-diffusion/`, `Lora/`, `embeddings/`,
`VAE/` under one root (`--models-dir`, else `$SDLAB_MODELS_DIR`, else `./models`).

Models are named as in the web UI: the file name with or without its extension, or its
path relative to the kind's folder (`sub/name`) when it sits in a subfolder. A name never
reaches outside its folder: `../..`, absolute paths elsewhere and symlinks that lead out
are refused, so names from HTTP requests are safe to resolve.

Hashes are the web UI's (the first hex digits of a SHA-256), cached in
`sdlab-hashes.json` at the root, keyed by file path, size and modification time.

Imports stay light at module level: `sdlab --help` loads this module to add `sdlab models`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .errors import SdlabError

if TYPE_CHECKING:
    from torch import Tensor

    from .checkpoints.loader import Bundle
    from .models.vae import VAEConfig

log = logging.getLogger(__name__)

__all__ = ["ENV_VAR", "KINDS", "ModelFile", "ModelsDir", "add_models_dir_argument", "load_vae_into", "read_vae",
           "register"]

ENV_VAR = "SDLAB_MODELS_DIR"
HASH_CACHE = "sdlab-hashes.json"

ModelKind = Literal["checkpoint", "lora", "embedding", "vae"]


@dataclass(frozen=True)
class KindInfo:
    folder: str  # the web UI's folder name under the models root
    suffixes: tuple[str, ...]
    label: str  # for messages
    hash_digits: int  # how many hex digits the web UI's infotext shows
    comfy_folder: str = ""  # ComfyUI's name of the same folder, used where the web UI's is absent


KINDS: dict[ModelKind, KindInfo] = {
    "checkpoint": KindInfo("Stable-diffusion", (".safetensors", ".ckpt"), "checkpoint", 10, "checkpoints"),
    "lora": KindInfo("Lora", (".safetensors", ".pt", ".ckpt"), "LoRA", 12, "loras"),
    "embedding": KindInfo("embeddings", (".pt", ".bin", ".safetensors"), "embedding", 12, "embeddings"),
    "vae": KindInfo("VAE", (".safetensors", ".pt", ".ckpt"), "VAE", 10, "vae"),
}


@dataclass(frozen=True)
class ModelFile:
    kind: ModelKind
    name: str  # relative to the kind's folder, "/"-separated, without the extension
    path: Path  # a file, or a diffusers folder (checkpoints only)
    size: int  # bytes (a folder: the sum of its files)


def _default_root() -> Path:
    return Path(os.environ.get(ENV_VAR) or "models")


class ModelsDir:
    """One models folder. Cheap to create; every listing reads the folder afresh."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else _default_root()
        self._hashes: dict[str, dict] | None = None

    def __repr__(self) -> str:
        return f"ModelsDir({str(self.root)!r})"

    def folder(self, kind: ModelKind) -> Path:
        """The kind's folder: the web UI's name (`Stable-diffusion/`), or ComfyUI's
        (`checkpoints/`) when only that one exists, so either install's models folder works."""
        info = KINDS[kind]
        own = self.root / info.folder
        if info.comfy_folder and not own.is_dir():
            comfy = self.root / info.comfy_folder
            if comfy.is_dir():
                return comfy
        return own

    # -- listing -------------------------------------------------------------

    def list(self, kind: ModelKind) -> list[ModelFile]:
        """The models of one kind, sorted by name; subfolders included, hidden files and
        links leading outside the folder left out."""
        info, folder = KINDS[kind], self.folder(kind)
        if not folder.is_dir():
            return []
        base = folder.resolve()
        found: list[ModelFile] = []
        for dirpath, dirnames, filenames in os.walk(folder):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if kind == "checkpoint":
                # A diffusers folder is one checkpoint; do not list its weight files.
                for d in list(dirnames):
                    if (here / d / "model_index.json").is_file():
                        dirnames.remove(d)
                        if (here / d).resolve().is_relative_to(base):
                            found.append(ModelFile(kind, _name(here / d, folder, ""), here / d, _tree_size(here / d)))
            for f in filenames:
                p = here / f
                suffix = p.suffix.lower()
                if f.startswith(".") or suffix not in info.suffixes:
                    continue
                if not p.resolve().is_relative_to(base):
                    log.warning("%s: links outside %s; left out", p, folder)
                    continue
                try:
                    size = p.stat().st_size
                except OSError:  # a dangling link
                    continue
                found.append(ModelFile(kind, _name(p, folder, suffix), p, size))
        return sorted(found, key=lambda m: m.name.lower())

    def list_checkpoints(self) -> list[ModelFile]:
        return self.list("checkpoint")

    def list_loras(self) -> list[ModelFile]:
        return self.list("lora")

    def list_embeddings(self) -> list[ModelFile]:
        return self.list("embedding")

    def list_vaes(self) -> list[ModelFile]:
        return self.list("vae")

    # -- names to paths --------------------------------------------------------

    def resolve(self, kind: ModelKind, name: str) -> Path:
        """The file (or diffusers folder) a name refers to, as the web UI finds it: the
        exact relative path, then with each known extension, then a file of that name
        (without extension) anywhere under the folder.

        Raises:
            SdlabError: the name leads outside the folder, or nothing has that name.
        """
        info, folder = KINDS[kind], self.folder(kind)
        text = (name or "").strip()
        if kind == "checkpoint":
            text = re.sub(r"\s*\[[0-9a-fA-F]{8,64}\]$", "", text)  # the web UI's title "name [hash]"
        if not text or "\x00" in text:
            raise SdlabError(f"empty or invalid {info.label} name {name!r}")
        base = folder.resolve()
        candidate = Path(text) if os.path.isabs(text) else folder / text
        self._refuse_outside(candidate, base, info, name)

        for option in (candidate, *(candidate.with_name(candidate.name + s) for s in info.suffixes)):
            if self._usable(kind, option):
                self._refuse_outside(option, base, info, name)
                return option.resolve()

        wanted = text.replace(os.sep, "/").removesuffix("/")
        stem = wanted.rsplit("/", 1)[-1]
        for s in info.suffixes:
            stem = stem.removesuffix(s)
        available = self.list(kind)
        for match in (lambda m: m.name == wanted,
                      lambda m: m.name.lower() == wanted.lower(),
                      lambda m: m.name.rsplit("/", 1)[-1] == stem,
                      lambda m: m.name.rsplit("/", 1)[-1].lower() == stem.lower()):
            hits = sorted((m for m in available if match(m)), key=lambda m: (m.name.count("/"), m.name))
            if hits:
                if len(hits) > 1:
                    log.info("%s name %r matches %s; using %s", info.label, name,
                             ", ".join(h.name for h in hits), hits[0].name)
                return hits[0].path.resolve()

        if not folder.is_dir():
            raise SdlabError(f"{info.label} {name!r} not found: {folder} does not exist "
                             f"(set --models-dir or {ENV_VAR})")
        names = [m.name for m in available]
        listing = (f"available: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}" if names
                   else "the folder is empty")
        raise SdlabError(f"{info.label} {name!r} not found in {folder} ({listing})")

    def resolve_checkpoint(self, name: str) -> Path:
        return self.resolve("checkpoint", name)

    def resolve_lora(self, name: str) -> Path:
        return self.resolve("lora", name)

    def resolve_embedding(self, name: str) -> Path:
        return self.resolve("embedding", name)

    def resolve_vae(self, name: str) -> Path:
        return self.resolve("vae", name)

    @staticmethod
    def _refuse_outside(path: Path, base: Path, info: KindInfo, name: str) -> None:
        # resolve() follows every symlink on the way, so a link leading out is caught too.
        if not path.resolve().is_relative_to(base):
            raise SdlabError(f"{info.label} name {name!r} leads outside the {info.folder} folder; refused")

    @staticmethod
    def _usable(kind: ModelKind, path: Path) -> bool:
        if path.is_file():
            return path.suffix.lower() in KINDS[kind].suffixes
        return kind == "checkpoint" and (path / "model_index.json").is_file()

    # -- hashes ---------------------------------------------------------------

    def sha256(self, path: str | os.PathLike) -> str:
        """The SHA-256 of a file (hex), from the cache when size and mtime are unchanged."""
        return self._cached(Path(path), "sha256", _sha256)

    def short_hash(self, path: str | os.PathLike) -> str:
        """The web UI's model hash: the first 10 hex digits of the file's SHA-256."""
        return self.sha256(path)[:10]

    def lora_hash(self, path: str | os.PathLike) -> str:
        """The web UI's LoRA hash (infotext `Lora hashes`): 12 hex digits of the SHA-256 of a
        .safetensors file's tensor data after its header (kohya's "addnet" hash), or of the
        whole file for other formats."""
        path = Path(path)
        if path.suffix.lower() != ".safetensors":
            return self.sha256(path)[:12]
        return self._cached(path, "addnet", _addnet_sha256)[:12]

    def infotext_hash(self, kind: ModelKind, path: str | os.PathLike) -> str | None:
        """The hash the web UI shows for this kind of file (None for a diffusers folder)."""
        path = Path(path)
        if not path.is_file():
            return None
        if kind == "lora":
            return self.lora_hash(path)
        return self.sha256(path)[: KINDS[kind].hash_digits]

    def _cached(self, path: Path, field: str, compute) -> str:
        path = path.resolve()
        st = path.stat()
        key = str(path)
        entry = self._cache().get(key)
        if not entry or entry.get("size") != st.st_size or entry.get("mtime") != st.st_mtime_ns:
            entry = {"size": st.st_size, "mtime": st.st_mtime_ns}
        if field not in entry:
            log.info("hashing %s", path)
            entry[field] = compute(path)
            self._cache()[key] = entry
            self._save_cache(key, entry)
        return entry[field]

    def _cache(self) -> dict[str, dict]:
        if self._hashes is None:
            self._hashes = self._read_cache()
        return self._hashes

    def _read_cache(self) -> dict[str, dict]:
        try:
            data = json.loads((self.root / HASH_CACHE).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save_cache(self, key: str, entry: dict) -> None:
        """Merge one entry into the cache file: read what other processes wrote, write a
        temporary file, rename it over the old one (atomic)."""
        if not self.root.is_dir():
            return  # no models folder: keep hashes in memory rather than create one
        data = self._read_cache()
        data[key] = entry
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{HASH_CACHE}.", suffix=".tmp", dir=self.root)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, self.root / HASH_CACHE)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:  # a read-only models folder still works, just without the cache
            log.debug("cannot write %s: %s", self.root / HASH_CACHE, e)


def _name(path: Path, folder: Path, suffix: str) -> str:
    rel = path.relative_to(folder).as_posix()
    return rel[: len(rel) - len(suffix)] if suffix else rel


def _tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    from .checkpoints.loader import file_sha256

    return file_sha256(path)


def _addnet_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        if 8 + header > path.stat().st_size:  # not really a .safetensors file: hash all of it
            header = -8
        f.seek(8 + header)
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# A separate VAE file (`--vae NAME`)
# --------------------------------------------------------------------------------------

_VAE_PREFIX = "first_stage_model."
_VAE_DROPPED = ("loss.", "model_ema.")  # training leftovers in released VAE .ckpt files


def read_vae(path: str | os.PathLike, cfg: VAEConfig) -> dict[str, Tensor]:
    """A standalone VAE file's weights in the native layout (keys without `first_stage_model.`).

    Accepts the released layout (`encoder.down.0...`, with or without the prefix, with
    `loss.*` / `model_ema.*` leftovers) and diffusers' (`encoder.down_blocks.0...`).
    """
    from .checkpoints.diffusers_keys import vae_from_diffusers
    from .checkpoints.io import read_state_dict

    sd = read_state_dict(path)
    keys = [k for k in sd if not k.startswith(_VAE_DROPPED)]
    if any(k.startswith(_VAE_PREFIX) for k in keys):
        tensors = {k[len(_VAE_PREFIX):]: sd[k] for k in keys if k.startswith(_VAE_PREFIX)}
    else:
        tensors = {k: sd[k] for k in keys}
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in tensors):
        try:
            tensors = vae_from_diffusers(tensors, cfg)
        except SdlabError as e:
            raise SdlabError(f"{path}: not a VAE of this model's shape ({e})") from None
    return tensors


def load_vae_into(bundle: Bundle, path: str | os.PathLike) -> None:
    """Replace the bundle's VAE weights with a separate VAE file's (the web UI's `--vae`).

    Raises:
        SdlabError: the file is not a VAE, or not one of this model's shape. The bundle's
            VAE is unchanged then.
    """
    import torch

    vae = bundle.vae
    tensors = read_vae(path, bundle.config.vae)
    expected = vae.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        what = missing or unexpected
        raise SdlabError(f"{path}: not a VAE for this model ({len(missing)} weights missing, {len(unexpected)} "
                         f"unexpected, e.g. {what[0]})")
    for k, t in tensors.items():
        if t.numel() != expected[k].numel():
            raise SdlabError(f"{path}: VAE weight {k} has shape {tuple(t.shape)}, this model's is "
                             f"{tuple(expected[k].shape)}; the VAE is for another model family")
    ref = next(vae.parameters())
    with torch.no_grad():
        vae.load_state_dict({k: t.to(device=ref.device, dtype=ref.dtype) for k, t in tensors.items()}, strict=True)


# --------------------------------------------------------------------------------------
# `sdlab models`
# --------------------------------------------------------------------------------------

def add_models_dir_argument(parser: argparse.ArgumentParser) -> None:
    """`--models-dir DIR`, the same option for every command that looks models up by name."""
    parser.add_argument("--models-dir", metavar="DIR", default=None,
                        help=f"the models folder (default: ${ENV_VAR}, else ./models), with the web UI's "
                             "subfolders Stable-diffusion/, Lora/, embeddings/, VAE/")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "models", help="list the models folder: checkpoints, LoRAs, embeddings, VAEs, with hashes",
        description="List what the models folder holds, with the hashes the web UI shows in infotexts "
                    "(checkpoints and VAEs: 10 hex digits of the SHA-256; LoRAs and embeddings: 12). "
                    "Hashes are cached in sdlab-hashes.json in the folder.")
    add_models_dir_argument(p)
    p.add_argument("--no-hash", action="store_true", help="skip hashing files not hashed before (fast)")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> None:
    models = ModelsDir(args.models_dir)
    if not models.root.is_dir():
        raise SdlabError(f"models folder {models.root} does not exist; create it with the subfolders "
                         f"{', '.join(k.folder for k in KINDS.values())}, or point --models-dir / {ENV_VAR} at one")
    rows = []
    for kind in KINDS:
        for m in models.list(kind):
            digest = None if args.no_hash and not _hash_cached(models, m) else models.infotext_hash(kind, m.path)
            rows.append((kind, m.name, _size(m.size), digest or "-"))
    print(f"models folder: {models.root.resolve()}")
    if not rows:
        print(f"(empty: put files in {', '.join(k.folder + '/' for k in KINDS.values())})")
        return
    header = ("KIND", "NAME", "SIZE", "HASH")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _hash_cached(models: ModelsDir, m: ModelFile) -> bool:
    if not m.path.is_file():
        return False
    st = m.path.stat()
    entry = models._cache().get(str(m.path.resolve()))
    field = "addnet" if m.kind == "lora" and m.path.suffix.lower() == ".safetensors" else "sha256"
    return bool(entry) and entry.get("size") == st.st_size and entry.get("mtime") == st.st_mtime_ns and field in entry


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
