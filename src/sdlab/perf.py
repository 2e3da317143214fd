"""Speed and memory helpers the pipeline calls: getting a loaded bundle ready for inference
(dtypes, channels-last, torch.compile), model CPU offload for small GPUs, and VAE calls that
tile large images and survive fp16 overflow.

Nothing here runs at import; every function acts only on what it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import device as devices
from .errors import SdlabError
from .models.layers import pack_weights_for_cpu
from .models.storage import set_dtypes, storage_dtype
from .models.t5 import T5Encoder
from .models.vae import AutoencoderKL, DiagonalGaussian, should_tile

if TYPE_CHECKING:
    from .checkpoints.loader import Bundle

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- preparation


def prepare_for_inference(bundle: Bundle, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                          channels_last: bool = True, compile: bool = False, offload: bool = False,
                          pack_weights: bool | None = None, weight_dtype: torch.dtype | None = None) -> Bundle:
    """Make a loaded bundle fast to run; returns the same bundle, changed in place.

    - UNet and text encoders computing in `dtype` (default: `device.default_dtype`), the VAE
      in `device.vae_dtype(...)`, all on `device` (default: where the UNet is), eval mode, no grads.
    - The UNet's and text encoders' matrices stored as `weight_dtype` and upcast layer by
      layer as they run (`models.storage`). Default: `dtype` when it was given, else
      `device.default_weight_dtype` (fp16 on a CPU computing in fp32).
    - channels-last memory format for the convolutional networks (UNet, VAE): oneDNN and
      cuDNN run their fastest convolutions on NHWC, and the UNet's attention blocks then
      flatten pixels to tokens without a copy. Outputs are unchanged.
    - `compile`: `torch.compile` the UNet's forward (it runs steps x batches times; the
      first call compiles, minutes on a CPU), with CUDA graphs on a GPU. The state-dict keys
      stay the same. Not with weights stored narrower than `dtype`.
    - `offload`: keep the networks in CPU memory and move each to `device` only while it
      runs (`ModelOffload`); load the bundle on the CPU first so the device never holds
      them all.
    - `pack_weights` (CPU, without `compile`): keep the denoiser's convolution weights (UNet)
      and linear weights (MMDiT) in oneDNN's blocked layout (`layers.Conv2d` / `layers.Linear`
      `.pack_for_cpu`) instead of reordering them on every call; same outputs, about 8-10% less
      time per step at SD 1.5 size on an AVX-512 CPU, 4% of an SD3 step. By default only where
      that holds (`device.packs_cpu_weights`): on an AVX2 CPU the packed convolutions are slower.

    Args:
        bundle: from `load_bundle` or `new_bundle`.
        device: where to run.
        dtype: the dtype the UNet and text encoders compute in.
        channels_last: convert the UNet and VAE to channels-last.
        compile: compile the UNet with torch.compile.
        offload: model CPU offload (for a GPU `device`).
        pack_weights: pre-pack the denoiser's weights when running on the CPU (default:
            where that is faster).
        weight_dtype: the dtype their matrices are stored in (fp16, bf16, fp8_e4m3fn, ...).

    Raises:
        SdlabError: `compile` with weights stored narrower than they compute.
    """
    device = torch.device(device) if device is not None else execution_device(bundle)
    dtype, weight_dtype = inference_dtypes(device, dtype, weight_dtype, compile)
    if compile and weight_dtype != dtype:
        raise SdlabError(f"--compile needs the weights in the dtype they compute in ({devices.dtype_name(dtype)}), "
                         f"not stored as {devices.dtype_name(weight_dtype)}; leave --weight-dtype out")
    disable_offload(bundle, "cpu")  # prepared before: start from plain modules
    home = torch.device("cpu") if offload else device
    for net in bundle.networks().values():
        net.eval().requires_grad_(False)
    for net in (bundle.unet, *bundle.text_encoders):
        # Cast where the weights are, then move: a narrow copy crosses to a GPU in half the time.
        set_dtypes(net, dtype, _kept_narrower(net, weight_dtype)).to(device=home)
    bundle.vae.to(device=home, dtype=devices.vae_dtype(device, dtype, bundle.family.name))
    if channels_last:
        bundle.unet.to(memory_format=torch.channels_last)
        bundle.vae.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        # Shapes repeat every step, so cuDNN's one-time search for the fastest conv pays off.
        torch.backends.cudnn.benchmark = True
    if pack_weights is None:
        pack_weights = devices.packs_cpu_weights(device, dtype)
    if pack_weights and device.type == "cpu" and not compile and not offload and weight_dtype == dtype:
        pack_weights_for_cpu(bundle.unet)
    if home.type == "cpu":
        devices.return_freed_memory()  # the buffers of the casts and repacks above
    if compile:
        # On a GPU, CUDA graphs as well ("reduce-overhead"): a step of SD 1.5 is hundreds of short
        # kernels, and replaying them as one graph takes their launches off the CPU. A graph's
        # outputs live in buffers its next replay overwrites, so the pipeline copies them out. Not
        # with offload: each move gives the weights new addresses, and the graphs would be recorded
        # again every step. Static shapes: a new image size compiles anew rather than once with
        # symbolic sizes, whose kernels are slower and which inductor failed to lower for our UNet
        # (torch 2.13).
        graphs = device.type == "cuda" and not offload
        bundle.unet.compile(mode="reduce-overhead" if graphs else None, dynamic=False)
    if offload:
        ModelOffload(bundle, device)
    return bundle


def load_for_inference(model: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                       *, prediction: str | None = None, use_ema: bool = True, compile: bool = False,
                       offload: bool = False, weight_dtype: torch.dtype | None = None, **sd3_options) -> Bundle:
    """`load_bundle`, then `prepare_for_inference`: what `sdlab.load`, the CLI and the server run.
    `sd3_options`: `load_bundle`'s SD3 arguments (text_encoder_files, text_encoder_dirs, t5_max_length).

    `device` None picks CUDA when available, else the CPU; `dtype` None the fastest dtype the
    device runs well (`device.default_dtype`); `weight_dtype` None that dtype, or when neither
    is given, `device.default_weight_dtype` (see `inference_dtypes`). Narrow weights are read
    from the file straight into their dtype. With `offload` the weights are read into CPU
    memory, never all onto the device at once.
    """
    from .checkpoints.loader import load_bundle

    device = devices.choose_device(device)
    dtype, weight_dtype = inference_dtypes(device, dtype, weight_dtype, compile)
    if device.type == "cpu" and (warning := devices.emulated_cpu_dtype_warning(dtype)):
        log.warning(warning)
    if offload and device.type == "cpu":
        raise SdlabError("--offload moves models between CPU memory and a GPU; it needs --device cuda (or another GPU)")
    bundle = load_bundle(model, device="cpu" if offload else device, dtype=dtype, prediction=prediction,
                         use_ema=use_ema, weight_dtype=weight_dtype, **sd3_options)
    return prepare_for_inference(bundle, device, dtype, compile=compile, offload=offload, weight_dtype=weight_dtype)


def _kept_narrower(net: nn.Module, weight_dtype: torch.dtype) -> torch.dtype:
    """`weight_dtype`, or for a T5 the narrower dtype its file gave its matrices (a t5xxl_fp8
    file stays fp8: `checkpoints.sd3.t5_weight_dtype`); widening them would change no result."""
    if isinstance(net, T5Encoder):
        stored = storage_dtype(net)
        if torch.finfo(stored).bits < torch.finfo(weight_dtype).bits:
            return stored
    return weight_dtype


def inference_dtypes(device: torch.device, dtype: torch.dtype | None, weight_dtype: torch.dtype | None,
                     compile: bool = False) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype, weight storage dtype) for the UNet and text encoders.

    Neither given: the device's defaults (`device.default_dtype`, `device.default_weight_dtype`),
    except with `compile`, which traces the network with its weights in place. A `dtype` given
    alone is used for both: a user who names fp32 gets exact fp32.
    """
    chosen = dtype is None and not compile
    dtype = dtype or devices.default_dtype(device)
    if weight_dtype is None:
        weight_dtype = devices.default_weight_dtype(device, dtype) if chosen else dtype
    if torch.finfo(weight_dtype).bits > torch.finfo(dtype).bits:
        raise SdlabError(f"--weight-dtype {devices.dtype_name(weight_dtype)} is wider than the "
                         f"{devices.dtype_name(dtype)} the networks compute in; choose a narrower one or leave it out")
    return dtype, weight_dtype


# ---------------------------------------------------------------- model CPU offload


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        # Asynchronous only towards the GPU: a GPU-to-CPU copy must finish before the CPU reads it.
        return value.to(device, non_blocking=device.type != "cpu")
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple
        return type(value)(*(_to_device(v, device) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _first_tensor_device(args: tuple, kwargs: dict) -> torch.device | None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, Tensor):
            return v.device
    return None


def _device_hooks(module: nn.Module, device: torch.device, on_enter: Callable[[], None], outputs_back: bool,
                  move: Callable[[Any, torch.device], Any] = _to_device) -> list[Any]:
    """Hooks that run `module` on `device`: `on_enter` (which puts the weights there) and the tensor
    inputs moved there before each call; with `outputs_back`, the outputs moved back to where the
    first tensor input came from, so callers keeping tensors elsewhere work unchanged. The handles."""
    caller: list[torch.device | None] = [None]

    def before(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        on_enter()
        caller[0] = _first_tensor_device(args, kwargs)
        return move(args, device), move(kwargs, device)

    def after(_module: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> Any:
        if caller[0] is not None and caller[0] != device:
            return move(output, caller[0])
        return output

    handles = [module.register_forward_pre_hook(before, with_kwargs=True)]
    if outputs_back:
        handles.append(module.register_forward_hook(after, with_kwargs=True))
    return handles


class ModelOffload:
    """Keeps a bundle's networks in CPU memory and moves each to the device only while it
    runs (diffusers' `enable_model_cpu_offload`): the device holds one network at a time,
    so the text encoder is off the device while the UNet samples, and the UNet is off while
    the VAE decodes.

    Hooks move each network's tensor inputs to the device. The UNet's and text encoders'
    outputs go back to where their inputs came from, so callers that keep tensors on the
    CPU work unchanged; callers that put their tensors on `execution_device(...)` avoid
    the round trips. The VAE is hooked on its parts (`encoder`, `decoder`, `quant_conv`,
    `post_quant_conv`), whose outputs stay on the device: call it through `decode_latents`
    / `encode_images`, which move the input and the result.
    """

    def __init__(self, bundle: Bundle, device: str | torch.device):
        self.device = torch.device(device)
        self.active: nn.Module | None = None
        self._handles: list[Any] = []
        self._networks = list(bundle.networks().values())
        for net in self._networks:
            net.to("cpu")
            net.sdlab_offload = self  # read by execution_device()
        for net in (bundle.unet, *bundle.text_encoders):
            self._hook(net, net, outputs_back=True)
        vae = bundle.vae
        for part in (vae.encoder, vae.decoder, vae.quant_conv, vae.post_quant_conv):
            self._hook(part, vae, outputs_back=False)

    def _hook(self, module: nn.Module, owner: nn.Module, outputs_back: bool) -> None:
        self._handles += _device_hooks(module, self.device, lambda: self.activate(owner), outputs_back)

    def activate(self, net: nn.Module) -> None:
        """Put `net` on the device and the previously active network back on the CPU."""
        if self.active is net:
            return
        if self.active is not None:
            self.active.to("cpu")
        net.to(self.device)
        self.active = net
        log.debug("offload: %s on %s", type(net).__name__, self.device)

    def remove(self, device: str | torch.device | None = None) -> None:
        """Remove the hooks; leave every network on `device` (default: the CPU)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for net in self._networks:
            net.to(device or "cpu")
            del net.sdlab_offload
        self.active = None


def disable_offload(bundle: Bundle, device: str | torch.device | None = None) -> None:
    """Undo `prepare_for_inference(..., offload=True)`; the networks end on `device`."""
    offload = getattr(bundle.unet, "sdlab_offload", None)
    if offload is not None:
        offload.remove(device)


def execution_device(net: nn.Module | Bundle) -> torch.device:
    """Where `net` (or a bundle's UNet) computes: its offload device, else its weights' device.
    Put inputs there."""
    net = getattr(net, "unet", net)
    offload = getattr(net, "sdlab_offload", None)
    return offload.device if offload is not None else next(net.parameters()).device


# ---------------------------------------------------------------- text encoders between prompts


def _move_module(net: nn.Module, device: torch.device) -> None:
    net.to(device)


class TextEncoderParking:
    """Text encoders run once per prompt (their outputs are cached by the runners), yet SD3's T5-XXL
    alone is 4.7 B parameters: between prompts they wait in CPU memory (`rest`), so the denoiser
    has the GPU to itself while it samples.

    A forward pre-hook brings an encoder to `device` when a prompt the runners have not cached
    needs it (a repeated prompt moves nothing), with its tensor inputs; its outputs go back to
    where the inputs came from, as `ModelOffload` does. `park()` (the pipeline calls it once a
    request's prompts are encoded) sends them back to `rest`, unless `keep()` says the next
    request will need them again (the server's queue holds another generation job), which saves
    two transfers. Unlike `--offload`, the denoiser and the VAE stay on the device.

    `move_module` / `move_value` are injectable so the logic can be tested without a GPU.
    """

    def __init__(self, encoders: list[nn.Module], device: str | torch.device,
                 rest: str | torch.device = "cpu", keep: Callable[[], bool] = lambda: False,
                 move_module: Callable[[nn.Module, torch.device], None] = _move_module,
                 move_value: Callable[[Any, torch.device], Any] = _to_device):
        self.device, self.rest = torch.device(device), torch.device(rest)
        self.keep = keep
        self._move_module, self._move_value = move_module, move_value
        self._handles: list[Any] = []
        self.encoders = list(encoders)
        self.where: dict[int, torch.device] = {}  # id(encoder) -> where it is now
        for net in self.encoders:
            self.where[id(net)] = next(net.parameters()).device
            self._hook(net)

    def _hook(self, net: nn.Module) -> None:
        self._handles += _device_hooks(net, self.device, lambda: self._place(net, self.device), outputs_back=True,
                                       move=self._move_value)

    def _place(self, net: nn.Module, device: torch.device) -> None:
        if self.where[id(net)] != device:
            self._move_module(net, device)
            self.where[id(net)] = device
            log.debug("text encoder %s to %s", type(net).__name__, device)

    def park(self) -> bool:
        """Send the encoders to `rest` unless `keep()`; whether they are parked now."""
        if self.keep():
            return False
        moved = False
        for net in self.encoders:
            moved |= self.where[id(net)] != self.rest
            self._place(net, self.rest)
        if moved and self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the freed blocks back for the denoiser's activations
        return True

    def remove(self, device: str | torch.device | None = None) -> None:
        """Remove the hooks; leave every encoder on `device` (default: its compute device)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for net in self.encoders:
            self._place(net, torch.device(device) if device is not None else self.device)


def text_encoder_parking(bundle: Bundle) -> TextEncoderParking | None:
    """Parking for a bundle's text encoders where it pays: on a GPU (on the CPU they are where
    they run), and not with `--offload`, which moves every network already."""
    if not bundle.text_encoders or getattr(bundle.unet, "sdlab_offload", None) is not None:
        return None
    device = next(bundle.text_encoders[0].parameters()).device
    if device.type == "cpu":
        return None
    return TextEncoderParking(list(bundle.text_encoders), device)


# ---------------------------------------------------------------- the VAE


# The band size (`decode_tiled`'s and `encode_tiled`'s tile) of the CPU's passes over images that
# are not large.
CPU_BAND_TILE = 128


def auto_tile(vae: AutoencoderKL, height: int, width: int, batch: int = 1) -> bool:
    """Whether an image of height x width pixels should go through the tiled VAE paths,
    given the memory free where the VAE runs."""
    device = execution_device(vae)
    element = torch.finfo(next(vae.parameters()).dtype).bits // 8
    return should_tile(height, width, devices.available_memory(device), batch, element)


def _tiling(vae: AutoencoderKL, height: int, width: int, batch: int, tile: bool | None) -> dict | None:
    """The keyword arguments of the tiled pass (`decode_tiled` / `encode_tiled`) for images of
    height x width pixels, or None for the plain pass. `tile` True or False forces one; None
    decides: tiled when the image is large for the free memory, else on the CPU band by band.

    Band by band on the CPU at every size: for SD's VAE at 512x512 the decode needed 0.6-0.7 GiB
    of temporaries instead of 0.93 GiB and ran in 18-19 s instead of 21 s, the encode peaked at
    0.86-1.06 instead of 1.80 GiB RSS and took 10.4-10.5 s instead of 11.9-12.4 s (2-core CPU);
    the same images and latents up to rounding (1e-5, 5e-6). Bands of 32 rows at 512 px wide.

    A VAE switched to circular padding (seamless images) runs whole: the bands pad with zeros."""
    if vae.circular():
        return None
    if tile is None:
        if auto_tile(vae, height, width, batch):
            return {}
        return {"tile": CPU_BAND_TILE} if execution_device(vae).type == "cpu" else None
    return {} if tile else None


def decode_latents(vae: AutoencoderKL, z: Tensor, tile: bool | None = None) -> Tensor:
    """`vae.decode(z)`, tiled when the image is large for the free memory (`tile=None`; on the
    CPU always, in smaller bands), and redone in a wider dtype when an fp16 VAE overflows.

    Args:
        vae: the VAE (offloaded or not).
        z: unscaled latents (divide by the family's scale first); any device and dtype.
        tile: force the tiled (True) or plain (False) decode; None decides by size and memory.

    Returns:
        Images (B, C, H, W) roughly in [-1, 1], on z's device, in the VAE's dtype.
    """
    f = vae.cfg.downsample_factor
    tiled = _tiling(vae, z.shape[-2] * f, z.shape[-1] * f, z.shape[0], tile)
    return _guarded(vae, z, lambda x: vae.decode(x) if tiled is None else vae.decode_tiled(x, **tiled))


def encode_images(vae: AutoencoderKL, pixels: Tensor, tile: bool | None = None) -> DiagonalGaussian:
    """`vae.encode(pixels)` with the same tiling choice and fp16 guard as `decode_latents`.
    The posterior lives on the VAE's execution device."""
    tiled = _tiling(vae, pixels.shape[-2], pixels.shape[-1], pixels.shape[0], tile)
    moments: list[DiagonalGaussian] = []

    def run(x: Tensor) -> Tensor:
        dist = vae.encode(x) if tiled is None else vae.encode_tiled(x, **tiled)
        moments.append(dist)
        return torch.cat([dist.mean, dist.logvar], dim=1)

    _guarded(vae, pixels, run, back=False)
    return moments[-1]


def _guarded(vae: AutoencoderKL, x: Tensor, fn: Callable[[Tensor], Tensor], back: bool = True) -> Tensor:
    device = execution_device(vae)
    offload = getattr(vae, "sdlab_offload", None)
    if offload is not None:  # the tiled paths call layers directly, past the offload hooks
        offload.activate(vae)
    dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        out = fn(x.to(device=device, dtype=dtype))
        if dtype == torch.float16 and not torch.isfinite(out).all():
            wider = devices.wider_than_fp16(device)
            log.warning("the VAE overflowed in fp16; it now runs in %s", devices.dtype_name(wider))
            vae.to(dtype=wider)
            out = fn(x.to(device=device, dtype=wider))
    return out.to(x.device) if back else out
