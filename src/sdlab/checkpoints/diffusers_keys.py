"""Key maps between the native (original single-file) layout and the diffusers /
transformers layout, for the UNet, the VAE and the CLIP text encoders.

Each map is a list of (native prefix, diffusers prefix, kind) built from the
network's config, used in both directions; `kind` names the renaming applied to
what follows the prefix. Tensors whose layout differs (VAE attention 1x1 convs,
OpenCLIP's fused qkv and transposed projection) are reshaped here too.

From diffusers, the conversion is first a plan over the keys and shapes (`unet_plan`,
`vae_plan`, `clip_plan`: native key -> how to make that tensor from the folder's), so
that a reader can make each tensor only when a network takes it, from the memory-mapped
file, and never hold the folder's tensors and their converted copies at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import torch
from torch import Tensor

from ..models.clip import CLIPTextConfig
from ..models.unet import UNetConfig
from ..models.vae import VAEConfig

# Renamings of the part of a key after the block prefix.
_RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
           ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut.")]
_VAE_RESNET = [("nin_shortcut.", "conv_shortcut.")]
_VAE_ATTN = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
_SUFFIX_MAPS = {"plain": [], "resnet": _RESNET, "vae_resnet": _VAE_RESNET, "vae_attn": _VAE_ATTN}

KeyMap = list[tuple[str, str, str]]
_V = TypeVar("_V")
Shapes = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class Derived:
    """How one native tensor is made from tensors of a diffusers file: the first step takes the
    `sources` (their keys in the file), each later step the result of the one before; with no
    steps, the one source is the tensor as it is."""

    sources: tuple[str, ...]
    steps: tuple[Callable[..., Tensor], ...] = ()

    def make(self, tensors: Sequence[Tensor]) -> Tensor:
        if not self.steps:
            (out,) = tensors
            return out
        out = self.steps[0](*tensors)
        for step in self.steps[1:]:
            out = step(out)
        return out

    def then(self, step: Callable[[Tensor], Tensor]) -> Derived:
        return Derived(self.sources, (*self.steps, step))


Plan = dict[str, Derived]  # native key -> how to make its tensor


def apply_plan(plan: Plan, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The native tensors a plan describes, made from the tensors in `sd` at once."""
    return {k: d.make([sd[s] for s in d.sources]) for k, d in plan.items()}


def _shapes(sd: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _renamed(keys: Iterable[str], pairs: KeyMap, what: str) -> Plan:
    """Diffusers keys renamed to native ones, each tensor taken as it is."""
    return {k: Derived((src,)) for k, src in _convert({k: k for k in keys}, pairs, False, what).items()}


# The steps of the plans: named functions, not lambdas, so that a plan prints readably.
def _as_conv1x1(w: Tensor) -> Tensor:
    return w[:, :, None, None]  # diffusers' Linear (C, C) -> the file's 1x1 conv (C, C, 1, 1)


def _concat(*parts: Tensor) -> Tensor:
    return torch.cat(parts, dim=0)


def _transposed(w: Tensor) -> Tensor:
    return w.t().contiguous()


def _identity_like(width: int, like: Tensor) -> Tensor:
    return torch.eye(width, dtype=like.dtype, device=like.device)


def unet_key_map(cfg: UNetConfig) -> KeyMap:
    pairs: KeyMap = [
        ("time_embed.0.", "time_embedding.linear_1.", "plain"), ("time_embed.2.", "time_embedding.linear_2.", "plain"),
        ("input_blocks.0.0.", "conv_in.", "plain"), ("out.0.", "conv_norm_out.", "plain"), ("out.2.", "conv_out.", "plain"),
    ]
    if cfg.adm_in_channels:
        pairs += [("label_emb.0.0.", "add_embedding.linear_1.", "plain"),
                  ("label_emb.0.2.", "add_embedding.linear_2.", "plain")]
    levels = len(cfg.channel_mult)
    block = 1
    for i in range(levels):
        for j in range(cfg.num_res_blocks[i]):
            pairs.append((f"input_blocks.{block}.0.", f"down_blocks.{i}.resnets.{j}.", "resnet"))
            if cfg.transformer_depth[i]:
                pairs.append((f"input_blocks.{block}.1.", f"down_blocks.{i}.attentions.{j}.", "plain"))
            block += 1
        if i < levels - 1:
            pairs.append((f"input_blocks.{block}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.", "plain"))
            block += 1
    pairs.append(("middle_block.0.", "mid_block.resnets.0.", "resnet"))
    if cfg.transformer_depth_middle:
        pairs += [("middle_block.1.", "mid_block.attentions.0.", "plain"),
                  ("middle_block.2.", "mid_block.resnets.1.", "resnet")]
    block = 0
    for i, level in enumerate(reversed(range(levels))):
        has_attn = cfg.transformer_depth[level] > 0
        for j in range(cfg.num_res_blocks[level] + 1):
            pairs.append((f"output_blocks.{block}.0.", f"up_blocks.{i}.resnets.{j}.", "resnet"))
            if has_attn:
                pairs.append((f"output_blocks.{block}.1.", f"up_blocks.{i}.attentions.{j}.", "plain"))
            if level > 0 and j == cfg.num_res_blocks[level]:
                pairs.append((f"output_blocks.{block}.{2 if has_attn else 1}.conv.", f"up_blocks.{i}.upsamplers.0.conv.",
                              "plain"))
            block += 1
    return pairs


def vae_key_map(cfg: VAEConfig) -> KeyMap:
    pairs: KeyMap = [(p, p, "plain") for p in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.",
                                                "decoder.conv_out.", "quant_conv.", "post_quant_conv.")]
    pairs += [("encoder.norm_out.", "encoder.conv_norm_out.", "plain"),
              ("decoder.norm_out.", "decoder.conv_norm_out.", "plain")]
    levels = len(cfg.channel_mult)
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", "vae_resnet"),
                  (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", "vae_resnet"),
                  (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", "vae_attn")]
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", "vae_resnet"))
        if i < levels - 1:
            pairs.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0.", "plain"))
    for i, level in enumerate(reversed(range(levels))):
        for j in range(cfg.num_res_blocks + 1):
            pairs.append((f"decoder.up.{level}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.", "vae_resnet"))
        if level > 0:
            pairs.append((f"decoder.up.{level}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0.", "plain"))
    return pairs


def openclip_key_map(cfg: CLIPTextConfig) -> KeyMap:
    """OpenCLIP text tower -> transformers CLIPTextModel (the fused qkv is handled apart)."""
    tm = "text_model."
    pairs: KeyMap = [("token_embedding.", tm + "embeddings.token_embedding.", "plain"),
                     ("ln_final.", tm + "final_layer_norm.", "plain")]
    for i in range(cfg.layers):
        n, d = f"transformer.resblocks.{i}.", f"{tm}encoder.layers.{i}."
        pairs += [(n + "ln_1.", d + "layer_norm1.", "plain"), (n + "ln_2.", d + "layer_norm2.", "plain"),
                  (n + "mlp.c_fc.", d + "mlp.fc1.", "plain"), (n + "mlp.c_proj.", d + "mlp.fc2.", "plain"),
                  (n + "attn.out_proj.", d + "self_attn.out_proj.", "plain")]
    return pairs


def _rename(key: str, pairs: KeyMap, to_diffusers: bool) -> str | None:
    best = None
    for native, diffusers, kind in pairs:
        src, dst = (native, diffusers) if to_diffusers else (diffusers, native)
        if key.startswith(src) and (best is None or len(src) > len(best[0])):
            best = (src, dst, kind)
    if best is None:
        return None
    src, dst, kind = best
    rest = key[len(src):]
    for a, b in _SUFFIX_MAPS[kind]:
        a, b = (a, b) if to_diffusers else (b, a)
        if rest.startswith(a):
            rest = b + rest[len(a):]
            break
    return dst + rest


def _convert(sd: Mapping[str, _V], pairs: KeyMap, to_diffusers: bool, what: str) -> dict[str, _V]:
    """The entries of `sd` under their renamed keys (the values, tensors or anything else, as they are)."""
    out, unknown = {}, []
    for k, v in sd.items():
        new = _rename(k, pairs, to_diffusers)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        from ..errors import SdlabError
        raise SdlabError(f"{what}: {len(unknown)} unexpected keys, e.g. {', '.join(unknown[:3])}")
    return out


def unet_to_diffusers(sd: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    return _convert(sd, unet_key_map(cfg), True, "UNet")


def unet_plan(shapes: Shapes, cfg: UNetConfig) -> Plan:
    return _renamed(shapes, unet_key_map(cfg), "diffusers UNet")


def unet_from_diffusers(sd: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    return apply_plan(unet_plan(_shapes(sd), cfg), sd)


def _is_vae_attn(key: str) -> bool:
    return ".mid.attn_1." in key or ".mid_block.attentions." in key


def vae_to_diffusers(sd: Mapping[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    out = _convert(sd, vae_key_map(cfg), True, "VAE")
    # diffusers stores the attention projections as Linear layers.
    return {k: (v.flatten(1) if _is_vae_attn(k) and v.ndim == 4 else v) for k, v in out.items()}


def vae_plan(shapes: Shapes, cfg: VAEConfig) -> Plan:
    plan = _renamed(shapes, vae_key_map(cfg), "diffusers VAE")
    return {k: (d.then(_as_conv1x1) if _is_vae_attn(k) and len(shapes[d.sources[0]]) == 2 else d)
            for k, d in plan.items()}


def vae_from_diffusers(sd: Mapping[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    return apply_plan(vae_plan(_shapes(sd), cfg), sd)


def clip_to_diffusers(sd: Mapping[str, Tensor], cfg: CLIPTextConfig, drop_last_layer: bool = False) -> dict[str, Tensor]:
    """Native text encoder -> transformers CLIPTextModel(WithProjection) keys.

    `drop_last_layer` writes SD 2.x the way diffusers does: its pipelines read the
    last hidden state, so the folder holds the layers up to the penultimate one.
    """
    if cfg.layout == "openai":
        return {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    layers = cfg.layers - 1 if drop_last_layer else cfg.layers
    out = {}
    for k, v in _convert({k: v for k, v in sd.items() if k not in _OPENCLIP_SPECIAL and ".attn.in_proj_" not in k},
                         openclip_key_map(cfg), True, "text encoder").items():
        if not _layer_dropped(k, layers):
            out[k] = v
    out["text_model.embeddings.position_embedding.weight"] = sd["positional_embedding"]
    for i in range(layers):
        for kind in ("weight", "bias"):
            q, k_, v_ = sd[f"transformer.resblocks.{i}.attn.in_proj_{kind}"].chunk(3, dim=0)
            base = f"text_model.encoder.layers.{i}.self_attn."
            out[base + f"q_proj.{kind}"], out[base + f"k_proj.{kind}"], out[base + f"v_proj.{kind}"] = q, k_, v_
    if "text_projection" in sd:
        out["text_projection.weight"] = sd["text_projection"].t().contiguous()
    return out


_OPENCLIP_SPECIAL = ("positional_embedding", "text_projection", "logit_scale")


def _layer_dropped(key: str, layers: int) -> bool:
    parts = key.split(".")
    return len(parts) > 3 and parts[1] == "encoder" and parts[2] == "layers" and int(parts[3]) >= layers


def clip_plan(shapes: Shapes, layout: str, append_identity_layer: bool = False) -> Plan:
    """transformers CLIPTextModel(WithProjection) keys -> native text encoder.

    `append_identity_layer` restores SD 2.x's 24-layer OpenCLIP layout from a diffusers
    folder that holds 23 layers: the added last layer has zero output projections, so it
    is an exact identity and "penultimate layer + ln_final" (what SD 2.x conditions on)
    equals the folder's last hidden state. The file then loads in every tool that
    expects the released layout.
    """
    # transformers 5 writes CLIPTextModel keys without the `text_model.` level; files from
    # earlier versions (and the hub) have it. Accept both: `names` maps the full name to the file's.
    names = {("text_model." + k if k.startswith(("embeddings.", "encoder.", "final_layer_norm.")) else k): k
             for k in shapes if not k.endswith("position_ids")}
    if layout == "openai":
        return {k: Derived((src,)) for k, src in names.items()}
    n_layers = 1 + max(int(k.split(".")[3]) for k in names if k.startswith("text_model.encoder.layers."))
    width = shapes[names["text_model.embeddings.token_embedding.weight"]][1]
    cfg = CLIPTextConfig(layout="openclip", width=width, layers=n_layers, heads=max(1, width // 64),
                         mlp_width=shapes[names["text_model.encoder.layers.0.mlp.fc1.weight"]][0], activation="gelu")
    position = names["text_model.embeddings.position_embedding.weight"]
    rest = {k: src for k, src in names.items() if "self_attn.q_proj" not in k and "self_attn.k_proj" not in k
            and "self_attn.v_proj" not in k and k not in ("text_model.embeddings.position_embedding.weight",
                                                            "text_projection.weight")}
    renamed = _convert(rest, openclip_key_map(cfg), False, "diffusers text encoder")
    plan = {k: Derived((src,)) for k, src in renamed.items()}
    plan["positional_embedding"] = Derived((position,))
    for i in range(n_layers):
        base = f"text_model.encoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            plan[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = Derived(
                tuple(names[base + f"{p}_proj.{kind}"] for p in "qkv"), (_concat,))
    if "text_projection.weight" in names:
        plan["text_projection"] = Derived((names["text_projection.weight"],), (_transposed,))
    else:
        # SD 2.x never uses the pooled output; an identity keeps the released key set.
        plan["text_projection"] = Derived((position,), (partial(_identity_like, width),))
    if append_identity_layer:
        src, dst = f"transformer.resblocks.{n_layers - 1}.", f"transformer.resblocks.{n_layers}."
        for k in [k for k in plan if k.startswith(src)]:
            zero = k.endswith(("attn.out_proj.weight", "attn.out_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"))
            plan[dst + k[len(src):]] = plan[k].then(torch.zeros_like if zero else torch.clone)
    return plan


def clip_from_diffusers(sd: Mapping[str, Tensor], layout: str, append_identity_layer: bool = False) -> dict[str, Tensor]:
    return apply_plan(clip_plan(_shapes(sd), layout, append_identity_layer), sd)
