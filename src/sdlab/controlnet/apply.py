"""ControlNet units applied as a patch on the model: each active unit's residuals, weighted as
its control mode says, are added to the UNet's skip connections and middle block; a
T2I-Adapter's features, computed once, are added to the UNet's encoder path (`ControlResiduals.encoder`).

A unit is a request's ControlNet settings made concrete (`ControlUnit`: the loaded network,
the hint image at the generation size, weight, start / end, control mode). `controlled(model,
units, sigmas)` wraps a model adapter so that the sampling step and the guidance patches use it
like any other model; nothing in the loaded networks changes.

Rules, as sd-webui-controlnet (`scripts/controlnet.py`, `scripts/hook.py`) and diffusers'
`StableDiffusionControlNetPipeline` apply them:

- weight multiplies every residual; "My prompt is more important" and "ControlNet is more
  important" use the soft weights `weight * 0.825 ** (12 - i)` (i over the residuals, the middle
  last; SDXL's 10 residuals take the first 10), and the latter leaves the negative prompt's half
  of the batch without control (the original guess mode);
- a unit runs at sampling step k of N when `start <= k / N` and `(k + 1) / N <= end`
  (diffusers' rule; the extension's differs by about a step at the ends), which is while sigma
  lies in the range those steps walk.
- T2I-Adapters (the extension's hook.py): weight multiplies every feature; the two soft modes
  use `weight * (0.25, 0.62, 0.825, 1.0)`; "ControlNet is more important" again leaves the
  negative half without; a 1-channel (sketch) adapter reads the hint's first channel.

Hint maps are brought to the generation size as the extension's `detectmap_proc` does
(`resize_hint`, with its `high_quality_resize`: binary edge maps are re-thresholded and thinned).
In the hires fix's second pass a unit guides again with its map resized to the hires size
(`for_hires`), and canny and mlsd units use the soft weights there, as the extension forces them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from sdlab.errors import SdlabError
from sdlab.models.controlnet import ControlNet
from sdlab.models.t2i_adapter import T2IAdapter, placement
from sdlab.models.unet import ControlResiduals
from sdlab.sampling.denoiser import Conditioning, NetDenoiser, denoise_with

__all__ = ["CONTROL_MODES", "HR_OPTIONS", "RESIZE_MODES", "ControlUnit", "ControlledModel", "adapter_weights",
           "control_weights", "controlled", "controlled_in", "for_hires", "high_quality_resize", "hint_tensor",
           "resize_hint"]

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
# The extension's other names for them (and its API's integers).
RESIZE_ALIASES = {"0": "Just Resize", "1": "Crop and Resize", "2": "Resize and Fill",
                  "Inner Fit (Scale to Fit)": "Crop and Resize", "Scale to Fit (Inner Fit)": "Crop and Resize",
                  "Outer Fit (Shrink to Fit)": "Resize and Fill", "Envelope (Outer Fit)": "Resize and Fill"}
CONTROL_ALIASES = {"0": "Balanced", "1": "My prompt is more important", "2": "ControlNet is more important"}
# The extension's soft weights of a T2I-Adapter's four features (hook.py).
ADAPTER_SOFT_WEIGHTS = (0.25, 0.62, 0.825, 1.0)
# Preprocessors whose units the extension turns soft in the hires pass ("reduces artifacts").
HIRES_SOFT_MODULES = ("canny", "mlsd")
HR_OPTIONS = ("Both", "Low res only", "High res only")  # the passes of a hires fix a unit guides


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet (or T2I-Adapter) at work in a generation."""

    net: ControlNet | T2IAdapter
    hint: Tensor = field(compare=False)  # (1, 3, H, W) RGB in [0, 1] at the generation size (inpaint: -1 where masked)
    weight: float = 1.0
    start: float = 0.0  # fractions of the sampling steps
    end: float = 1.0
    mode: str = "Balanced"
    module: str = "none"  # the preprocessor that made the map (the hires pass treats canny and mlsd softer)
    # The detected map before it was fitted to the size, and how it was fitted: the hires pass
    # fits it again to its size (None: the hint itself is resized).
    detected: np.ndarray | None = field(default=None, compare=False)
    resize_mode: str = "Crop and Resize"
    hr_option: str = "Both"  # in a hires fix: "Low res only" skips its second pass, "High res only" its first

    def __post_init__(self) -> None:
        if self.hr_option not in HR_OPTIONS:
            raise SdlabError(f"unknown hr_option {self.hr_option!r}; choose one of: {', '.join(HR_OPTIONS)}")
        if self.mode not in CONTROL_MODES:
            raise SdlabError(f"unknown control mode {self.mode!r}; choose one of: {', '.join(CONTROL_MODES)}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise SdlabError(f"ControlNet guidance start {self.start} and end {self.end} must satisfy "
                             "0 <= start <= end <= 1")


def control_weights(mode: str, weight: float, count: int) -> list[float]:
    """The weight of each residual (input blocks in order, then the middle block)."""
    if mode == "Balanced":
        return [weight] * count
    return [weight * 0.825 ** (12 - i) for i in range(count)]


def adapter_weights(mode: str, weight: float, count: int) -> list[float]:
    """The weight of each of a T2I-Adapter's features (the extension zips its 4 soft weights with
    them: a smaller adapter takes the first ones)."""
    if mode == "Balanced":
        return [weight] * count
    if count > len(ADAPTER_SOFT_WEIGHTS):
        raise SdlabError(f"a T2I-Adapter with {count} features has no soft weights; use the Balanced control mode")
    return [weight * w for w in ADAPTER_SOFT_WEIGHTS[:count]]


def resize_hint(image: np.ndarray, width: int, height: int, mode: str = "Crop and Resize") -> np.ndarray:
    """A detected map (H, W, 3 uint8; 4 channels for the inpaint modules' RGBA) brought to the
    generation size as the extension does (`detectmap_proc`): stretched, scaled to cover and
    centre-cropped, or scaled to fit and padded with the median colour of its border, each
    scaling done by `high_quality_resize`."""
    mode = RESIZE_ALIASES.get(str(mode), mode)
    if mode not in RESIZE_MODES:
        raise SdlabError(f"unknown resize mode {mode!r}; choose one of: {', '.join(RESIZE_MODES)}")
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    if mode == "Just Resize":
        return high_quality_resize(image, (width, height))
    k = (max if mode == "Crop and Resize" else min)(height / h, width / w)
    size = (int(np.round(w * k)), int(np.round(h * k)))
    scaled = high_quality_resize(image, size)
    if mode == "Crop and Resize":
        top, left = max(0, (size[1] - height) // 2), max(0, (size[0] - width) // 2)
        return scaled[top:top + height, left:left + width]
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    out = np.empty((height, width, image.shape[2]), dtype=image.dtype)
    out[:] = np.median(border, axis=0).astype(image.dtype)
    if image.shape[2] == 4:
        out[:, :, 3] = 255  # the padding is to be painted (the extension's inpaint rule)
    top, left = max(0, (height - size[1]) // 2), max(0, (width - size[0]) // 2)
    out[top:top + size[1], left:left + size[0]] = scaled
    return out


def high_quality_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The extension's `high_quality_resize` (scripts/controlnet.py, "written by lvmin"): a map
    (H, W, 3 uint8, or RGBA whose alpha is the inpaint mask) to `size` (w, h).

    - Maps of 3 to 199 colours (segmentation, pose) are resized with nearest neighbours so no
      new colour appears; others with INTER_AREA when they shrink and INTER_CUBIC when they grow.
    - A binary map (two colours, one below 16 and one above 240) is made binary again: its
      channels averaged, then an Otsu threshold. If it is drawn with one-pixel edges (an
      opening removes more than half its white), the edges are thinned back to one pixel first:
      non-maximum suppression along the four directions, Otsu, then `thin` (with the pruning
      of spurs when the map grew).
    - The alpha is resized with the same interpolation and thresholded at 127.
    """
    cv2 = _cv2()
    mask = None
    if image.ndim == 3 and image.shape[2] == 4:
        image, mask = image[:, :, :3], image[:, :, 3]
    if image.shape[:2] == (size[1], size[0]):
        out = image
    else:
        smaller = size[0] * size[1] < image.shape[0] * image.shape[1]
        bigger = size[0] * size[1] > image.shape[0] * image.shape[1]
        colours = _colour_count(image)
        binary = colours == 2 and int(image.min()) < 16 and int(image.max()) > 240
        one_pixel_edges = False
        if binary:
            kernel = np.ones((3, 3), dtype=np.uint8)
            opened = cv2.dilate(cv2.erode(image, kernel, iterations=1), kernel, iterations=1)
            one_pixel_edges = np.count_nonzero(opened < image) * 2 > np.count_nonzero(image > 127)
        if 2 < colours < 200:
            interpolation = cv2.INTER_NEAREST
        elif smaller:
            interpolation = cv2.INTER_AREA
        else:
            interpolation = cv2.INTER_CUBIC  # the extension: "must be CUBIC because we now use nms"
        out = cv2.resize(image, size, interpolation=interpolation)
        if mask is not None:
            mask = cv2.resize(mask, size, interpolation=interpolation)
        if binary:
            out = np.mean(out.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
            if one_pixel_edges:
                out = cv2.threshold(edge_nms(out), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]
                out = thin(out, prune=bigger)
            else:
                out = cv2.threshold(out, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]
            out = np.stack([out] * 3, axis=2)
    if mask is not None:
        out = np.concatenate([out, np.where(mask > 127, 255, 0).astype(np.uint8)[:, :, None]], axis=2)
    return out


def _colour_count(image: np.ndarray) -> int:
    """The number of distinct colours of an (H, W, 3) uint8 map."""
    packed = image.reshape(-1, image.shape[-1]).astype(np.uint32)
    return len(np.unique((packed[:, 0] << 16) | (packed[:, 1] << 8) | packed[:, 2]))


def edge_nms(x: np.ndarray) -> np.ndarray:
    """The extension's `nake_nms`: a pixel stays where it is the largest of its two neighbours
    along one of the four directions (horizontal, vertical, both diagonals), else it is 0."""
    cv2 = _cv2()
    out = np.zeros_like(x)
    for line in (np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], np.uint8), np.array([[0, 1, 0]] * 3, np.uint8),
                 np.eye(3, dtype=np.uint8), np.fliplr(np.eye(3, dtype=np.uint8)).copy()):
        np.putmask(out, cv2.dilate(x, kernel=line) == x, x)
    return out


def _rotations(kernels: list[list[list[int]]]) -> list[np.ndarray]:
    return [np.rot90(np.array(k, dtype=np.int32), turn) for turn in range(4) for k in kernels]


# The extension's lvminthin.py hit-or-miss kernels (1: white, -1: black, 0: either), each in
# its four rotations: the thinning ones remove a white pixel on a thick edge's side, the
# pruning ones the end pixel of a one-pixel spur.
THIN_KERNELS = _rotations([[[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]]])
PRUNE_KERNELS = _rotations([[[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]]])


def thin(x: np.ndarray, prune: bool = True) -> np.ndarray:
    """The extension's `lvmin_thin` of a binary (0 / 255) uint8 map: remove the pixels each
    thinning kernel hits, kernel after kernel, until a round removes none (at most 32 rounds),
    then one round of the pruning kernels."""
    cv2 = _cv2()
    y = x.copy()

    def one_round(kernels: list[np.ndarray]) -> bool:
        changed = False
        for kernel in kernels:
            hits = cv2.morphologyEx(y, cv2.MORPH_HITMISS, kernel) > 127
            if hits.any():
                y[hits] = 0
                changed = True
        return changed

    for _ in range(32):
        if not one_round(THIN_KERNELS):
            break
    if prune:
        one_round(PRUNE_KERNELS)
    return y


def hint_tensor(image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1], as the ControlNet reads its hint; an
    inpaint map (RGBA, alpha the mask) -> its RGB with -1 where masked (`inpaint_hint`)."""
    if image.ndim == 3 and image.shape[2] == 4:
        from sdlab.controlnet.preprocess import inpaint_hint

        return torch.from_numpy(inpaint_hint(image)).permute(2, 0, 1)[None].contiguous()
    return torch.from_numpy(np.array(image, dtype=np.uint8)).float().div(255.0).permute(2, 0, 1)[None]


def for_hires(unit: ControlUnit, width: int, height: int) -> ControlUnit:
    """The unit as it guides the hires fix's second pass: its detected map fitted to the hires
    size by its resize mode (the hint itself when the map is not kept), and, for canny and mlsd
    maps, the soft weights, as the extension does "to reduce artifacts" (hook.py). Units with
    hr_option "Low res only" are the caller's to leave out."""
    source = unit.detected
    if source is None:  # a hint given ready-made: its pixels are the map (an inpaint hint's -1 is lost)
        source = (unit.hint[0, :3].cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    hint = hint_tensor(resize_hint(source, width, height, unit.resize_mode))
    mode = unit.mode
    if mode == "Balanced" and any(name in unit.module for name in HIRES_SOFT_MODULES):
        mode = "My prompt is more important"
    return replace(unit, hint=hint, mode=mode, hr_option="Both")


def _cv2():
    from sdlab.controlnet.preprocess import _cv2

    return _cv2()


@dataclass(frozen=True)
class _Scheduled:
    unit: ControlUnit
    low: float  # active while low < sigma <= high
    high: float


def _schedule(unit: ControlUnit, sigmas: Tensor) -> _Scheduled:
    n = len(sigmas) - 1
    active = [k for k in range(n) if unit.start <= k / n and (k + 1) / n <= unit.end]
    if not active:
        return _Scheduled(unit, 0.0, 0.0)
    high = float("inf") if active[0] == 0 else float(sigmas[active[0]])
    return _Scheduled(unit, float(sigmas[active[-1] + 1]) if active[-1] + 1 < n else float("-inf"), high)


class ControlledModel(NetDenoiser):
    """A model adapter whose network call gets the residuals of its active ControlNet units and
    the features of its active T2I-Adapter units (computed here, once: they depend on the hint only)."""

    def __init__(self, model: NetDenoiser, units: Sequence[_Scheduled]):
        super().__init__(model.sampling, model.dtype)
        self.model = model
        self.units = tuple(units)
        self._features = {i: self._adapter_features(s.unit) for i, s in enumerate(self.units)
                          if isinstance(s.unit.net, T2IAdapter)}

    def conditioning(self, *args, **kwargs) -> Conditioning:
        return self.model.conditioning(*args, **kwargs)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        level = float(sigma.reshape(-1)[0])
        active = [i for i, s in enumerate(self.units) if s.low < level <= s.high]
        if not active:
            return self.model(x, sigma, cond)

        def apply(x_in: Tensor, t: Tensor, c: Conditioning) -> Tensor:
            return self.model.apply(x_in, t, c, control=self._residuals(active, x_in, t, c))

        return denoise_with(self.sampling, apply, x, sigma, cond)

    @torch.no_grad()
    def _adapter_features(self, unit: ControlUnit) -> ControlResiduals:
        """A T2I-Adapter unit's features, weighted, where they join this model's UNet (batch 1)."""
        config = self.model.config  # the UNet adapter's ModelConfig
        net = unit.net
        try:  # the loader refuses such adapters already; this is for units made by hand
            where = placement(net.cfg, config.unet, config.vae.downsample_factor)
        except ValueError as e:
            raise SdlabError(f"this T2I-Adapter cannot guide this model: {e}") from None
        features = net(unit.hint[:, :net.cfg.in_channels])
        features = [f * w for f, w in zip(features, adapter_weights(unit.mode, unit.weight, len(features)))]
        blocks = 1 + sum(config.unet.num_res_blocks) + len(config.unet.channel_mult) - 1
        encoder: list[Tensor | None] = [None] * blocks
        for block, feature in zip(where.blocks, features):
            encoder[block] = feature
        return ControlResiduals((), features[len(where.blocks)] if where.middle else None, tuple(encoder))

    def _residuals(self, active: Sequence[int], x_in: Tensor, t: Tensor, cond: Conditioning) -> ControlResiduals:
        total = None
        batch = x_in.shape[0]
        for i in active:
            unit = self.units[i].unit
            if i in self._features:
                features = self._features[i]
                residuals = ControlResiduals(
                    (), None if features.middle is None else features.middle.expand(batch, -1, -1, -1),
                    tuple(None if f is None else f.expand(batch, -1, -1, -1) for f in features.encoder))
            else:
                net = unit.net
                hint = unit.hint.to(x_in.device).expand(batch, -1, -1, -1)
                residuals = net(x_in[:, :net.cfg.unet.in_channels], hint, t, cond.context, cond.y)
                residuals = residuals.scaled(control_weights(unit.mode, unit.weight, len(residuals.skips) + 1))
            if unit.mode == "ControlNet is more important" and cond.negative_rows is not None:
                residuals = _without_rows(residuals, cond.negative_rows)
            total = residuals if total is None else total + residuals
        return total


def _without_rows(residuals: ControlResiduals, rows: Tensor) -> ControlResiduals:
    """The residuals with the batch rows `rows` (bool) set to zero."""

    def kept(t: Tensor | None) -> Tensor | None:
        return None if t is None else t * (~rows).to(device=t.device, dtype=t.dtype).view(-1, 1, 1, 1)

    return ControlResiduals(tuple(kept(r) for r in residuals.skips), kept(residuals.middle),
                            tuple(kept(e) for e in residuals.encoder))


def controlled(model: NetDenoiser, units: Sequence[ControlUnit], sigmas: Tensor) -> NetDenoiser:
    """`model` with `units` applied over a pass that walks `sigmas`; the model itself if none.
    Units with hr_option "High res only" wait for the hires pass (`for_hires` makes them run there)."""
    units = [u for u in units if u.hr_option != "High res only"]
    if not units:
        return model
    return ControlledModel(model, [_schedule(u, sigmas) for u in units])


def controlled_in(model: NetDenoiser, units: Sequence[tuple[ControlUnit, float, float]]) -> NetDenoiser:
    """`model` with each unit applied while `low < sigma <= high` (the unit's own start / end
    are not read): for faces that give a unit's range in sigmas, as ComfyUI's percent range."""
    if not units:
        return model
    return ControlledModel(model, [_Scheduled(unit, low, high) for unit, low, high in units])
