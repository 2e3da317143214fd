"""ControlNet units applied as a patch on the model: each active unit's residuals, weighted as
its control mode says, are added to the UNet's skip connections and middle block.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sdlab.errors import SdlabError
from sdlab.models.controlnet import ControlNet
from sdlab.models.unet import ControlResiduals
from sdlab.sampling.denoiser import Conditioning, NetDenoiser, denoise_with

__all__ = ["CONTROL_MODES", "RESIZE_MODES", "ControlUnit", "ControlledModel", "control_weights", "controlled",
           "hint_tensor", "resize_hint"]

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
# The extension's other names for them (and its API's integers).
RESIZE_ALIASES = {"0": "Just Resize", "1": "Crop and Resize", "2": "Resize and Fill",
                  "Inner Fit (Scale to Fit)": "Crop and Resize", "Scale to Fit (Inner Fit)": "Crop and Resize",
                  "Outer Fit (Shrink to Fit)": "Resize and Fill", "Envelope (Outer Fit)": "Resize and Fill"}
CONTROL_ALIASES = {"0": "Balanced", "1": "My prompt is more important", "2": "ControlNet is more important"}


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet at work in a generation."""

    net: ControlNet
    hint: Tensor  # (1, 3, H, W) RGB in [0, 1] at the generation size (inpaint hints: -1 where masked)
    weight: float = 1.0
    start: float = 0.0  # fractions of the sampling steps
    end: float = 1.0
    mode: str = "Balanced"

    def __post_init__(self) -> None:
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


def resize_hint(image: np.ndarray, width: int, height: int, mode: str = "Crop and Resize") -> np.ndarray:
    """A detected map (H, W, 3 uint8) brought to the generation size as the extension does
    (`detectmap_proc`): stretched, scaled to cover and centre-cropped, or scaled to fit and padded
    with the median colour of its border. Maps of few colours (edges, segmentation) are resized
    with nearest neighbours so that no new colours appear."""
    from sdlab.controlnet.preprocess import _cv2

    mode = RESIZE_ALIASES.get(str(mode), mode)
    if mode not in RESIZE_MODES:
        raise SdlabError(f"unknown resize mode {mode!r}; choose one of: {', '.join(RESIZE_MODES)}")
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    cv2 = _cv2()

    def resized(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        few_colours = 3 <= len(np.unique(img.reshape(-1, img.shape[-1])[:: max(1, img.size // 30000)], axis=0)) < 200
        grow = size[0] * size[1] > img.shape[0] * img.shape[1]
        interpolation = cv2.INTER_NEAREST if few_colours else cv2.INTER_CUBIC if grow else cv2.INTER_AREA
        return cv2.resize(img, size, interpolation=interpolation)

    if mode == "Just Resize":
        return resized(image, (width, height))
    k = (max if mode == "Crop and Resize" else min)(height / h, width / w)
    size = (max(1, round(w * k)), max(1, round(h * k)))
    scaled = resized(image, size)
    if mode == "Crop and Resize":
        top, left = (size[1] - height) // 2, (size[0] - width) // 2
        return scaled[top:top + height, left:left + width]
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    out = np.empty((height, width, image.shape[2]), dtype=image.dtype)
    out[:] = np.median(border, axis=0).astype(image.dtype)
    top, left = (height - size[1]) // 2, (width - size[0]) // 2
    out[top:top + size[1], left:left + size[0]] = scaled
    return out


def hint_tensor(image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1], as the ControlNet reads its hint."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).float().div(255.0).permute(2, 0, 1)[None]


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
    """A model adapter whose network call gets the residuals of its active ControlNet units."""

    def __init__(self, model: NetDenoiser, units: Sequence[_Scheduled]):
        super().__init__(model.sampling, model.dtype)
        self.model = model
        self.units = tuple(units)

    def conditioning(self, *args, **kwargs) -> Conditioning:
        return self.model.conditioning(*args, **kwargs)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        level = float(sigma.reshape(-1)[0])
        active = [s.unit for s in self.units if s.low < level <= s.high]
        if not active:
            return self.model(x, sigma, cond)

        def apply(x_in: Tensor, t: Tensor, c: Conditioning) -> Tensor:
            return self.model.apply(x_in, t, c, control=self._residuals(active, x_in, t, c))

        return denoise_with(self.sampling, apply, x, sigma, cond)

    @staticmethod
    def _residuals(units: Sequence[ControlUnit], x_in: Tensor, t: Tensor, cond: Conditioning) -> ControlResiduals:
        total = None
        for unit in units:
            net = unit.net
            hint = unit.hint.to(x_in.device).expand(x_in.shape[0], -1, -1, -1)
            residuals = net(x_in[:, :net.cfg.unet.in_channels], hint, t, cond.context, cond.y)
            residuals = residuals.scaled(control_weights(unit.mode, unit.weight, len(residuals.skips) + 1))
            if unit.mode == "ControlNet is more important" and cond.negative_rows is not None:
                keep = (~cond.negative_rows).to(residuals.middle.dtype).view(-1, 1, 1, 1)
                residuals = ControlResiduals(tuple(r * keep for r in residuals.skips), residuals.middle * keep)
            total = residuals if total is None else total + residuals
        return total


def controlled(model: NetDenoiser, units: Sequence[ControlUnit], sigmas: Tensor) -> NetDenoiser:
    """`model` with `units` applied over a pass that walks `sigmas`; the model itself if none."""
    if not units:
        return model
    return ControlledModel(model, [_schedule(u, sigmas) for u in units])
