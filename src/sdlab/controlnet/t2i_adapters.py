"""Reading T2I-Adapter files into `models.t2i_adapter.T2IAdapter` (`loading.load_controlnet`
hands them here; they live in models/ControlNet beside the ControlNets, as in the web UI).

Layouts, as the web UI's extension (`scripts/controlnet_model_guess.py`) and ComfyUI
(`comfy/controlnet.py` `load_t2i_adapter`) read them:

- the original TencentARC keys: `conv_in`, `body.N.{in_conv,block1,block2,down_opt.op}` (full),
  `body.N.{in_conv,body.M.*,out_conv}` (light), optionally under `adapter.`;
- diffusers' `T2IAdapter` keys (`adapter.conv_in`, `adapter.body.I.resnets.J.*`), as a single
  file or a folder with config.json;
- the style adapter (`style_embedding`) is recognised and refused: it conditions on CLIP image
  features, not a hint.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from sdlab.errors import SdlabError
from sdlab.models.t2i_adapter import T2IAdapter, T2IAdapterConfig, config_from_state_dict, placement
from sdlab.models.unet import UNetConfig

__all__ = ["adapter_file_info", "adapter_keys", "check_adapter_compatible", "t2i_adapter_from_state_dict"]

log = logging.getLogger(__name__)

_DIFFUSERS = re.compile(r"adapter\.body\.(\d+)\.(resnets\.(\d+)\.|in_conv\.|out_conv\.)(.*)")


def adapter_keys(keys: list[str]) -> tuple[dict[str, str], int | None]:
    """(our original-layout key -> the file's key, the number of levels where the keys say it).

    diffusers' keys name their levels (`adapter.body.I`), the original full layout does not.

    Raises:
        SdlabError: a key that is no part of a T2I-Adapter.
    """
    if not any(".resnets." in k for k in keys):  # the original layout, perhaps under `adapter.`
        if all(k.startswith("adapter.") for k in keys):
            return {k[len("adapter."):]: k for k in keys}, None
        return {k: k for k in keys}, None
    light = "adapter.body.0.out_conv.weight" in keys
    per_level = 1 + max(int(m.group(3)) for k in keys if (m := _DIFFUSERS.match(k)) and m.group(3))
    names, levels = {}, set()
    for k in keys:
        if k.startswith("adapter.conv_in."):
            names[k[len("adapter."):]] = k
            continue
        m = _DIFFUSERS.match(k)
        if m is None:
            raise SdlabError(f"diffusers T2I-Adapter: unexpected key {k}")
        level, part, j, rest = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        levels.add(level)
        if light:
            inner = f"body.{j}." if j is not None else part
            names[f"body.{level}.{inner}{rest}"] = k
        else:
            block = level * per_level + (int(j) if j is not None else 0)
            names[f"body.{block}.{'' if j is not None else part}{rest}"] = k
    return names, len(levels)


def adapter_file_info(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str | None, str | None]:
    """(base family "sd1" / "sdxl" or None, layout) of a T2I-Adapter's keys, for `sdlab info`."""
    if "style_embedding" in shapes:
        return "sd1", "style"
    names, levels = adapter_keys(list(shapes))
    try:
        cfg = config_from_state_dict({k: shapes[src] for k, src in names.items()}, levels=levels)
    except SdlabError:
        return None, None
    return ("sdxl" if cfg.layout == "full_xl" else "sd1"), cfg.layout


def t2i_adapter_from_state_dict(sd: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]], *,
                                unet: UNetConfig | None = None, latent_factor: int = 8,
                                config_json: dict | None = None, name: str = "<state dict>",
                                dtype: torch.dtype = torch.float32,
                                device: str | torch.device = "cpu") -> T2IAdapter:
    """A T2I-Adapter of any layout this module reads.

    Args:
        sd: the file's tensors (a lazy `StateDict` or a dict).
        shapes: their shapes.
        unet: the loaded model's UNet config: the adapter is refused unless its features fit it.
        latent_factor: the model's VAE factor, which sets the adapter's pixel unshuffle.
        config_json: a diffusers T2IAdapter folder's config.json (it names the layout).
        name, dtype, device: as for `loading.load_controlnet`.

    Raises:
        SdlabError: a style adapter, a damaged file, or one made for another model family.
    """
    names, levels = adapter_keys(list(shapes))
    native = {k: tuple(shapes[src]) for k, src in names.items()}
    try:
        cfg = _config_json(config_json) if config_json is not None else \
            config_from_state_dict(native, latent_factor, levels=levels)
    except SdlabError as e:
        raise SdlabError(f"{name}: {e}") from None
    if unet is not None:
        check_adapter_compatible(cfg, unet, latent_factor, name)
    with torch.device("meta"):
        net = T2IAdapter(cfg)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = sorted(expected.keys() - native.keys())
    unexpected = sorted(native.keys() - expected.keys())
    if missing or unexpected:
        parts = [f"{len(v)} {what} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                 for what, v in (("missing", missing), ("unexpected", unexpected)) if v]
        raise SdlabError(f"{name}: T2I-Adapter keys do not match: {'; '.join(parts)}")
    bad = [k for k in expected if native[k] != expected[k]]
    if bad:
        raise SdlabError(f"{name}: T2I-Adapter weight {bad[0]} has shape {native[bad[0]]}, expected "
                         f"{expected[bad[0]]}; the file is damaged or of a layout sdlab does not know")

    def read(key: str) -> Tensor:
        src = names[key]
        t = sd.read(src, dtype) if hasattr(sd, "read") else sd[src].to(dtype)
        return t.to(device=device)

    net.load_state_dict({k: read(k) for k in expected}, strict=True, assign=True)
    log.info("loaded T2I-Adapter %s (%s)", name, cfg.layout)
    return net.eval().requires_grad_(False)


def check_adapter_compatible(cfg: T2IAdapterConfig, unet: UNetConfig, latent_factor: int,
                             name: str = "the T2I-Adapter") -> None:
    """Refuse an adapter whose features do not fit this UNet (one for another family).

    Raises:
        SdlabError: one line naming both.
    """
    try:
        placement(cfg, unet, latent_factor)
    except ValueError as e:
        made_for = "SDXL" if cfg.layout == "full_xl" else "SD 1.x / 2.x"
        model = "an SDXL" if unet.adm_in_channels is not None else "an SD 1.x / 2.x"
        raise SdlabError(f"{name} is a T2I-Adapter for {made_for} and cannot guide this model ({model} model: {e}); "
                         f"choose an adapter made for it") from None


def _config_json(config: dict) -> T2IAdapterConfig:
    """Our config of a diffusers T2IAdapter config.json."""
    layout = config.get("adapter_type", "full_adapter")
    layouts = {"full_adapter": "full", "full_adapter_xl": "full_xl", "light_adapter": "light"}
    if layout not in layouts:
        raise SdlabError(f"config.json names adapter_type {layout!r}; sdlab reads {', '.join(layouts)}")
    channels = list(config.get("channels", (320, 640, 1280, 1280)))
    if layout == "light_adapter":
        channels.append(channels[-1])  # diffusers' light adapter has one level more than its channels list
    try:
        return T2IAdapterConfig(layouts[layout], int(config.get("in_channels", 3)), tuple(channels),
                                int(config.get("num_res_blocks", 4 if layout == "light_adapter" else 2)),
                                int(config.get("downscale_factor", 16 if layout == "full_adapter_xl" else 8)))
    except (TypeError, ValueError) as e:
        raise SdlabError(f"config.json does not describe a T2I-Adapter sdlab can build ({e})") from None
