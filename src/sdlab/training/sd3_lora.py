"""An SD3 LoRA in the two layouts users load: kohya's (`networks/lora_sd3.py`) and diffusers / PEFT.

The MMDiT stores q, k and v fused (`joint_blocks.N.x_block.attn.qkv`, 3 x hidden rows) and kohya
trains one LoRA on that fused layer, as sdlab does: `lora_down` (r, D), `lora_up` (3D, r), scale
alpha / r. diffusers' `SD3Transformer2DModel` has separate `attn.to_q`, `to_k`, `to_v` (the context
stream's `attn.add_q_proj`, ...), so its files hold one LoRA per projection.

- kohya -> diffusers is exact, at the same rank: the fused update `up @ down` has the row blocks
  `up[q] @ down`, `up[k] @ down`, `up[v] @ down`, so each of to_q / to_k / to_v gets
  `lora_A = lora_down` and `lora_B = its rows of lora_up`. The scale alpha / r is folded into
  `lora_B`, so the file reads right with PEFT's default `lora_alpha = r` (diffusers' own training
  script writes that too) in every tool, and no alpha key is needed.
- diffusers -> kohya: where to_q, to_k and to_v share one `lora_A` (files written as above), the
  fused LoRA is `down = lora_A`, `up = [B_q; B_k; B_v]` at rank r again. Otherwise their factors
  are stacked as kohya's `split_qkv` saves them: `down = [A_q; A_k; A_v]` (3r, D) and `up`
  block-diagonal (3D, 3r), which is the same update at rank 3r.

Two adaLN layers are stored with their halves in the other order by diffusers (the last context
block's and the final layer's: (scale, shift) there, (shift, scale) here): their `lora_B` rows are
swapped on the way.

The text encoders' LoRAs keep their transformers paths: kohya's `lora_te1_` (CLIP-L) and `lora_te2_`
(CLIP-G) are diffusers' `text_encoder.` and `text_encoder_2.`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..errors import SdlabError
from ..lora import LoraFile, _mmdit_diffusers_names, _mmdit_swapped_names
from ..models.mmdit import MMDiTConfig

UNET, TE_PREFIXES = "lora_unet_", {"lora_te1_": "text_encoder.", "lora_te2_": "text_encoder_2."}
LORA_FORMATS = ("kohya", "diffusers")


def _swap(t: Tensor) -> Tensor:
    return torch.cat(t.chunk(2)[::-1])


def _unet_table(cfg: MMDiTConfig) -> dict[str, list[tuple[str, tuple[int, int] | None, bool]]]:
    """kohya module name -> [(diffusers module path, rows of the fused layer or None, halves swapped)]."""
    table: dict[str, list[tuple[str, tuple[int, int] | None, bool]]] = {}
    for diffusers, native, rows in _mmdit_diffusers_names(cfg):
        table.setdefault(UNET + native.replace(".", "_"), []).append((diffusers, rows, False))
    for diffusers, native in _mmdit_swapped_names(cfg):
        table.setdefault(UNET + native.replace(".", "_"), []).append((diffusers, None, True))
    return table


def to_diffusers(kohya: Mapping[str, Tensor], cfg: MMDiTConfig, te_paths: Mapping[str, str]) -> dict[str, Tensor]:
    """A kohya SD3 LoRA (`lora_down` / `lora_up` / `alpha`) in diffusers' PEFT layout
    (`transformer.<module>.lora_A.weight`, `lora_B.weight`; `text_encoder[_2].<module>...`).

    Args:
        kohya: the tensors of a kohya file.
        cfg: the MMDiT's config (its depth and width name the modules).
        te_paths: kohya text-encoder name -> the module's transformers path, e.g.
            `lora_te1_text_model_encoder_layers_0_self_attn_q_proj` -> `text_model.encoder.layers.0.self_attn.q_proj`.

    Raises:
        SdlabError: a module this layout has no name for.
    """
    table = _unet_table(cfg)
    out: dict[str, Tensor] = {}
    for key in kohya:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        down, up = kohya[key], kohya[f"{name}.lora_up.weight"]
        alpha = kohya.get(f"{name}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        b = (up.float() * scale).to(up.dtype)  # the scale folded in: PEFT's lora_alpha = r reads it right
        if name.startswith(UNET):
            if name not in table:
                raise SdlabError(f"{name}: no diffusers name for this MMDiT module; save with lora_format = \"kohya\"")
            for path, rows, swapped in table[name]:
                part = b if rows is None else b[rows[0]:rows[1]]
                out[f"transformer.{path}.lora_A.weight"] = down
                out[f"transformer.{path}.lora_B.weight"] = _swap(part) if swapped else part
            continue
        prefix = next((p for p in TE_PREFIXES if name.startswith(p)), None)
        if prefix is None or name not in te_paths:
            raise SdlabError(f"{name}: not an SD3 LoRA module diffusers has a name for")
        out[f"{TE_PREFIXES[prefix]}{te_paths[name]}.lora_A.weight"] = down
        out[f"{TE_PREFIXES[prefix]}{te_paths[name]}.lora_B.weight"] = b
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in out.items()}  # one storage each


def to_kohya(lora: LoraFile, cfg: MMDiTConfig) -> tuple[dict[str, Tensor], list[str]]:
    """A LoRA file read by `lora.load_lora` (diffusers / PEFT or kohya names) as kohya SD3 tensors
    on the fused layers (see the module's doc), each with the alpha that keeps its scale; and the
    keys of modules that are not plain LoRAs on the MMDiT or the two CLIPs (left out)."""
    table = _unet_table(cfg)
    by_diffusers = {path: (name, rows, swapped) for name, parts in table.items() for path, rows, swapped in parts}
    fused: dict[str, dict[tuple[int, int] | None, tuple[Tensor, Tensor]]] = {}
    out: dict[str, Tensor] = {}
    left_out = list(lora.unsupported)
    te_prefix = {"te0": "lora_te1_", "te1": "lora_te2_"}
    for m in lora.modules:
        if m.kind != "lora" or "lora_mid.weight" in m.tensors:
            left_out.append(m.key)
            continue
        down, up = m.tensors["lora_down.weight"], m.tensors["lora_up.weight"]
        b = (up.float() * m.scale).to(up.dtype)  # every module here gets scale 1 (alpha = rank)
        if m.net == "unet" and m.name in by_diffusers:
            name, rows, swapped = by_diffusers[m.name]
            fused.setdefault(name, {})[rows] = (down, _swap(b) if swapped else b)
        elif (m.net == "unet" and (UNET + m.name) in table) or m.net in te_prefix:
            name = (UNET if m.net == "unet" else te_prefix[m.net]) + m.name.replace(".", "_")
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, b
            out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
        else:
            left_out.append(m.key)
    for name, parts in fused.items():
        if None in parts:  # a layer that is not split (proj, mlp, adaLN)
            down, up = parts[None]
        else:
            down, up = _fuse_qkv(parts, cfg.hidden_size)
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out, left_out


def _fuse_qkv(parts: Mapping[tuple[int, int], tuple[Tensor, Tensor]], width: int) -> tuple[Tensor, Tensor]:
    """One LoRA on the fused qkv from LoRAs on its row blocks (q, k, v; any may be missing)."""
    thirds = [(0, width), (width, 2 * width), (2 * width, 3 * width)]
    downs = [parts[r][0] for r in thirds if r in parts]
    if len(parts) == 3 and all(torch.equal(d, downs[0]) for d in downs):
        return downs[0], torch.cat([parts[r][1] for r in thirds])  # one shared lora_A: rank r
    # kohya's split_qkv layout: the factors stacked, up block-diagonal (a missing block is zero).
    down = torch.cat(downs)
    up = torch.zeros(3 * width, down.shape[0], dtype=down.dtype)
    col = 0
    for rows in thirds:
        if rows in parts:
            d, u = parts[rows]
            up[rows[0]:rows[1], col:col + d.shape[0]] = u.to(up.dtype)
            col += d.shape[0]
    return down, up
