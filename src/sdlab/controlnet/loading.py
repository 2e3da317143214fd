"""Reading the ControlNet files users have into `models.controlnet.ControlNet`.

The kinds (`control_kind` names them; `inspect_control_file(...).describe()` is the line for `sdlab info`):

- "controlnet": the original layout (lllyasviel's ControlNet 1.0 / 1.1, thibaud's SD 2.1, the
  SDXL files in sgm naming), keys with or without `control_model.`; a full SD checkpoint with
  a ControlNet inside (the 1.0 `control_sd15_*.pth`) loads its `control_model.` part.
- "controlnet-diffusers": diffusers' ControlNetModel keys, as a folder (config.json +
  diffusion_pytorch_model[.fp16].safetensors) or a single file (the `diffusers_xl_*` files).
- "controlnet-diff": "diff" ControlNets (a `difference` key): the layers copied from the UNet are
  stored as differences from the model they were trained on, and are added back onto the loaded
  UNet's weights, so the control follows that fine-tune (the extension's extract_controlnet_diff.py).
- "control-lora": Stability's Control-LoRA (a `lora_controlnet` key): the layers shared with the
  UNet are the loaded UNet's weight plus up @ down; the rest is stored whole.
- "t2i-adapter": TencentARC's T2I-Adapters (full, light, SDXL's full_xl), original or diffusers
  keys, file or folder (`t2i_adapters`); they load into `models.t2i_adapter.T2IAdapter`. The
  style adapter is named and refused.

Heads are not in the shapes: an SD 1.x ControlNet (1x1-conv projections) has 8, SD 2.x and SDXL
64 channels per head (the families' rules); a diffusers folder's config.json says it outright.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from sdlab.checkpoints.diffusers_keys import unet_plan, unet_to_diffusers
from sdlab.checkpoints.io import StateDict, read_state_dict
from sdlab.controlnet.t2i_adapters import adapter_file_info, t2i_adapter_from_state_dict
from sdlab.errors import SdlabError
from sdlab.models.controlnet import ControlNet, ControlNetConfig, config_from_state_dict
from sdlab.models.t2i_adapter import T2IAdapter
from sdlab.models.unet import UNet, UNetConfig

log = logging.getLogger(__name__)

ControlKind = Literal["controlnet", "controlnet-diffusers", "controlnet-diff", "control-lora", "t2i-adapter"]
BaseFamily = Literal["sd1", "sd2", "sdxl"]

PREFIX = "control_model."  # the released files' prefix (ControlNet 1.1 .pth / .safetensors)
_ENCODER = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")  # the UNet's parts a ControlNet copies
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
_KIND_NAMES = {
    "controlnet": "ControlNet",
    "controlnet-diffusers": "ControlNet (diffusers layout)",
    "controlnet-diff": "\"diff\" ControlNet",
    "control-lora": "Control-LoRA",
    "t2i-adapter": "T2I-Adapter",
}
_FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def control_kind(keys: Mapping[str, object] | list[str] | set[str]) -> ControlKind | None:
    """The kind of control-model file these keys belong to, or None for none (a pure function of the keys)."""
    keys = set(keys)
    if "lora_controlnet" in keys:
        return "control-lora"
    if "difference" in keys:
        return "controlnet-diff"
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return "controlnet-diffusers"
    if "input_hint_block.0.weight" in keys or PREFIX + "input_hint_block.0.weight" in keys:
        return "controlnet"
    # T2I-Adapters: the original full / light / style layouts and diffusers' T2IAdapter.
    if ({"conv_in.weight", "body.0.block1.weight"} <= keys or "body.0.in_conv.weight" in keys
            or "style_embedding" in keys or any(k.startswith("adapter.body.0.") for k in keys)):
        return "t2i-adapter"
    return None


@dataclass(frozen=True)
class ControlFileInfo:
    kind: ControlKind
    family: BaseFamily | None  # the base model family it was trained on (None: not known from the keys)
    variant: str | None  # SDXL ControlNets: "full", "mid" or "small"; T2I-Adapters: "full", "full_xl", "light", "style"

    def describe(self) -> str:
        """One line for `sdlab info`, e.g. "ControlNet for SD 1.x"."""
        text = _KIND_NAMES[self.kind]
        if self.family:
            text += f" for {_FAMILY_NAMES[self.family]}"
        if self.variant and self.variant not in ("full", "full_xl"):
            text += f" ({self.variant}{', not supported' if self.variant == 'style' else ''})"
        return text


def inspect_control_file(path: str | Path) -> ControlFileInfo:
    """What a control-model file (or diffusers ControlNet folder) is, from its keys and shapes alone.

    Raises:
        SdlabError: the file is not a control model this code knows.
    """
    path = Path(path)
    sd, _ = _open(path)
    return _info(sd.shapes if isinstance(sd, StateDict) else {k: tuple(v.shape) for k, v in sd.items()}, path)


def control_file_info(shapes: Mapping[str, Sequence[int]]) -> ControlFileInfo:
    """`inspect_control_file` on a state dict's key -> shape (tensors or tuples), a pure function.

    Raises:
        SdlabError: not a control model this code knows.
    """
    return _info({k: tuple(v.shape if isinstance(v, Tensor) else v) for k, v in shapes.items()}, Path("the file"))


def load_controlnet(path: str | Path, *, unet: UNet | None = None, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", latent_factor: int = 8) -> ControlNet | T2IAdapter:
    """Load any ControlNet or T2I-Adapter file, or diffusers ControlNet / T2IAdapter folder, into
    our network.

    Args:
        path: a .safetensors / .pth / .ckpt / .bin file, or a folder with config.json.
        unet: the loaded model's UNet; required for "diff" ControlNets and Control-LoRAs, whose
            weights are made from it, and used to refuse a ControlNet of another family.
        dtype: floating-point dtype of the weights (float32 by default, whatever the file stores).
        device: where the network is built.
        latent_factor: the model's VAE factor (8; the tiny test models' 4): a T2I-Adapter's pixel
            unshuffle is read against it.

    Raises:
        SdlabError: the file is not a ControlNet, is damaged, needs `unet` and has none, or was
            made for another model family than `unet`'s.
    """
    path = Path(path)
    sd, config_json = _open(path)
    return controlnet_from_state_dict(sd, unet=unet, config_json=config_json, name=path.name, dtype=dtype,
                                      device=device, latent_factor=latent_factor)


def controlnet_from_state_dict(sd: Mapping[str, Tensor], *, unet: UNet | None = None,
                               config_json: dict | None = None, name: str = "<state dict>",
                               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                               latent_factor: int = 8) -> ControlNet | T2IAdapter:
    """`load_controlnet` on tensors already read (any of the layouts it takes).

    Args:
        sd: the file's tensors.
        unet: as for `load_controlnet`.
        config_json: a diffusers ControlNetModel config.json, when there is one (it gives the heads).
        name: the file name: shown in messages; "shuffle" in it turns on global average pooling
            of the residuals, as the web UI's extension does for the SD 1.5 shuffle model.
        dtype, device, latent_factor: as for `load_controlnet`.
    """
    shapes = sd.shapes if isinstance(sd, StateDict) else {k: tuple(v.shape) for k, v in sd.items()}
    info = _info(shapes, Path(name))
    if unet is not None and not isinstance(unet, UNet):
        raise SdlabError(f"{name}: ControlNets and T2I-Adapters guide the UNet models (SD 1.x, 2.x, SDXL); this "
                         "model has none")
    if info.kind == "t2i-adapter":
        return t2i_adapter_from_state_dict(sd, shapes, unet=None if unet is None else unet.cfg,
                                           latent_factor=latent_factor, config_json=config_json, name=name,
                                           dtype=dtype, device=device)
    if config_json is not None and config_json.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise SdlabError(f"{name}: config.json names a {config_json.get('_class_name')}, the weights a ControlNet")
    if info.kind in ("controlnet-diff", "control-lora") and unet is None:
        raise SdlabError(f"{name}: a {_KIND_NAMES[info.kind]} is made from the loaded model's UNet weights; "
                         "load a checkpoint first")

    # Native keys (no prefix), as lazy names: tensors are read once, when the network takes them.
    if info.kind == "controlnet-diffusers":
        names = controlnet_keys_from_diffusers(shapes)
    else:
        stripped = _strip_prefix(list(shapes))
        names = {k: src for k, src in stripped.items() if k not in ("difference", "lora_controlnet")}
    native_shapes = {k: shapes[src] for k, src in names.items()}
    if info.kind == "control-lora":
        native_shapes = _lora_weight_shapes(native_shapes)
    if info.kind in ("controlnet-diff", "control-lora"):
        # Layers the file leaves out are the UNet's own (a diff file skips those training left unchanged).
        base = {k: tuple(v.shape) for k, v in unet.state_dict().items() if k.startswith(_ENCODER)}
        native_shapes = base | native_shapes
    cfg = _config(native_shapes, info, config_json, name)
    if "shuffle" in Path(name).stem.lower() and info.family != "sdxl":
        cfg = replace(cfg, global_average_pooling=True)
    if unet is not None:
        check_compatible(cfg, unet.cfg, name)

    with torch.device("meta"):
        net = ControlNet(cfg)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}

    def read(key: str, as_dtype: torch.dtype) -> Tensor:  # one tensor, cast as it is read
        return sd.read(names[key], as_dtype) if isinstance(sd, StateDict) else sd[names[key]].to(as_dtype)

    # Each weight is made in float32 and cast at once, so no second full copy of the network is held.
    if info.kind == "controlnet-diff":
        tensors = _diff_weights(expected, names, read, unet, name, dtype)
    elif info.kind == "control-lora":
        tensors = _control_lora_weights(expected, names, read, unet, name, dtype)
    else:
        tensors = {k: read(k, dtype) for k in names}
    return _load(net, tensors, expected, name, dtype, device)


def check_compatible(cfg: ControlNetConfig, unet: UNetConfig, name: str = "the ControlNet") -> None:
    """Refuse a ControlNet whose residuals cannot go into this UNet (another family or size).

    Raises:
        SdlabError: one line naming both.
    """
    c = cfg.unet
    mine, theirs = _family_of(c), _family_of(unet)
    same = (c.model_channels, c.channel_mult, c.num_res_blocks) == (unet.model_channels, unet.channel_mult,
                                                                  unet.num_res_blocks)
    if not same or (c.adm_in_channels is None) != (unet.adm_in_channels is None):
        raise SdlabError(f"{name} is a ControlNet for {_FAMILY_NAMES[mine]} and cannot control this "
                         f"{_FAMILY_NAMES[theirs]} model; choose a ControlNet made for {_FAMILY_NAMES[theirs]}")
    attends = any(c.transformer_depth) or c.transformer_depth_middle
    if attends and c.context_dim != unet.context_dim:
        raise SdlabError(f"{name} reads text tokens {c.context_dim} wide and this model's are {unet.context_dim} "
                         f"(a ControlNet for {_FAMILY_NAMES[mine]} on a {_FAMILY_NAMES[theirs]} model); "
                         f"choose a ControlNet made for {_FAMILY_NAMES[theirs]}")


# ---------------------------------------------------------------------------------------------
# Diffusers keys


_HINT_BLOCK = re.compile(r"controlnet_cond_embedding\.blocks\.(\d+)\.")
_ZERO_CONV = re.compile(r"controlnet_down_blocks\.(\d+)\.")


def _structure(keys: list[str]) -> UNetConfig:
    """A UNetConfig with the block structure of diffusers ControlNet keys (levels, ResBlocks per
    level, which levels and whether the middle attend, SDXL's vector input): all that the key
    names depend on. Widths and depths are placeholders; the real config is read off the shapes
    of the renamed keys."""
    levels = 1 + max((int(k.split(".")[1]) for k in keys if k.startswith("down_blocks.")), default=-1)
    if levels == 0:
        raise SdlabError("diffusers ControlNet keys without down_blocks: a truncated or damaged file?")
    res = [len({k.split(".")[3] for k in keys if k.startswith(f"down_blocks.{i}.resnets.")}) for i in range(levels)]
    attn = [int(any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys)) for i in range(levels)]
    try:
        return UNetConfig(model_channels=1, channel_mult=(1,) * levels, num_res_blocks=tuple(res),
                          transformer_depth=tuple(attn),
                          transformer_depth_middle=int(any(k.startswith("mid_block.attentions.") for k in keys)),
                          num_heads=1, context_dim=1, norm_groups=1,
                          adm_in_channels=1 if "add_embedding.linear_1.weight" in keys else None)
    except ValueError as e:
        raise SdlabError(f"diffusers ControlNet keys of an unexpected layout ({e})") from e


def controlnet_keys_from_diffusers(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """Our (original-layout) key -> the diffusers ControlNetModel key it is read as it is from.

    Raises:
        SdlabError: a key that is not part of a ControlNetModel.
    """
    keys = list(shapes)
    specific = [k for k in keys if k.startswith("controlnet_")]
    plan = unet_plan({k: shapes[k] for k in keys if not k.startswith("controlnet_")}, _structure(keys))
    names = {}
    for native, derived in plan.items():
        (names[native],) = derived.sources  # the UNet's renaming takes every tensor as it is
    blocks = 1 + max((int(m.group(1)) for k in specific if (m := _HINT_BLOCK.match(k))), default=-1)
    for k in specific:
        rest = k.split(".")[-1]
        if k.startswith("controlnet_cond_embedding.conv_in."):
            native = f"input_hint_block.0.{rest}"
        elif k.startswith("controlnet_cond_embedding.conv_out."):
            native = f"input_hint_block.{2 * (blocks + 1)}.{rest}"
        elif m := _HINT_BLOCK.match(k):
            native = f"input_hint_block.{2 * (int(m.group(1)) + 1)}.{rest}"
        elif m := _ZERO_CONV.match(k):
            native = f"zero_convs.{m.group(1)}.0.{rest}"
        elif k.startswith("controlnet_mid_block."):
            native = f"middle_block_out.0.{rest}"
        else:
            raise SdlabError(f"diffusers ControlNet: unexpected key {k}")
        names[native] = k
    return names


def controlnet_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict (no prefix) under diffusers ControlNetModel keys: the inverse of
    `controlnet_keys_from_diffusers`, for writing a diffusers-layout file."""
    specific = {k: v for k, v in sd.items() if k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out."))}
    encoder = {k: v for k, v in sd.items() if k not in specific}
    levels_cfg = _native_structure(list(sd))
    out = unet_to_diffusers(encoder, levels_cfg)
    hint = sorted({int(k.split(".")[1]) for k in specific if k.startswith("input_hint_block.")})
    for k, v in specific.items():
        parts = k.split(".")
        if parts[0] == "input_hint_block":
            i = int(parts[1])
            target = ("conv_in" if i == 0 else "conv_out" if i == hint[-1] else f"blocks.{i // 2 - 1}")
            out[f"controlnet_cond_embedding.{target}.{parts[-1]}"] = v
        elif parts[0] == "zero_convs":
            out[f"controlnet_down_blocks.{parts[1]}.{parts[-1]}"] = v
        else:
            out[f"controlnet_mid_block.{parts[-1]}"] = v
    return out


def _native_structure(keys: list[str]) -> UNetConfig:
    """As `_structure`, from original-layout keys."""
    present = set(keys)
    levels: list[list[bool]] = [[]]
    i = 1
    while True:
        if f"input_blocks.{i}.0.op.weight" in present:
            levels.append([])
        elif f"input_blocks.{i}.0.in_layers.0.weight" in present:
            levels[-1].append(any(k.startswith(f"input_blocks.{i}.1.") for k in keys))
        else:
            break
        i += 1
    return UNetConfig(model_channels=1, channel_mult=(1,) * len(levels), num_res_blocks=tuple(map(len, levels)),
                      transformer_depth=tuple(int(any(level)) for level in levels),
                      transformer_depth_middle=int(any(k.startswith("middle_block.1.") for k in keys)),
                      num_heads=1, context_dim=1, norm_groups=1,
                      adm_in_channels=1 if "label_emb.0.0.weight" in present else None)


# ---------------------------------------------------------------------------------------------
# Helpers


def _open(path: Path) -> tuple[Mapping[str, Tensor], dict | None]:
    if not path.exists():
        raise SdlabError(f"{path}: no such file or folder")
    if not path.is_dir():
        return read_state_dict(path), None
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise SdlabError(f"{path}: a folder without config.json; give a ControlNet file or a diffusers "
                         "ControlNetModel folder") from None
    except json.JSONDecodeError as e:
        raise SdlabError(f"{config_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if config.get("_class_name", "ControlNetModel") not in ("ControlNetModel", "T2IAdapter"):
        raise SdlabError(f"{path}: a diffusers {config.get('_class_name')} folder, not a ControlNetModel or "
                         "T2IAdapter")
    for stem in _WEIGHT_STEMS:
        for suffix in (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin"):
            index = path / f"{stem}{suffix}.index.json"
            if index.exists():
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                shards = [read_state_dict(path / f) for f in files]
                owner = {k: shard for shard in shards for k in shard.shapes}
                return StateDict(path, {k: s.shapes[k] for k, s in owner.items()},
                                 {k: s.dtypes[k] for k, s in owner.items()},
                                 lambda key, dtype: owner[key].read(key, dtype)), config
            if (path / f"{stem}{suffix}").exists():
                return read_state_dict(path / f"{stem}{suffix}"), config
    raise SdlabError(f"{path}: no weights found (expected diffusion_pytorch_model.safetensors)")


def _strip_prefix(keys: list[str]) -> dict[str, str]:
    """Native key -> file key: the `control_model.` part when the file has one (a full SD
    checkpoint with a ControlNet inside has other parts too), else every key."""
    if any(k.startswith(PREFIX) for k in keys):
        return {k[len(PREFIX):]: k for k in keys if k.startswith(PREFIX)}
    return {k: k for k in keys}


def _info(shapes: Mapping[str, tuple[int, ...]], path: Path) -> ControlFileInfo:
    kind = control_kind(shapes)
    if kind is None:
        raise SdlabError(f"{path}: not a ControlNet or T2I-Adapter file (no input_hint_block, "
                         "controlnet_cond_embedding or adapter weights)")
    if kind == "t2i-adapter":
        return ControlFileInfo(kind, *adapter_file_info(shapes))
    if kind == "controlnet-diffusers":
        native = {k: shapes[src] for k, src in controlnet_keys_from_diffusers(shapes).items()}
    else:
        native = {k: shapes[src] for k, src in _strip_prefix(list(shapes)).items()}
    if kind == "control-lora":
        native = _lora_weight_shapes(native)
    family: BaseFamily
    if "label_emb.0.0.weight" in native:
        family = "sdxl"
    else:
        proj_in = next((s for k, s in native.items() if k.endswith(".proj_in.weight")), None)
        family = "sd2" if proj_in is not None and len(proj_in) == 2 else "sd1"
    variant = None
    if family == "sdxl":
        depth = max((int(k.split(".")[4]) + 1 for k in native
                     if re.match(r"input_blocks\.\d+\.1\.transformer_blocks\.\d+\.", k)), default=0)
        variant = "full" if depth >= 10 else "mid" if depth > 0 else "small"
    return ControlFileInfo(kind, family, variant)


def _family_of(cfg: UNetConfig) -> BaseFamily:
    if cfg.adm_in_channels is not None:
        return "sdxl"
    return "sd2" if cfg.use_linear_in_transformer else "sd1"


def _heads(info: ControlFileInfo, config_json: dict | None, shapes: Mapping[str, tuple[int, ...]]) -> dict:
    if config_json is not None:
        heads = config_json.get("num_attention_heads") or config_json.get("attention_head_dim", 8)
        if isinstance(heads, (list, tuple)):
            widths = config_json.get("block_out_channels", ())
            per_head = {w // h for w, h in zip(widths, heads) if h}
            if len(per_head) == 1:
                return {"num_head_channels": per_head.pop()}
            # Levels without attention may list any count: take the widest level's (the middle's).
            return {"num_head_channels": widths[-1] // heads[-1]}
        return {"num_heads": int(heads)}
    return {"num_heads": 8} if info.family == "sd1" else {"num_head_channels": 64}


def _config(shapes: Mapping[str, tuple[int, ...]], info: ControlFileInfo, config_json: dict | None,
            name: str) -> ControlNetConfig:
    try:
        cfg = config_from_state_dict(shapes, **_heads(info, config_json, shapes))
    except SdlabError as e:
        raise SdlabError(f"{name}: {e}") from None
    if config_json is not None and config_json.get("norm_num_groups", 32) != cfg.unet.norm_groups:
        # Not in the shapes; 32 in every released ControlNet, but a config.json can say otherwise.
        try:
            cfg = replace(cfg, unet=replace(cfg.unet, norm_groups=int(config_json["norm_num_groups"])))
        except ValueError as e:
            raise SdlabError(f"{name}: config.json's norm_num_groups does not fit the weights ({e})") from None
    return cfg


def _lora_weight_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Control-LoRA shapes with each `<layer>.up` / `<layer>.down` pair seen as the `<layer>.weight`
    it makes: (up's rows, *down's other dimensions)."""
    out = {k: v for k, v in shapes.items() if not k.endswith((".up", ".down"))}
    for k, up in shapes.items():
        if k.endswith(".up") and k[:-3] + ".down" in shapes:
            out[k[:-3] + ".weight"] = (up[0], *shapes[k[:-3] + ".down"][1:])
    return out


def _base_weights(unet: UNet, expected: Mapping[str, tuple[int, ...]], name: str) -> dict[str, Tensor]:
    """The UNet's weights under the ControlNet's keys they were copied to (the encoder's)."""
    base = unet.state_dict()
    out = {}
    for k, shape in expected.items():
        if k in base:
            if tuple(base[k].shape) != shape:
                raise SdlabError(f"{name}: its {k} is {shape}, the loaded model's {tuple(base[k].shape)}; "
                                 "it was made for another model family")
            out[k] = base[k]
    return out


def _diff_weights(expected, names, read, unet: UNet, name: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """file + UNet for the layers copied from the UNet (the UNet's own where the file has none:
    the extraction leaves out layers training did not change), the file's for the rest."""
    base = _base_weights(unet, expected, name)
    tensors = {}
    for k in base.keys() | names.keys():
        if k in base:
            w = base[k].float()
            tensors[k] = (read(k, torch.float32) + w if k in names else w).to(dtype)
        else:
            tensors[k] = read(k, dtype)
    return tensors


def _control_lora_weights(expected, names, read, unet: UNet, name: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """The file's whole tensors; UNet weight + up @ down for its LoRA pairs; the UNet's own for
    the rest of the layers copied from it."""
    base = _base_weights(unet, expected, name)
    lora = {k[:-3] + ".weight" for k in names if k.endswith(".up")}
    tensors = {k: w.to(dtype) for k, w in base.items() if k not in names and k not in lora}
    for k in names:
        if k.endswith(".down"):
            continue
        if not k.endswith(".up"):
            tensors[k] = read(k, dtype)
            continue
        layer = k[:-3]
        if layer + ".weight" not in base:
            raise SdlabError(f"{name}: a LoRA on {layer}, which the loaded model does not have")
        w = base[layer + ".weight"]
        up, down = read(k, torch.float32), read(layer + ".down", torch.float32)
        tensors[layer + ".weight"] = (w.float() + (up.flatten(1) @ down.flatten(1)).reshape(w.shape)).to(dtype)
    return tensors


def _load(net: ControlNet, tensors: dict[str, Tensor], expected: Mapping[str, tuple[int, ...]], name: str,
          dtype: torch.dtype, device: str | torch.device) -> ControlNet:
    """`net` (built on the meta device) with `tensors` as its weights, after checking them."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = [f"{len(v)} {what} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                 for what, v in (("missing", missing), ("unexpected", unexpected)) if v]
        raise SdlabError(f"{name}: ControlNet keys do not match: {'; '.join(parts)}")
    for k, t in tensors.items():
        if tuple(t.shape) != expected[k]:
            raise SdlabError(f"{name}: ControlNet weight {k} has shape {tuple(t.shape)}, expected {expected[k]}; "
                             "the file is damaged or of a layout sdlab does not know")
    net.load_state_dict({k: t.to(device=device, dtype=dtype) for k, t in tensors.items()}, strict=True, assign=True)
    log.info("loaded ControlNet %s (%s)", name, _FAMILY_NAMES[_family_of(net.cfg.unet)])
    return net.eval().requires_grad_(False)
