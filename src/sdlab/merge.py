"""The web UI's checkpoint merger (A1111 `modules/extras.py::run_modelmerger`), streamed tensor
by tensor.

Modes, with M the multiplier:

- "Weighted sum": `A * (1 - M) + B * M`
- "Add difference": `A + (B - C) * M`; where C lacks a key of B, `B - C` is zeros
- "No interpolation": A alone (to convert to fp16, bake in a VAE or discard weights)

The web UI's rules: only keys that contain "model" and are in both A and B are merged (the
UNet, VAE and text encoders all do), except `cond_stage_model.transformer.text_model.
embeddings.position_ids`; A's other keys pass through; keys only in B are dropped. When a tensor
differs only in its input channels, A must be the inpainting (9) or instruct-pix2pix (8) model and
only its first 4 channels merge. "Save as fp16" casts fp32 tensors only: the merged ones (every one
with "No interpolation"), and a baked-in VAE's. The safetensors metadata gets `format: pt`, the
inputs' own metadata, and the recipe as JSON strings (`sd_merge_recipe`, `sd_merge_models`).

Where sdlab differs, on purpose: the arithmetic runs in fp32 whatever the files' dtypes (the web UI
computes in them, so two fp16 files merge with fp16 rounding there), and the result takes the
dtype torch's promotion of the inputs' gives, as the web UI's result does; models of two different
families are refused (the web UI fails on the first tensor whose shapes differ, or merges
nonsense); the output is .safetensors only, written to a temporary name and renamed.

Memory: nothing is loaded whole. The output's header is planned from the inputs' headers, then each
merged tensor is computed from the memory-mapped inputs, 4M values at a time, and written before the
next is read. Two SD 1.5-shaped fp16 files (2.1 GB each) merged at a peak RSS of 0.53 GB, 0.23 GB
of it Python and torch (docs/upscalers.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from .errors import SdlabError

log = logging.getLogger(__name__)

__all__ = ["MODES", "MergeInput", "MergeOptions", "MergeResult", "default_name", "legacy_hash", "merge_checkpoints"]

MergeMode = Literal["Weighted sum", "Add difference", "No interpolation"]
# The CLI's spellings of the web UI's interp_method names.
MODES: dict[str, MergeMode] = {"weighted-sum": "Weighted sum", "add-difference": "Add difference",
                               "no-interpolation": "No interpolation"}
SKIP_ON_MERGE = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)
VAE_PREFIX = "first_stage_model."
# Metadata that describes the network itself: the output has A's shapes, so it keeps A's.
_OWN_CONFIG_KEYS = re.compile(r"^(sdlab\.|modelspec\.architecture$|modelspec\.prediction_type$)")

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


@dataclass(frozen=True)
class MergeOptions:
    """The web UI's merger settings (its `run_modelmerger` arguments, less the file names)."""

    interp_method: MergeMode = "Weighted sum"
    multiplier: float = 0.3  # M; the web UI's default ("set to 0 to get model A")
    save_as_half: bool = False
    bake_in_vae: Path | None = None  # a VAE file whose weights replace A's first_stage_model.*
    discard_weights: str = ""  # a regular expression; matching keys are left out (re.search)
    save_metadata: bool = True
    add_merge_recipe: bool = True
    copy_metadata_fields: bool = True  # the inputs' own metadata, A's then B's then C's
    metadata: Mapping[str, str] = field(default_factory=dict)  # the user's metadata_json, added after
    config_source: Literal[0, 1, 2, 3] = 0  # the .yaml copied beside the output: A/B/C, B, C, none
    custom_name: str = ""  # recorded in sd_merge_recipe, as the web UI does
    bake_in_vae_name: str = "None"  # recorded in sd_merge_recipe

    def __post_init__(self) -> None:
        if self.interp_method not in MODES.values():
            raise SdlabError(f"unknown merge mode {self.interp_method!r}; one of {', '.join(MODES.values())}")
        if self.config_source not in (0, 1, 2, 3):
            raise SdlabError(f"config_source must be 0 (A, B or C), 1 (B), 2 (C) or 3 (don't), got "
                             f"{self.config_source!r}")
        if self.discard_weights:
            try:
                re.compile(self.discard_weights)
            except re.error as e:
                raise SdlabError(f"discard weights: {self.discard_weights!r} is not a regular expression ({e})") \
                    from None


@dataclass(frozen=True)
class MergeInput:
    """One model to merge: a .safetensors/.ckpt file or a diffusers folder."""

    path: Path
    name: str = ""  # as the web UI's checkpoint name ("sub/model.safetensors"); default: the file name
    sha256: str | None = None  # None: hashed here (files only)

    @property
    def label(self) -> str:
        return self.name or self.path.name

    @property
    def model_name(self) -> str:
        """The web UI's model_name: the name without its extension."""
        return os.path.splitext(self.label)[0] if self.path.is_file() else self.label


@dataclass(frozen=True)
class MergeResult:
    path: Path
    is_inpainting: bool
    is_instruct_pix2pix: bool
    merged: int  # tensors computed from A and B
    kept: int  # A's tensors written as they were (besides a dtype change)
    dropped: int  # B's keys that A lacks, and those discarded
    metadata: dict[str, str]


def default_name(a: MergeInput, b: MergeInput | None, c: MergeInput | None, options: MergeOptions) -> str:
    """The web UI's output name, without extension: "0.7(a) + 0.3(b)", "a + 0.3(b - c)" or "a"."""
    m = options.multiplier
    if options.interp_method == "Weighted sum" and b is not None:
        return f"{round(1 - m, 2)}({a.model_name}) + {round(m, 2)}({b.model_name})"
    if options.interp_method == "Add difference" and b is not None and c is not None:
        return f"{a.model_name} + {round(m, 2)}({b.model_name} - {c.model_name})"
    return a.model_name


def legacy_hash(path: Path) -> str:
    """The web UI's old 8-digit model hash: SHA-256 of 64 KiB at offset 1 MiB."""
    import hashlib

    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


# --------------------------------------------------------------------------------------
# Planning: what each output tensor is, from the headers alone
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    key: str
    kind: Literal["keep", "merge", "channels", "vae"]  # channels: only [:, :4] of A merges
    shape: tuple[int, ...]
    dtype: torch.dtype


def _to_half(dtype: torch.dtype, enable: bool) -> torch.dtype:
    return torch.float16 if enable and dtype == torch.float32 else dtype


def _family_group(name: str) -> str:
    """Families whose weights have the same shapes (an inpainting model differs in 5 channels)."""
    return {"sd2-v": "sd2"}.get(name, name).removesuffix("-inpaint")


def _check_families(models: list[tuple[str, object]]) -> None:
    from .checkpoints.loader import config_of

    labels = []
    for letter, sd in models:
        family = config_of(sd).family
        labels.append((letter, family))
    groups = {_family_group(f.name) for _, f in labels}
    if len(groups) > 1:
        what = ", ".join(f"{letter} is {f.label}" for letter, f in labels)
        raise SdlabError(f"{what}: models of different families cannot be merged; pick models of one family")


def _plan(a, b, c, vae: Mapping[str, Tensor] | None, options: MergeOptions) -> tuple[list[_Entry], bool, bool, int]:
    mode = options.interp_method
    half = options.save_as_half
    entries: list[_Entry] = []
    inpainting = pix2pix = False
    for key in a:
        shape, dtype = tuple(a.shapes[key]), a.dtypes[key]
        merges = (b is not None and mode != "No interpolation" and "model" in key and key in b.shapes
                  and key not in SKIP_ON_MERGE)
        if not merges:
            entries.append(_Entry(key, "keep", shape, _to_half(dtype, half and mode == "No interpolation")))
            continue
        b_shape = tuple(b.shapes[key])
        if not (dtype.is_floating_point and b.dtypes[key].is_floating_point):
            entries.append(_Entry(key, "keep", shape, dtype))  # integer buffers are not weights
            continue
        if mode == "Add difference" and key in c.shapes and tuple(c.shapes[key]) != b_shape:
            raise SdlabError(f"B and C differ at {key}: {list(b_shape)} and {list(c.shapes[key])}; C must be the "
                             "model B was made from")
        if shape == b_shape:
            out = torch.promote_types(dtype, b.dtypes[key])
            if mode == "Add difference" and key in c.shapes:
                out = torch.promote_types(out, c.dtypes[key])
            entries.append(_Entry(key, "merge", shape, _to_half(out, half)))
            continue
        if len(shape) < 2 or shape[:1] + shape[2:] != b_shape[:1] + b_shape[2:]:
            raise SdlabError(f"A and B differ at {key}: {list(shape)} and {list(b_shape)}; they are not the same "
                             "kind of model")
        if shape[1] == 4 and b_shape[1] == 9:
            raise SdlabError("When merging an inpainting model with a normal one, A must be the inpainting model: "
                             "give it first")
        if shape[1] == 4 and b_shape[1] == 8:
            raise SdlabError("When merging an instruct-pix2pix model with a normal one, A must be the "
                             "instruct-pix2pix model: give it first")
        if not (shape[1] in (8, 9) and b_shape[1] == 4):
            raise SdlabError(f"bad dimensions for merged layer {key}: A={list(shape)}, B={list(b_shape)}")
        pix2pix |= shape[1] == 8
        inpainting |= shape[1] == 9
        entries.append(_Entry(key, "channels", shape, _to_half(dtype, half)))
    if vae is not None:
        index = {e.key: i for i, e in enumerate(entries)}
        found = 0
        for k, t in vae.items():
            i = index.get(VAE_PREFIX + k)
            if i is None:
                continue
            if tuple(t.shape) != entries[i].shape:
                raise SdlabError(f"{options.bake_in_vae}: VAE weight {k} is {list(t.shape)}, the model's is "
                                 f"{list(entries[i].shape)}; the VAE is for another model family")
            entries[i] = _Entry(entries[i].key, "vae", entries[i].shape, _to_half(t.dtype, half))
            found += 1
        if not found:
            raise SdlabError(f"{options.bake_in_vae}: none of its weights is a VAE weight of model A")
    dropped = sum(1 for k in (b or ()) if "model" in k and k not in a.shapes) if mode != "No interpolation" else 0
    if options.discard_weights:
        pattern = re.compile(options.discard_weights)
        kept = [e for e in entries if not pattern.search(e.key)]
        dropped += len(entries) - len(kept)
        entries = kept
    return entries, inpainting, pix2pix, dropped


# --------------------------------------------------------------------------------------
# Computing and writing
# --------------------------------------------------------------------------------------

_CHUNK = 1 << 22  # elements computed at once: the arithmetic's fp32 copies stay ~100 MB for any tensor


def _compute(entry: _Entry, a, b, c, vae: Mapping[str, Tensor] | None, options: MergeOptions) -> Iterator[Tensor]:
    """One output tensor, in its planned dtype, as flat chunks in order: the arithmetic runs in
    fp32 on `_CHUNK` elements at a time (it is elementwise), so a large tensor (SD's 49408x768 token
    embedding) never has several fp32 copies of itself in memory."""
    key, m = entry.key, options.multiplier
    if entry.kind == "keep":
        yield a[key].to(entry.dtype)
        return
    if entry.kind == "vae":
        yield vae[key[len(VAE_PREFIX):]].to(entry.dtype)
        return
    f32 = torch.float32
    diff = options.interp_method == "Add difference"
    has_c = diff and key in c.shapes

    def merge(x: Tensor, theta_b: Tensor, theta_c: Tensor | None) -> Tensor:
        if diff:  # where C lacks the key, the web UI takes B - C as zeros
            return x + m * (theta_b - theta_c) if theta_c is not None else x + m * torch.zeros_like(theta_b)
        return (1 - m) * x + m * theta_b

    if entry.kind == "channels":  # small (the UNet's first convolution): in one piece
        theta_a = a.read(key, f32)
        out = theta_a.clone()
        out[:, 0:4] = merge(theta_a[:, 0:4], b.read(key, f32), c.read(key, f32) if has_c else None)
        # The web UI writes the merged channels back into A's own tensor, in A's dtype.
        yield out.to(a.dtypes[key]).to(entry.dtype)
        return
    flat_a, flat_b = a[key].reshape(-1), b[key].reshape(-1)
    flat_c = c[key].reshape(-1) if has_c else None
    for start in range(0, max(flat_a.numel(), 1), _CHUNK):
        part = slice(start, start + _CHUNK)
        yield merge(flat_a[part].to(f32), flat_b[part].to(f32),
                    flat_c[part].to(f32) if flat_c is not None else None).to(entry.dtype)


def _write_streaming(path: Path, entries: list[_Entry], metadata: Mapping[str, str],
                     compute: Callable[[_Entry], Iterator[Tensor]],
                     progress: Callable[[int, int], None] | None) -> None:
    """A .safetensors file written one tensor at a time: the header is known from the plan, so
    no tensor has to wait in memory for the others. Tensors are laid out widest dtype first,
    which keeps every one aligned to its element size, as safetensors' own writer does."""
    order = sorted(entries, key=lambda e: (-e.dtype.itemsize, e.key))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for e in order:
        if e.dtype not in _ST_DTYPES:
            raise SdlabError(f"{e.key}: dtype {e.dtype} cannot be written to .safetensors")
        size = e.dtype.itemsize * _numel(e.shape)
        header[e.key] = {"dtype": _ST_DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for i, e in enumerate(order):
            written = 0
            for part in compute(e):
                if part.dtype != e.dtype:  # a bug, not the user's input
                    raise AssertionError(f"{e.key}: computed {part.dtype}, planned {e.dtype}")
                if part.numel():
                    f.write(part.contiguous().reshape(-1).view(torch.uint8).numpy())
                written += part.numel()
                del part
            if written != _numel(e.shape):
                raise AssertionError(f"{e.key}: computed {written} values, planned {list(e.shape)}")
            if progress is not None:
                progress(i + 1, len(order))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _metadata_of(sd) -> dict[str, object]:
    """A file's metadata as the web UI reads it: values that are JSON objects parsed."""
    out: dict[str, object] = {}
    for k, v in (sd.metadata or {}).items():
        out[k] = v
        if isinstance(v, str) and v[:1] == "{":
            try:
                out[k] = json.loads(v)
            except ValueError:
                pass
    return out


def _as_strings(meta: Mapping[str, object]) -> dict[str, str]:
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def merge_checkpoints(a: MergeInput, b: MergeInput | None, c: MergeInput | None, output: str | os.PathLike,
                      options: MergeOptions = MergeOptions(), *,
                      progress: Callable[[int, int], None] | None = None) -> MergeResult:
    """Merge checkpoints as the web UI's merger does (module docstring) into `output`.

    Args:
        a, b, c: the primary, secondary and tertiary models; B is needed by "Weighted sum" and
            "Add difference", C by "Add difference" only.
        output: a .safetensors path, or a folder to write into under the web UI's name
            (`options.custom_name` or `default_name`, then ".inpainting" or ".instruct-pix2pix"
            when A is such a model). Written to a temporary name and renamed.
        progress: called with (tensors written, tensors in all).

    Raises:
        SdlabError: a missing or extra model for the mode, models of different families, an
            inpainting model given as B, a VAE of another shape, a bad regex.
    """
    from .checkpoints.io import atomic_path
    from .checkpoints.loader import file_sha256, open_model

    output = Path(output)
    mode = options.interp_method
    into_folder = output.is_dir() or not output.suffix
    if not into_folder and output.suffix.lower() != ".safetensors":
        raise SdlabError(f"{output}: the merged checkpoint must be a .safetensors file")
    if into_folder and options.custom_name and (Path(options.custom_name).name != options.custom_name
                                                or options.custom_name in (".", "..")):
        raise SdlabError(f"custom name {options.custom_name!r}: give a file name, without folders")
    if mode != "No interpolation" and b is None:
        raise SdlabError(f"{mode} needs a second model (B)")
    if mode == "Add difference" and c is None:
        raise SdlabError("Add difference needs a third model (C): A + (B - C) * M")
    if mode == "No interpolation" and (b is not None or c is not None):
        raise SdlabError("No interpolation uses model A only; leave B and C out")
    if mode == "Weighted sum" and c is not None:
        raise SdlabError("Weighted sum uses models A and B only; C is for Add difference")
    sd_a, sd_b, sd_c = (open_model(x.path)[0] if x is not None else None for x in (a, b, c))
    _check_families([(letter, sd) for letter, sd in zip("ABC", (sd_a, sd_b, sd_c)) if sd is not None])
    vae = None
    if options.bake_in_vae is not None:
        from .checkpoints.loader import config_of
        from .models_dir import read_vae

        vae = read_vae(options.bake_in_vae, config_of(sd_a).vae)
    entries, inpainting, pix2pix, dropped = _plan(sd_a, sd_b, sd_c, vae, options)
    if into_folder:
        name = options.custom_name or default_name(a, b, c, options)
        name += ".inpainting" if inpainting else ""
        name += ".instruct-pix2pix" if pix2pix else ""
        output = output / (name + ".safetensors")
    for x in (a, b, c):
        if x is not None and x.path.resolve() == output.resolve():
            raise SdlabError(f"{output}: is one of the models being merged; write the result to another file")

    metadata: dict[str, object] = {}
    if options.save_metadata:
        if options.copy_metadata_fields:
            for sd in (sd_a, sd_b, sd_c):
                if sd is not None:
                    metadata.update(_metadata_of(sd))
            metadata.update({k: v for k, v in _metadata_of(sd_a).items() if _OWN_CONFIG_KEYS.match(k)})
        metadata.update(options.metadata)
        metadata["format"] = "pt"
    if options.save_metadata and options.add_merge_recipe:
        def sha(x: MergeInput | None) -> str | None:
            if x is None or not x.path.is_file():
                return None
            return x.sha256 or file_sha256(x.path)

        recipe = {
            "type": "webui", "primary_model_hash": sha(a), "secondary_model_hash": sha(b),
            "tertiary_model_hash": sha(c), "interp_method": mode, "multiplier": options.multiplier,
            "save_as_half": options.save_as_half, "custom_name": options.custom_name,
            "config_source": options.config_source, "bake_in_vae": options.bake_in_vae_name,
            "discard_weights": options.discard_weights, "is_inpainting": inpainting, "is_instruct_pix2pix": pix2pix,
        }
        models: dict[str, object] = {}
        for x, sd in zip((a, b, c), (sd_a, sd_b, sd_c)):
            if x is None:
                continue
            own = _metadata_of(sd)
            key = sha(x) or x.label
            models[key] = {"name": x.label, "legacy_hash": legacy_hash(x.path) if x.path.is_file() else None,
                           "sd_merge_recipe": own.get("sd_merge_recipe")}
            if isinstance(own.get("sd_merge_models"), dict):
                models.update(own["sd_merge_models"])
        metadata["sd_merge_recipe"] = json.dumps(recipe)
        metadata["sd_merge_models"] = json.dumps(models)

    strings = _as_strings(metadata)
    with atomic_path(output) as tmp:
        _write_streaming(tmp, entries, strings, lambda e: _compute(e, sd_a, sd_b, sd_c, vae, options), progress)
    _copy_config(output, options.config_source, a, b, c)
    merged = sum(1 for e in entries if e.kind in ("merge", "channels"))
    log.info("wrote %s: %d tensors merged, %d kept from A", output, merged, len(entries) - merged)
    return MergeResult(output, inpainting, pix2pix, merged, len(entries) - merged, dropped, strings)


def _copy_config(output: Path, source: int, a: MergeInput, b: MergeInput | None, c: MergeInput | None) -> None:
    """The web UI's `create_config`: the .yaml beside A, B or C (per `source`) copied beside the output."""
    def near(x: MergeInput | None) -> Path | None:
        if x is None or not x.path.is_file():
            return None
        p = x.path.with_suffix(".yaml")
        return p if p.is_file() else None

    cfg = {0: near(a) or near(b) or near(c), 1: near(b), 2: near(c)}.get(source)
    if cfg is not None:
        shutil.copyfile(cfg, output.with_suffix(".yaml"))
