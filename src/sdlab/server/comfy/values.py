"""The values that travel along a graph's links, as thin wrappers over sdlab's own:

    MODEL          ModelRef: a checkpoint of the catalog, the LoRAs a graph put on its UNet, a shift
    CLIP           ClipRef: the same for its text encoders (or encoders loaded from files), and
                   CLIPSetLastLayer's layer
    VAE            VaeRef: the checkpoint whose VAE it is, or a VAE loaded from a file
    CONDITIONING   a list of (EncodedPrompt, options), as ComfyUI's [[tensor, {...}], ...]; options
                   hold what ComfyUI's do: "area", "strength", "control", SDXL's sizes, ...
    LATENT         {"samples": (B, C, h, w) float32, "noise_mask"?, "space"?}
    IMAGE          (B, H, W, 3) float32 in [0, 1];  MASK  (B, H, W) float32, 1 = repaint
    CONTROL_NET    ControlRef: a control model file (loaded where it is applied)
    UPSCALE_MODEL  `upscalers.UpscalerModel`

A LATENT's samples are in the latent space of the family that made them (`"space"`: the Family
of the checkpoint whose VAE encoded them or whose model sampled them; a VAE loaded from a file
encodes into its raw space, scale 1 and shift 0); an empty latent (zeros) has no space and is
taken in whatever space its reader works in, as ComfyUI leaves an empty latent unshifted.
`in_space` moves samples between spaces, exactly the identity when they agree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ...errors import SdlabError
from ...families import Family
from ...text.conditioning import EncodedPrompt
from ..catalog import CheckpointEntry

if TYPE_CHECKING:
    from ...models.vae import AutoencoderKL

__all__ = ["ClipRef", "Cond", "ControlRef", "ControlSpec", "ModelRef", "NodeError", "VaeRef", "in_space",
           "raw_space"]


class NodeError(SdlabError):
    """A node that cannot run with what it was given (shown as the node's execution_error)."""


@dataclass(frozen=True)
class ModelRef:
    entry: CheckpointEntry
    loras: tuple[tuple[str, str, float], ...] = ()  # (name, path, strength) on the UNet
    shift: float | None = None  # ModelSamplingSD3's flow shift; None: the family's


@dataclass(frozen=True, eq=False)
class ClipRef:
    entry: CheckpointEntry | None  # None: encoders loaded from files (`runners`)
    loras: tuple[tuple[str, str, float], ...] = ()  # (name, path, strength) on the text encoders
    stop_at: int = -1  # CLIPSetLastLayer: -1 the last layer, -2 the one before, ...
    runners: tuple = ()  # TripleCLIPLoader: the text encoder runners, in the family's slot order
    family: Family | None = None  # TripleCLIPLoader: the family whose rule combines them


@dataclass(frozen=True, eq=False)
class VaeRef:
    entry: CheckpointEntry | None  # None: a VAE file (`vae`, encoding into `space`)
    vae: AutoencoderKL | None = None
    space: Family | None = None
    name: str = ""


@dataclass(frozen=True, eq=False)
class ControlRef:
    """A control model file; a diff ControlNet's weights are added to `base`'s UNet, else to the
    UNet of the model that samples (ControlNetLoader has no model)."""

    path: Path
    base: ModelRef | None = None


@dataclass(frozen=True, eq=False)
class ControlSpec:
    """One ControlNetApply on a conditioning: applied while sigma lies in ComfyUI's percent range."""

    control: ControlRef
    image: Tensor  # IMAGE (B, H, W, 3) in [0, 1]: the hint, resized to the latent at sampling
    strength: float
    start_percent: float = 0.0
    end_percent: float = 1.0


Cond = list[tuple[EncodedPrompt, dict[str, Any]]]


def raw_space(like: Family) -> Family:
    """The latent space of a VAE as it is: scale 1, shift 0."""
    return replace(like, name="raw-vae", latent_scale=1.0, latent_shift=0.0)


def in_space(latent: dict, family: Family) -> Tensor:
    """A LATENT's samples in `family`'s latent space (the samples themselves when the spaces
    agree or the latent has none)."""
    samples = latent["samples"]
    space = latent.get("space")
    if space is None or (space.latent_scale, space.latent_shift) == (family.latent_scale, family.latent_shift):
        return samples
    raw = samples / space.latent_scale + space.latent_shift
    return (raw - family.latent_shift) * family.latent_scale
