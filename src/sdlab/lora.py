"""LoRA at inference: read the files users download, merge them into the weights, and
take them out again bit for bit.

Formats read (one file may mix them):

- kohya / web UI: `lora_unet_<module>`, `lora_te_<module>` (SDXL: `lora_te1_`, `lora_te2_`)
  with `.lora_down.weight`, `.lora_up.weight`, `.alpha`. The UNet module is written in the
  diffusers spelling kohya trains on (`down_blocks_0_attentions_0_..._attn1_to_q`) or in the
  original one some tools write (`input_blocks_1_1_proj_in`); the text encoder in
  transformers' spelling (`text_model_encoder_layers_0_self_attn_q_proj`), which for SD 2.x's
  OpenCLIP encoder means row slices of the fused `in_proj_weight`.
- LyCORIS: LoCon (3x3 `lora_down`, optional Tucker `lora_mid`), LoHa (`hada_w1_a` ...
  `hada_t2`), LoKr (`lokr_w1`, `lokr_w2` or their `_a`/`_b` factors, `lokr_t2`), full (`diff`).
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<module>...`,
  the older `.lora.down.weight`, `.lora_linear_layer.down.weight` and attention-processor
  (`processor.to_q_lora.down.weight`) spellings; alpha from `.alpha` keys or PEFT's
  `lora_alpha` / `alpha_pattern` in the `lora_adapter_metadata` safetensors entry.

The deltas are the web UI's (AUTOMATIC1111 `extensions-builtin/Lora/network_lora.py`,
`network_hada.py`, `network_lokr.py`, `lyco_helpers.py`): `W += multiplier * alpha / rank * dW`.
Everything is validated before the first weight changes, and every touched tensor is
backed up so `restore()` puts back the original bits (subtracting the delta again would not
be exact in fp16/bf16).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch import Tensor, nn

from .checkpoints.diffusers_keys import unet_to_diffusers
from .checkpoints.io import read_state_dict
from .errors import SdlabError
from .models.layers import memory_format_of

if TYPE_CHECKING:
    from .checkpoints.loader import Bundle
    from .families import ModelConfig
    from .models.unet import UNetConfig
    from .text.prompt import ExtraNetwork

log = logging.getLogger(__name__)

__all__ = [
    "AppliedLoras", "LoraFile", "LoraModule", "LoraSpec", "LoraState", "LoraUse",
    "apply_loras", "kohya_name", "load_lora", "lora_specs", "native_module_path",
]

# The networks a LoRA module can address: the UNet and the text encoders by index.
Net = Literal["unet", "te0", "te1", "te2"]  # te2: SD3's T5
Kind = Literal["lora", "loha", "lokr", "full"]


# --------------------------------------------------------------------------------------
# Module names: native module path <-> the names LoRA files use
# --------------------------------------------------------------------------------------

_KOHYA_PREFIXES: tuple[tuple[str, Net], ...] = (
    ("lora_unet_", "unet"), ("lora_te1_", "te0"), ("lora_te2_", "te1"), ("lora_te3_", "te2"), ("lora_te_", "te0"))
_KOHYA_PART_PREFIX = {"unet": "lora_unet_", "te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}

# OpenCLIP module -> transformers CLIPTextModel module, per layer (q/k/v are rows of in_proj).
_OPENCLIP_TO_TRANSFORMERS = [
    (re.compile(r"transformer\.resblocks\.(\d+)\.attn\.([qkv]_proj|out_proj)$"), r"text_model.encoder.layers.\1.self_attn.\2"),
    (re.compile(r"transformer\.resblocks\.(\d+)\.mlp\.c_fc$"), r"text_model.encoder.layers.\1.mlp.fc1"),
    (re.compile(r"transformer\.resblocks\.(\d+)\.mlp\.c_proj$"), r"text_model.encoder.layers.\1.mlp.fc2"),
]


@dataclass(frozen=True)
class _Slot:
    """Where a LoRA module lands: one weight of one network, or a row range of it."""

    net: Net
    module: str  # native module path; OpenCLIP's q/k/v are the virtual `...attn.q_proj` etc.
    param: str  # parameter name inside the network
    rows: tuple[int, int] | None = None  # OpenCLIP's fused in_proj_weight: q, k, v row ranges
    # SD3's adaLN layers that diffusers stores as (scale, shift) where the original has (shift,
    # scale): the delta's two halves of rows are swapped before it is added (`_mmdit_swapped_names`).
    swap_halves: bool = False


def _unet_diffusers_paths(module_paths: Iterable[str], cfg: UNetConfig) -> dict[str, str]:
    """native module path -> diffusers module path, through the checkpoint converter's key map."""
    converted = unet_to_diffusers({f"{p}.weight": p for p in module_paths}, cfg)
    return {native: key[: -len(".weight")] for key, native in converted.items()}


def _te_transformers_path(module_path: str) -> str:
    """A text-encoder module in transformers' spelling (OpenAI-layout paths already are)."""
    for rx, repl in _OPENCLIP_TO_TRANSFORMERS:
        if rx.match(module_path):
            return rx.sub(repl, module_path)
    return module_path


def _te_aliases(module_path: str) -> tuple[str, ...]:
    """The native path, transformers' path, and transformers 5's (which dropped the
    `text_model.` level of CLIPTextModel, so PEFT files written with it lack it too)."""
    hf = _te_transformers_path(module_path)
    return module_path, hf, hf.removeprefix("text_model.")


def _index(unet: nn.Module, unet_cfg: UNetConfig, text_encoders: Sequence[nn.Module],
           te_nets: Sequence[Net]) -> dict[tuple[str, str], _Slot]:
    """(net, name) -> slot, for every name a LoRA file may use: the native and the diffusers /
    transformers dotted paths, and the same with dots replaced by underscores (kohya)."""
    index: dict[tuple[str, str], _Slot] = {}

    def add(slot: _Slot, *names: str) -> None:
        for name in names:
            index.setdefault((slot.net, name), slot)
            index.setdefault((slot.net, name.replace(".", "_")), slot)

    layers = [name for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if hasattr(unet_cfg, "hidden_size"):  # SD3's MMDiT: kohya's names are its own paths
        for native in layers:
            add(_Slot("unet", native, native + ".weight"), native)
        for diffusers, native, rows in _mmdit_diffusers_names(unet_cfg):
            add(_Slot("unet", diffusers if rows else native, native + ".weight", rows), diffusers)
        for diffusers, native in _mmdit_swapped_names(unet_cfg):
            add(_Slot("unet", diffusers, native + ".weight", swap_halves=True), diffusers)
    else:
        for native, diffusers in _unet_diffusers_paths(layers, unet_cfg).items():
            add(_Slot("unet", native, native + ".weight"), native, diffusers)

    for te, net in zip(text_encoders, te_nets, strict=True):
        for name, m in te.named_modules():
            if isinstance(m, nn.Linear):
                add(_Slot(net, name, name + ".weight"), *_te_aliases(name))
        if getattr(te.cfg, "layout", None) == "openclip":
            width = te.cfg.width
            for layer in range(te.cfg.layers):
                base = f"transformer.resblocks.{layer}.attn."
                param = base + "in_proj_weight"
                add(_Slot(net, base + "in_proj", param), base + "in_proj")
                for j, x in enumerate("qkv"):
                    path = f"{base}{x}_proj"
                    add(_Slot(net, path, param, (j * width, (j + 1) * width)), *_te_aliases(path))
    return index


def _mmdit_diffusers_names(cfg) -> list[tuple[str, str, tuple[int, int] | None]]:
    """(diffusers module path, native module path, rows) of SD3's MMDiT: diffusers' separate q, k
    and v are row ranges of the original's fused qkv (ComfyUI `mmdit_to_diffusers`)."""
    d, out = cfg.hidden_size, []
    thirds = [(0, d), (d, 2 * d), (2 * d, 3 * d)]
    for i in range(cfg.depth):
        b, j = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == cfg.depth - 1
        attns = [("attn.to_", "x_block.attn."), ("attn.add_", "context_block.attn.")]
        if i in cfg.x_block_self_attn_layers:
            attns.append(("attn2.to_", "x_block.attn2."))
        for (src, dst) in attns:
            suffix = "_proj" if src == "attn.add_" else ""
            out += [(f"{b}{src}{x}{suffix}", f"{j}{dst}qkv", rows) for x, rows in zip("qkv", thirds)]
        pairs = [("attn.to_out.0", "x_block.attn.proj"), ("ff.net.0.proj", "x_block.mlp.fc1"),
                 ("ff.net.2", "x_block.mlp.fc2"), ("norm1.linear", "x_block.adaLN_modulation.1")]
        if not last:
            pairs += [("attn.to_add_out", "context_block.attn.proj"), ("ff_context.net.0.proj", "context_block.mlp.fc1"),
                      ("ff_context.net.2", "context_block.mlp.fc2"),
                      ("norm1_context.linear", "context_block.adaLN_modulation.1")]
        if i in cfg.x_block_self_attn_layers:
            pairs.append(("attn2.to_out.0", "x_block.attn2.proj"))
        out += [(b + src, j + dst, None) for src, dst in pairs]
    out += [("context_embedder", "context_embedder", None), ("proj_out", "final_layer.linear", None)]
    return out


def _mmdit_swapped_names(cfg) -> list[tuple[str, str]]:
    """(diffusers module path, native module path) of SD3's layers whose rows diffusers keeps in the
    other order: the last context block's and the final layer's adaLN (`AdaLayerNormContinuous`,
    (scale, shift); the original's are (shift, scale), and diffusers' converter swaps the halves)."""
    last = cfg.depth - 1
    return [(f"transformer_blocks.{last}.norm1_context.linear", f"joint_blocks.{last}.context_block.adaLN_modulation.1"),
            ("norm_out.linear", "final_layer.adaLN_modulation.1")]


def _bundle_index(bundle: Bundle) -> dict[tuple[str, str], _Slot]:
    return _index(bundle.unet, bundle.unet.cfg, bundle.text_encoders, _te_nets(bundle.family))


def _te_nets(family) -> list[Net]:
    """The LoRA name of each text encoder of a family (`TextEncoderSlot.lora_net`)."""
    return [slot.lora_net for slot in family.text_encoders]


@functools.lru_cache(maxsize=4)
def _config_index(cfg: ModelConfig) -> dict[tuple[str, str], _Slot]:
    # Shapes only: build the networks on the meta device (no memory, milliseconds).
    from .models.clip import CLIPTextModel
    from .models.mmdit import MMDiT
    from .models.t5 import T5Config, T5Encoder
    from .models.unet import UNet

    with torch.device("meta"):
        unet = (MMDiT if cfg.family.is_flow else UNet)(cfg.unet)
        tes = [T5Encoder(c) if isinstance(c, T5Config) else CLIPTextModel(c) for c in cfg.text_encoders]
    return _index(unet, cfg.unet, tes, _te_nets(cfg.family))


def kohya_name(module_path: str, part: Literal["unet", "te", "te1", "te2"] = "unet",
               unet_config: UNetConfig | None = None) -> str:
    """The kohya / web-UI LoRA module name of a native module path.

    Args:
        module_path: the module inside its network, e.g. `input_blocks.1.1.transformer_blocks.0.attn1.to_q`
            or `text_model.encoder.layers.0.self_attn.q_proj`. For an OpenCLIP text encoder,
            `transformer.resblocks.N.attn.q_proj` (`k_proj`, `v_proj`) names the rows of the
            fused `in_proj_weight`, as kohya's files address them.
        part: "unet", "te" (SD 1.x/2.x text encoder), "te1" / "te2" (SDXL's two).
        unet_config: with it, UNet names use the diffusers spelling kohya writes
            (`lora_unet_down_blocks_0_attentions_0_...`), which every tool reads; without it,
            the original spelling (`lora_unet_input_blocks_1_1_...`).
    """
    if part not in _KOHYA_PART_PREFIX:
        raise ValueError(f"part must be one of {sorted(_KOHYA_PART_PREFIX)}, got {part!r}")
    if part == "unet":
        path = module_path
        if unet_config is not None:
            path = _unet_diffusers_paths([module_path], unet_config)[module_path]
    else:
        path = _te_transformers_path(module_path)
    return _KOHYA_PART_PREFIX[part] + path.replace(".", "_")


def as_kohya_tensors(lora: LoraFile, bundle: Bundle, original_unet_names: bool = False
                     ) -> tuple[dict[str, Tensor], list[str]]:
    """A LoRA file's plain LoRA modules (kohya in any spelling, or diffusers/PEFT) as kohya tensors
    under this model's canonical names (`kohya_name`: the UNet in diffusers' spelling, or with
    `original_unet_names` the original one; `lora_te_`, or SDXL's `lora_te1_` / `lora_te2_`), each
    with the alpha that gives its scale. Also returns the keys of modules left out: other kinds
    (LoHa, LoKr, full diffs) and names that match no layer.
    """
    index = _bundle_index(bundle)
    # SD 1.x/2.x's one encoder is `lora_te_`; SDXL's two (and the refiner's, its second) te1 / te2.
    sdxl = any(slot.lora_net == "te1" for slot in bundle.family.text_encoders)
    parts = {"unet": "unet", "te0": "te1" if sdxl else "te", "te1": "te2"}
    unet_config = None if original_unet_names else bundle.unet.cfg
    out, left_out = {}, list(lora.unsupported)
    for m in lora.modules:
        slot = index.get((m.net, m.name))
        if m.kind != "lora" or slot is None or m.net not in parts:
            left_out.append(m.key)
            continue
        name = kohya_name(slot.module, parts[m.net], unet_config)  # type: ignore[arg-type]
        out[f"{name}.lora_down.weight"] = m.tensors["lora_down.weight"]
        out[f"{name}.lora_up.weight"] = m.tensors["lora_up.weight"]
        out[f"{name}.alpha"] = torch.tensor(m.scale * m.rank)  # kohya's scale is alpha / rank
    return out, left_out


def native_module_path(name: str, config: ModelConfig) -> tuple[str, str]:
    """The reverse of `kohya_name`: `(part, native module path)` of a kohya module name
    (without the `.lora_down.weight` suffix) for a model of the given config.

    Raises:
        SdlabError: the name addresses no layer of such a model.
    """
    for prefix, net in _KOHYA_PREFIXES:
        if name.startswith(prefix):
            slot = _config_index(config).get((net, name[len(prefix):]))
            if slot is not None:
                return prefix[len("lora_"):-1], slot.module
            break
    raise SdlabError(f"LoRA module {name!r} names no layer of a {config.family.label} model")


# --------------------------------------------------------------------------------------
# The deltas (AUTOMATIC1111's network_lora / network_hada / network_lokr, lyco_helpers)
# --------------------------------------------------------------------------------------

def _cp(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """Tucker / CP rebuild of LoHa and LoKr (`lyco_helpers.make_weight_cp`)."""
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def _lora_delta(w: Mapping[str, Tensor], dyn_dim: int | None) -> Tensor:
    up, down = w["lora_up.weight"], w["lora_down.weight"]
    if "lora_mid.weight" in w:
        # LoCon with Tucker decomposition: down (r, in, 1, 1), mid (r, r, k, k), up (out, r, 1, 1).
        return torch.einsum("n m k l, i n, m j -> i j k l", w["lora_mid.weight"], up.flatten(1), down.flatten(1))
    up, down = up.flatten(1), down.flatten(1)
    if dyn_dim is not None:
        up, down = up[:, :dyn_dim], down[:dyn_dim]
    delta = up @ down  # (out, in * k * k)
    return delta.reshape(delta.shape[0], *w["lora_down.weight"].shape[1:])


def _loha_delta(w: Mapping[str, Tensor]) -> Tensor:
    w1a, w1b, w2a, w2b = w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"]
    if "hada_t1" in w:
        # With Tucker the `_a` factors are stored transposed: (rank, out).
        first = _cp(w["hada_t1"], w1a, w1b)
    else:
        first = w1a @ w1b.flatten(1)
    second = _cp(w["hada_t2"], w2a, w2b) if "hada_t2" in w else w2a @ w2b.flatten(1)
    return first * second.reshape(first.shape)


def _lokr_delta(w: Mapping[str, Tensor]) -> Tensor:
    w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
    if "lokr_w2" in w:
        w2 = w["lokr_w2"]
    elif "lokr_t2" in w:
        w2 = _cp(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
    else:
        w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2)


# The factors each kind cannot do without (LoKr: w1 and w2, each whole or as _a @ _b, checked apart).
_REQUIRED_ROLES: dict[Kind, frozenset[str]] = {
    "lora": frozenset({"lora_down.weight", "lora_up.weight"}),
    "loha": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    "lokr": frozenset(),
    "full": frozenset({"diff"}),
}


@dataclass
class LoraModule:
    """One module of a LoRA file: the factors of the delta of one weight."""

    key: str  # the module's name in the file, prefix included (what messages show)
    net: Net
    name: str  # the name after the prefix: kohya's underscored path or a dotted diffusers path
    kind: Kind
    tensors: dict[str, Tensor] = field(repr=False)  # role ("lora_down.weight", "hada_w1_a", ...) -> tensor
    alpha: float | None = None
    rslora: bool = False  # PEFT's rank-stabilised scale alpha / sqrt(rank)

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if self.kind == "lora":
            return t["lora_down.weight"].shape[0]
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        if self.kind == "lokr":  # A1111: the w2 factor's rank wins when both are factored
            for role in ("lokr_w2_b", "lokr_w1_b"):
                if role in t:
                    return t[role].shape[0]
        return None

    @property
    def scale(self) -> float:
        """alpha / rank; 1 without an alpha (kohya's and A1111's rule) or without a rank."""
        rank = self.rank
        if self.alpha is None or not rank:
            return 1.0
        return self.alpha / (math.sqrt(rank) if self.rslora else rank)

    def delta(self, device: torch.device | str | None = None, dyn_dim: int | None = None) -> Tensor:
        """The unscaled weight delta in fp32, in its natural shape (reshaped to the weight on merge)."""
        w = {k: v.to(device=device, dtype=torch.float32) for k, v in self.tensors.items()}
        if self.kind == "lora":
            return _lora_delta(w, dyn_dim)
        if self.kind == "loha":
            return _loha_delta(w)
        if self.kind == "lokr":
            return _lokr_delta(w)
        return w["diff"]

    def delta_shape(self, dyn_dim: int | None = None) -> torch.Size:
        """The delta's shape, computed on the meta device (no arithmetic); raises on
        factors that do not fit together."""
        meta = LoraModule(self.key, self.net, self.name, self.kind,
                          {k: torch.empty(v.shape, device="meta") for k, v in self.tensors.items()})
        return meta.delta("meta", dyn_dim).shape

    def halves_swapped(self) -> LoraModule:
        """The same module with the two halves of its output rows swapped (a diffusers-named SD3
        adaLN LoRA, see `_Slot.swap_halves`): a plain LoRA's `lora_up` rows, any other kind's delta."""
        if self.kind == "lora" and "lora_mid.weight" not in self.tensors:
            up = self.tensors["lora_up.weight"]
            return LoraModule(self.key, self.net, self.name, self.kind,
                              {**self.tensors, "lora_up.weight": torch.cat(up.chunk(2)[::-1])}, self.alpha, self.rslora)
        delta = self.delta() * self.scale
        return LoraModule(self.key, self.net, self.name, "full", {"diff": torch.cat(delta.chunk(2)[::-1])})

    @property
    def is_low_rank(self) -> bool:
        """A plain `up @ down` product (merged with one addmm, no temporary delta)."""
        return self.kind == "lora" and "lora_mid.weight" not in self.tensors

    def _up_down(self, device: torch.device, dyn_dim: int | None) -> tuple[Tensor, Tensor]:
        up = self.tensors["lora_up.weight"].to(device=device, dtype=torch.float32).flatten(1)
        down = self.tensors["lora_down.weight"].to(device=device, dtype=torch.float32).flatten(1)
        if dyn_dim is not None:
            up, down = up[:, :dyn_dim], down[:dyn_dim]
        return up, down

    def added(self, weight: Tensor, factor: float, dyn_dim: int | None = None) -> Tensor:
        """`weight + factor * delta` as a new tensor; `weight` is fp32 and 2-D (out, rest)."""
        if self.is_low_rank:
            return torch.addmm(weight, *self._up_down(weight.device, dyn_dim), alpha=factor)
        return torch.add(weight, self.delta(weight.device, dyn_dim).reshape(weight.shape), alpha=factor)

    def add_to(self, weight: Tensor, factor: float, dyn_dim: int | None = None) -> None:
        """`weight += factor * delta` in place; `weight` is fp32 and 2-D (out, rest)."""
        if self.is_low_rank:
            weight.addmm_(*self._up_down(weight.device, dyn_dim), alpha=factor)  # no (out, in) temporary
        else:
            weight.add_(self.delta(weight.device, dyn_dim).reshape(weight.shape), alpha=factor)


# --------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------

_KOHYA_ROLES = frozenset({
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "dora_scale",
})

# diffusers / PEFT spellings of the two factors: (pattern, role); group 1 is the module.
_DIFFUSERS_ROLES = [
    (re.compile(r"(.+)\.lora_A(?:\.[^.]+)?\.weight$"), "lora_down.weight"),  # PEFT (optionally `.default`)
    (re.compile(r"(.+)\.lora_B(?:\.[^.]+)?\.weight$"), "lora_up.weight"),
    (re.compile(r"(.+)\.lora(?:_linear_layer)?\.down\.weight$"), "lora_down.weight"),  # diffusers < 0.22
    (re.compile(r"(.+)\.lora(?:_linear_layer)?\.up\.weight$"), "lora_up.weight"),
    (re.compile(r"(.+)\.alpha$"), "alpha"),
    (re.compile(r"(.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$"), "dora_scale"),
]
# The attention-processor spelling: `attn1.processor.to_q_lora.down.weight`.
_PROCESSOR = re.compile(r"(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PROCESSOR_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROCESSOR_TE = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_DIFFUSERS_NETS: tuple[tuple[str, Net], ...] = (
    ("unet.", "unet"), ("transformer.", "unet"), ("text_encoder_2.", "te1"), ("text_encoder_3.", "te2"),
    ("text_encoder.", "te0"))


def _parse_kohya_key(key: str) -> tuple[Net, str, str, str] | None:
    """`(net, name, module key, role)` of a kohya / LyCORIS key."""
    module_key, _, role = key.partition(".")
    for prefix, net in _KOHYA_PREFIXES:
        if module_key.startswith(prefix):
            return (net, module_key[len(prefix):], module_key, role) if role in _KOHYA_ROLES else None
    return None


def _parse_diffusers_key(key: str) -> tuple[Net, str, str, str] | None:
    body = key.removeprefix("base_model.model.")
    net: Net | None = None
    for prefix, candidate in _DIFFUSERS_NETS:
        if body.startswith(prefix):
            net, body = candidate, body[len(prefix):]
            break
    if net is None:  # unprefixed files hold one network; diffusers reads them as the UNet
        net = "te0" if body.startswith(("text_model.", "encoder.layers.")) else "unet"
    m = _PROCESSOR.match(body)
    if m:
        names = _PROCESSOR_UNET if net == "unet" else _PROCESSOR_TE
        module = f"{m.group(1)}.{names[m.group(2)]}"
        return net, module, key[: len(key) - len(body)] + module, f"lora_{m.group(3)}.weight"
    for rx, role in _DIFFUSERS_ROLES:
        m = rx.match(body)
        if m:
            module = m.group(1)
            return net, module, key[: len(key) - len(body)] + module, role
    return None


def _kind_of(roles: Iterable[str]) -> Kind | None:
    roles = set(roles)
    if "lora_down.weight" in roles or "lora_up.weight" in roles:
        return "lora"
    if any(r.startswith("hada_") for r in roles):
        return "loha"
    if any(r.startswith("lokr_") for r in roles):
        return "lokr"
    if "diff" in roles:
        return "full"
    return None


def _check_roles(kind: Kind, roles: set[str], where: str) -> None:
    missing = sorted(_REQUIRED_ROLES[kind] - roles)
    if kind == "lokr":
        for w in ("lokr_w1", "lokr_w2"):
            if w not in roles and not {w + "_a", w + "_b"} <= roles:
                missing.append(f"{w} (or {w}_a and {w}_b)")
    if missing:
        raise SdlabError(f"{where}: incomplete {kind} module (missing {', '.join(missing)}); the file is damaged")


class _PeftAlphas:
    """PEFT's alpha rules from the `lora_adapter_metadata` entry diffusers writes (or a PEFT
    `adapter_config.json`): `lora_alpha` for every module, `alpha_pattern` overriding it."""

    def __init__(self, configs: Mapping[Net, Mapping]):
        self.configs = configs

    @classmethod
    def from_file(cls, path: Path, metadata: Mapping[str, str]) -> _PeftAlphas:
        configs: dict[Net, dict] = {}
        raw = metadata.get("lora_adapter_metadata")
        if raw:
            try:
                flat = json.loads(raw)
            except ValueError:
                log.warning("%s: unreadable lora_adapter_metadata; using alpha = rank", path.name)
                flat = {}
            for prefix, net in _DIFFUSERS_NETS:
                cfg = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
                if cfg:
                    configs[net] = cfg
        adapter_config = path.with_name("adapter_config.json")
        if not configs and adapter_config.is_file():  # a PEFT `save_pretrained` folder
            try:
                configs["unet"] = json.loads(adapter_config.read_text())
            except ValueError:
                log.warning("%s: unreadable; using alpha = rank", adapter_config)
        return cls(configs)

    def alpha(self, net: Net, module: str) -> tuple[float | None, bool]:
        cfg = self.configs.get(net)
        if not cfg:
            return None, False
        alpha = cfg.get("lora_alpha")
        for pattern, value in (cfg.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
                alpha = value
                break
        return (float(alpha) if alpha is not None else None), bool(cfg.get("use_rslora", False))


@dataclass
class LoraFile:
    """A parsed LoRA file. Its modules are matched against a model only when applied."""

    name: str  # the file's stem: what `<lora:NAME:...>` calls it
    path: Path
    modules: list[LoraModule] = field(repr=False)
    unsupported: list[str] = field(default_factory=list)  # keys of kinds sdlab cannot apply
    metadata: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def base_model(self) -> str | None:
        """What the file says it was trained on (kohya's `ss_base_model_version`, ModelSpec)."""
        m = self.metadata
        return m.get("ss_base_model_version") or m.get("modelspec.architecture") or None


def load_lora(path: str | Path) -> LoraFile:
    """Read and check a LoRA file (.safetensors, or .pt/.ckpt loaded without running code).

    Raises:
        SdlabError: unreadable file, a model or embedding instead of a LoRA, no LoRA weights,
            incomplete modules, or DoRA (not supported yet).
    """
    path = Path(path)
    sd = read_state_dict(path)
    keys = list(sd.keys())
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.")) for k in keys):
        raise SdlabError(f"{path}: this is a model checkpoint, not a LoRA; put it in the Stable-diffusion folder")
    if any(k in ("string_to_param", "emb_params", "clip_l", "clip_g") for k in keys):
        raise SdlabError(f"{path}: this is a textual-inversion embedding, not a LoRA; put it in the embeddings folder")

    groups: dict[tuple[Net, str], tuple[str, dict[str, Tensor], list[str]]] = {}
    unsupported: list[str] = []
    for key in keys:
        parsed = _parse_kohya_key(key) or _parse_diffusers_key(key)
        if parsed is None:
            unsupported.append(key)
            continue
        net, name, module_key, role = parsed
        _, tensors, file_keys = groups.setdefault((net, name), (module_key, {}, []))
        tensors[role] = sd[key]
        file_keys.append(key)

    peft = _PeftAlphas.from_file(path, sd.metadata)
    modules: list[LoraModule] = []
    for (net, name), (module_key, tensors, file_keys) in groups.items():
        if "dora_scale" in tensors:
            raise SdlabError(f"{path}: {module_key} is a DoRA module (dora_scale), which sdlab does not support yet")
        alpha_t = tensors.pop("alpha", None)
        kind = _kind_of(tensors)
        if kind is None:  # e.g. an alpha alone, or IA3 / OFT / norm modules
            unsupported.extend(file_keys)
            continue
        _check_roles(kind, set(tensors), f"{path}: {module_key}")
        alpha, rslora = (float(alpha_t.float().item()), False) if alpha_t is not None else (None, False)
        if alpha is None and "." in name:  # diffusers / PEFT naming: the metadata may say
            alpha, rslora = peft.alpha(net, name)
        modules.append(LoraModule(module_key, net, name, kind, tensors, alpha, rslora))

    if not modules:
        raise SdlabError(f"{path}: no LoRA weights found (first keys: {', '.join(keys[:3]) or 'none'}); "
                         "expected kohya (lora_unet_*, lora_te_*), LyCORIS or diffusers/PEFT (lora_A/lora_B) keys")
    for m in modules:
        try:
            m.delta_shape()
        except RuntimeError as e:
            raise SdlabError(f"{path}: {m.key}: its factors do not fit together ({str(e).splitlines()[0][:120]}); "
                             "the file is damaged") from None
    return LoraFile(path.stem, path, modules, unsupported, dict(sd.metadata))


# --------------------------------------------------------------------------------------
# Applying and restoring
# --------------------------------------------------------------------------------------

class LoraUse(NamedTuple):
    """One LoRA in a request, with the web UI's separate text-encoder and UNet multipliers."""

    lora: LoraFile
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0
    dyn_dim: int | None = None  # `<lora:NAME:TE:UNET:DYN>`: use only the first DYN ranks


@dataclass
class AppliedLoras:
    """LoRAs merged into a bundle; `restore()` (or leaving the `with` block) puts the
    original weights back, bit for bit."""

    uses: tuple[LoraUse, ...]
    unmatched: dict[str, list[str]]  # LoRA name -> its keys that matched no layer (skipped)
    touched_unet: bool
    touched_text_encoders: bool
    # (parameter, its original tensor). On the CPU that is the original tensor object itself
    # (the merged weights are a new tensor), so restoring is a pointer swap; on an accelerator
    # it is a CPU copy, so the originals do not take accelerator memory while LoRAs are applied.
    _backups: list[tuple[nn.Parameter, Tensor]] = field(default_factory=list, repr=False)

    @property
    def restored(self) -> bool:
        return not self._backups

    @torch.no_grad()
    def restore(self) -> None:
        for param, original in reversed(self._backups):
            param.data = original if original.device == param.device else original.to(param.device)
        self._backups = []

    def __enter__(self) -> AppliedLoras:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _fits(delta: Sequence[int], region: Sequence[int]) -> bool:
    # A Linear LoRA on a 1x1 conv (SD1's proj_in) and LoHa/LoKr conv deltas differ only in
    # how the trailing dimensions are split: same output width and element count is the test.
    return len(delta) > 0 and delta[0] == region[0] and math.prod(delta) == math.prod(region)


def _family_hint(lora: LoraFile) -> str:
    base = lora.base_model
    return f" (its metadata says it was trained on {base})" if base else ""


_Item = tuple[tuple[int, int] | None, LoraModule, float, int | None]  # rows, module, multiplier * scale, dyn_dim


def apply_loras(bundle: Bundle, loras: Iterable[LoraUse | tuple], strict: bool = True) -> AppliedLoras:
    """Merge LoRAs into the bundle's UNet and text encoders: `W += multiplier * scale * dW`.

    Args:
        bundle: the loaded model.
        loras: `LoraUse(lora_file, te_multiplier, unet_multiplier[, dyn_dim])` or plain tuples.
        strict: False for a model the LoRAs were not made for but partly fit (SDXL's refiner
            given the base model's LoRAs, as the web UI applies them): modules whose shape does
            not fit are skipped like unmatched keys, and a LoRA of which nothing fits is no error.

    Every module of every LoRA is matched and shape-checked first; only then is any
    weight changed, so an error leaves the model exactly as it was. Keys that match no
    layer are skipped, logged in one warning per LoRA and listed in `.unmatched`.

    Raises:
        SdlabError: a module whose shape does not fit its layer, or a LoRA none of whose
            modules match (both mean a LoRA for another model family).
    """
    uses = tuple(u if isinstance(u, LoraUse) else LoraUse(*u) for u in loras)
    nets: dict[str, nn.Module] = {"unet": bundle.unet}
    nets.update(zip(_te_nets(bundle.family), bundle.text_encoders))
    index = _bundle_index(bundle)
    label = bundle.family.label

    plan: dict[int, tuple[nn.Parameter, nn.Module, list[_Item]]] = {}  # by id(param), in a stable order
    unmatched: dict[str, list[str]] = {}
    touched = set()
    for use in uses:
        lora = use.lora
        missing = list(lora.unsupported)
        matched = 0
        for m in lora.modules:
            slot = index.get((m.net, m.name))
            if slot is None or m.net not in nets:
                missing.append(m.key)
                continue
            matched += 1
            if slot.swap_halves:
                m = m.halves_swapped()
            param = nets[m.net].get_parameter(slot.param)
            region = param.shape if slot.rows is None else (slot.rows[1] - slot.rows[0], *param.shape[1:])
            shape = m.delta_shape(use.dyn_dim)
            if not _fits(shape, region) and not strict:
                matched -= 1
                missing.append(m.key)
                continue
            if not _fits(shape, region):
                raise SdlabError(
                    f"LoRA {lora.name}: {m.key} has shape {tuple(shape)} but this model's {slot.module} is "
                    f"{tuple(region)}; the LoRA was made for another model family{_family_hint(lora)}, "
                    f"not {label}. Nothing was applied")
            multiplier = use.unet_multiplier if m.net == "unet" else use.te_multiplier
            if multiplier == 0:
                continue
            owner = nets[m.net].get_submodule(slot.param.rpartition(".")[0])
            plan.setdefault(id(param), (param, owner, []))[2].append((slot.rows, m, multiplier * m.scale, use.dyn_dim))
            touched.add("unet" if m.net == "unet" else "te")
        if matched == 0 and strict:
            raise SdlabError(
                f"LoRA {lora.name}: none of its {len(lora.modules)} modules match a layer of this {label} model "
                f"(first: {lora.modules[0].key}); it was made for another model family{_family_hint(lora)}")
        if missing:
            unmatched[lora.name] = missing
            log.warning("LoRA %s: %d keys match no layer of this model and were skipped: %s",
                        lora.name, len(missing), ", ".join(missing))

    applied = AppliedLoras(uses, unmatched, "unet" in touched, "te" in touched)
    try:
        with torch.no_grad():
            for param, owner, items in plan.values():
                original = param.data
                if original.is_mkldnn:  # a convolution weight pre-packed for the CPU (perf.prepare_for_inference)
                    merged = owner.packed_like_self(_merged(original.to_dense(), items))
                else:
                    merged = _merged(original, items)
                backup = original if original.device.type == "cpu" else original.to("cpu", copy=True)
                applied._backups.append((param, backup))
                param.data = merged
    except BaseException:
        applied.restore()  # e.g. out of memory half-way: never leave half-applied weights
        raise
    return applied


def _merged(weight: Tensor, items: list[_Item]) -> Tensor:
    """A new tensor: `weight` plus every delta, summed in fp32 and rounded to the weight's
    dtype once, in `weight`'s memory format (a channels-last conv stays channels-last). `weight`
    itself is not modified."""
    layout = memory_format_of(weight)
    weight = weight.contiguous()  # the deltas are (out, in * kh * kw) matrices: rows of the plain layout
    rows, module, factor, dyn_dim = items[0]
    rest = items[1:]
    if weight.dtype == torch.float32 and rows is None and module.is_low_rank:
        # The common case (fp32, plain LoRA): addmm writes the sum straight into a new tensor.
        work = module.added(weight.view(weight.shape[0], -1), factor, dyn_dim).view(weight.shape)
    else:
        work, rest = weight.to(torch.float32, copy=True), items
    for rows, module, factor, dyn_dim in rest:
        region = work if rows is None else work[rows[0]:rows[1]]
        module.add_to(region.view(region.shape[0], -1), factor, dyn_dim)
    return (work if work.dtype == weight.dtype else work.to(weight.dtype)).contiguous(memory_format=layout)


# --------------------------------------------------------------------------------------
# What the pipeline keeps between requests
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraSpec:
    """A LoRA asked for by a request: `<lora:NAME:TE:UNET:DYN>` with NAME resolved to a file."""

    name: str
    path: Path
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0
    dyn_dim: int | None = None


def lora_specs(networks: Iterable[ExtraNetwork], resolve: Callable[[str], Path]) -> list[LoraSpec]:
    """The LoRA tags of a prompt (`extract_extra_networks`), names resolved with `resolve`
    (e.g. `ModelsDir.resolve_lora`). Other kinds of tag are left out; "lyco" is the web
    UI's old alias of "lora"."""
    return [LoraSpec(n.name, Path(resolve(n.name)), n.te_multiplier, n.unet_multiplier, n.dyn_dim)
            for n in networks if n.kind in ("lora", "lyco")]


class LoraState:
    """The LoRAs currently merged into one bundle. `set()` changes the weights only when
    the requested set differs from the applied one, so repeated requests with the same
    LoRAs cost nothing.

    `te_version` / `unet_version` change whenever the text encoders' / UNet's weights do;
    a conditioning cache keyed on `te_version` is never stale.
    """

    def __init__(self) -> None:
        self.applied: AppliedLoras | None = None
        self.te_version = 0
        self.unet_version = 0
        self._key: tuple = ()
        self._files: dict[Path, tuple[tuple[int, int], LoraFile]] = {}

    def _load(self, path: Path) -> LoraFile:
        stat = path.stat()
        signature = (stat.st_size, stat.st_mtime_ns)
        cached = self._files.get(path)
        if cached is not None and cached[0] == signature:
            return cached[1]
        lora = load_lora(path)
        self._files[path] = (signature, lora)
        return lora

    def set(self, bundle: Bundle, requested: Sequence[LoraSpec], strict: bool = True) -> AppliedLoras | None:
        """Make exactly `requested` be the LoRAs merged into `bundle`.

        Returns the applied set (with `.unmatched`), or None when no LoRA is requested.
        Raises SdlabError from loading or applying; the bundle then holds its original
        weights (no LoRA at all).
        """
        paths = [Path(s.path) for s in requested]
        for spec, path in zip(requested, paths):
            if not path.is_file():
                raise SdlabError(f"LoRA {spec.name}: {path} is not a file")
        key = (id(bundle), strict) + tuple(
            (str(p), p.stat().st_size, p.stat().st_mtime_ns, s.te_multiplier, s.unet_multiplier, s.dyn_dim)
            for s, p in zip(requested, paths))
        if key == self._key:
            return self.applied
        files = [self._load(p) for p in paths]  # a bad file raises before anything changes
        self.clear()
        if requested:
            uses = [LoraUse(f, s.te_multiplier, s.unet_multiplier, s.dyn_dim) for f, s in zip(files, requested)]
            self.applied = apply_loras(bundle, uses, strict)
            self.te_version += self.applied.touched_text_encoders
            self.unet_version += self.applied.touched_unet
        self._key = key
        # Keep parsed files only for what is applied: LoRAs are small, but not that small.
        self._files = {p: self._files[p] for p in paths}
        return self.applied

    def clear(self) -> None:
        """Restore the original weights."""
        if self.applied is not None:
            self.applied.restore()
            self.te_version += self.applied.touched_text_encoders
            self.unet_version += self.applied.touched_unet
        self.applied = None
        self._key = ()
