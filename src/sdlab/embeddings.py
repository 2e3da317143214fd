"""Textual-inversion embeddings, in the formats the web UIs read
(AUTOMATIC1111 `modules/textual_inversion/textual_inversion.py`, `create_embedding_from_data`):

- `.pt` from the web UI's trainer: `{"string_to_param": {"*": (n, width)}, "name", "step",
  "sd_checkpoint", "sd_checkpoint_name", ...}`;
- `.bin` from diffusers' trainer: `{token: (width,) or (n, width)}`;
- `.safetensors`: one tensor (`emb_params`, or any single name), or SDXL's `clip_l` + `clip_g`.

An embedding is used by writing its name (the file's stem) in a prompt. Pickled files are
opened with `torch.load(weights_only=True)`: anything but tensors and plain data is refused
and no code from the file runs.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .errors import SdlabError

log = logging.getLogger(__name__)

__all__ = ["EMBEDDING_SUFFIXES", "Embedding", "EmbeddingLibrary", "load_embedding"]

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")


@dataclass(frozen=True)
class Embedding:
    """One textual-inversion embedding.

    `vectors` is `(n, width)`, or for SDXL embeddings one tensor per text encoder
    (`{"clip_l": (n, 768), "clip_g": (n, 1280)}`).
    """

    name: str
    vectors: Tensor | dict[str, Tensor] = field(repr=False)
    path: Path | None = None
    step: int | None = None
    sd_checkpoint: str | None = None  # the web UI's hash of the model it was trained on
    sd_checkpoint_name: str | None = None

    @property
    def num_vectors(self) -> int:
        v = self.vectors
        return (v["clip_g"] if isinstance(v, dict) else v).shape[0]

    @property
    def shape(self) -> int:
        """The web UI's `shape`: the vector width (summed over encoders for SDXL)."""
        v = self.vectors
        return sum(t.shape[-1] for t in v.values()) if isinstance(v, dict) else v.shape[-1]

    def vectors_for(self, width: int, encoder: str | None = None) -> Tensor:
        """The `(n, width)` vectors for one text encoder.

        Args:
            width: the text encoder's token-embedding width.
            encoder: for per-encoder (SDXL) embeddings, "clip_l" or "clip_g".

        Raises:
            SdlabError: the embedding was made for a text encoder of another width.
        """
        v = self.vectors
        if isinstance(v, dict):
            if encoder not in v:
                widths = ", ".join(f"{k} {t.shape[-1]}" for k, t in v.items())
                raise SdlabError(f"embedding {self.name} ({self._where()}) is for SDXL ({widths}), "
                                 f"not for a text encoder of width {width}")
            v = v[encoder]
        if v.shape[-1] != width:
            raise SdlabError(f"embedding {self.name} ({self._where()}) has vectors of width {v.shape[-1]}, but this "
                             f"model's text encoder has width {width}; it was made for another model family")
        return v

    def _where(self) -> str:
        return str(self.path) if self.path is not None else "in memory"


def load_embedding(path: str | Path) -> Embedding:
    """Read one embedding file; its name is the file's stem.

    Raises:
        SdlabError: unreadable file, code in a pickle, or no embedding in it.
    """
    path = Path(path)
    if not path.is_file():
        raise SdlabError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        data = _read_safetensors(path)
    elif suffix in (".pt", ".bin"):
        data = _read_pickle(path)
    else:
        raise SdlabError(f"{path}: unknown embedding file type {suffix!r}; expected .pt, .bin or .safetensors")
    return embedding_from_data(data, path.stem, path)


def embedding_from_data(data: object, name: str, path: Path | None = None) -> Embedding:
    """An Embedding from a loaded file's contents (the web UI's `create_embedding_from_data`)."""
    where = str(path) if path is not None else name
    if not isinstance(data, Mapping) or not data:
        raise SdlabError(f"{where}: not a textual-inversion embedding (expected a dict of tensors)")
    if "string_to_param" in data:  # the web UI's trainer
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise SdlabError(f"{where}: embedding file has {len(params) if isinstance(params, Mapping) else 'no'} "
                             "terms in string_to_param; expected exactly one")
        vectors: Tensor | dict[str, Tensor] = _vectors(next(iter(params.values())), where)
    elif "clip_g" in data and "clip_l" in data:  # SDXL: one tensor per text encoder
        vectors = {k: _vectors(data[k], where) for k in ("clip_l", "clip_g")}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise SdlabError(f"{where}: clip_l and clip_g hold different numbers of vectors")
    else:  # diffusers' `{token: tensor}`, safetensors' `emb_params`
        tensors = [v for v in data.values() if isinstance(v, Tensor)]
        if len(tensors) != 1 or len(data) != 1:
            raise SdlabError(f"{where}: not a textual-inversion embedding (expected string_to_param, emb_params, "
                             f"clip_l/clip_g or one tensor; found keys {', '.join(map(str, list(data)[:4]))})")
        vectors = _vectors(tensors[0], where)
    step = data.get("step")
    return Embedding(name, vectors, path, step=int(step) if isinstance(step, (int, float)) else None,
                     sd_checkpoint=_str_or_none(data.get("sd_checkpoint")),
                     sd_checkpoint_name=_str_or_none(data.get("sd_checkpoint_name")))


def _vectors(t: object, where: str) -> Tensor:
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.ndim not in (1, 2) or t.numel() == 0:
        raise SdlabError(f"{where}: the embedding is not a (vectors, width) float tensor")
    t = t.detach().to(torch.float32)
    return t[None] if t.ndim == 1 else t


def _str_or_none(v: object) -> str | None:
    return None if v is None else str(v)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise SdlabError(f"{path}: not a readable .safetensors file ({_first_line(e)})") from None


def _read_pickle(path: Path) -> object:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        if "GLOBAL " in message:  # weights_only met a class or function: the file wants to run code
            what = message.split("GLOBAL ")[-1].split(" was")[0]
            raise SdlabError(f"{path}: refused: loading this pickle would run code ({what}); sdlab never runs code "
                             "from embedding files. Use a .safetensors version") from None
        raise SdlabError(f"{path}: not a readable PyTorch file ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - a damaged file fails anywhere inside the unpickler
        raise SdlabError(f"{path}: not a readable PyTorch file ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0][:200]


class EmbeddingLibrary:
    """The embeddings of one folder (subfolders included), rescanned when files change.

    Files that cannot be read are logged and listed in `errors`, not fatal: one broken
    download must not stop generation with the others.
    """

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder is not None else None
        self.embeddings: dict[str, Embedding] = {}
        self.errors: dict[str, str] = {}  # file -> why it was skipped
        self._signature: tuple | None = None

    def refresh(self) -> bool:
        """Rescan if a file was added, removed or changed; True when something changed."""
        files = self._files()
        signature = tuple((str(p), s.st_size, s.st_mtime_ns) for p, s in files)
        if signature == self._signature:
            return False
        embeddings, errors = {}, {}
        for p, _ in files:
            try:
                emb = load_embedding(p)
            except SdlabError as e:
                errors[str(p)] = str(e)
                log.warning("skipping embedding: %s", e)
                continue
            if emb.name in embeddings:
                log.warning("embedding %s: %s shadows %s", emb.name, p, embeddings[emb.name].path)
            embeddings[emb.name] = emb
        self.embeddings, self.errors, self._signature = embeddings, errors, signature
        return True

    def _files(self) -> list[tuple[Path, object]]:
        if self.folder is None or not self.folder.is_dir():
            return []
        root = self.folder.resolve()
        out = []
        for p in sorted(self.folder.rglob("*")):
            if p.suffix.lower() not in EMBEDDING_SUFFIXES or not p.is_file():
                continue
            if not p.resolve().is_relative_to(root):
                log.warning("skipping embedding %s: it links outside %s", p, self.folder)
                continue
            out.append((p, p.stat()))
        return out

    def tensors(self, width: int, encoder: str | None = None) -> dict[str, Tensor]:
        """name -> `(n, width)` vectors of every embedding that fits this text encoder:
        the mapping `TextEncoderRunner.chunks` / `encode` take."""
        out = {}
        for name, emb in self.embeddings.items():
            try:
                out[name] = emb.vectors_for(width, encoder)
            except SdlabError:
                continue
        return out

    def check_prompt(self, prompt: str, tokenizer, width: int, encoder: str | None = None) -> None:
        """Raise if the prompt uses an embedding made for another text-encoder width.

        Such embeddings are left out of `tensors()`; without this check their name would
        silently be read as plain words. The prompt is tokenized exactly as for encoding.

        Raises:
            SdlabError: naming the embedding's file and both widths.
        """
        wrong = {}
        for name, emb in self.embeddings.items():
            try:
                emb.vectors_for(width, encoder)
            except SdlabError as e:
                wrong[name] = (emb, e)
        if not wrong:
            return
        from .text.prompt import parse_prompt_attention, tokenize_weighted

        # All names take part, as in encoding: a longer, fitting name must still win over a wrong one.
        sizes = {name: emb.num_vectors for name, emb in self.embeddings.items() if 1 <= emb.num_vectors <= 75}
        chunks = tokenize_weighted(parse_prompt_attention(prompt), tokenizer.encode, tokenizer.comma_id,
                                   pad_id=tokenizer.eos_id, embeddings=sizes)
        for chunk in chunks:
            for ref in chunk.embeddings:
                if ref.name in wrong:
                    raise wrong[ref.name][1]
