"""Image upscalers as the web UI has them: the built-in "None", "Lanczos" and "Nearest", and
model files (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, ...) run through `spandrel`, tiled so that
memory stays bounded at any image size.

Model files live in the web UI's folders under the models root (`ESRGAN/`, `RealESRGAN/`,
`SwinIR/`, `DAT/`, `HAT/`) or ComfyUI's `upscale_models/`, and are named by their file name
without the extension, as the web UI names them (`modelloader.friendly_name`).

The rules are the web UI's (A1111 `modules/upscaler.py`, `scripts/postprocessing_upscale.py`):

- `Upscalers.upscale(image, name, scale)`: the target is `int(w*scale)//8*8` x `int(h*scale)//8*8`;
  the model runs up to 3 times until the image is at least that large (or stops growing), and a
  LANCZOS resize lands on the target.
- `upscale_extras`: the Extras tab's "Upscale": scale by, or scale to (`max(W/w, H/h)`, then with
  "crop" pasted centred on a black W x H canvas), a second upscaler blended in with
  `Image.blend`, and the `postprocessing` infotext keys.

Two choices differ from the web UI, on purpose:

- Tiles are fed as RGB, as the models were trained (ESRGAN's and Real-ESRGAN's own scripts turn
  OpenCV's BGR into RGB before the network); the web UI feeds BGR.
- Tiles are blended with a linear ramp across their overlap, as the web UI's, but the outer
  quarter of the overlap at each shared edge is left out (weight 0): a tile's edge pixels are
  the ones its convolutions saw padding for. When a quarter of the overlap is at least the
  network's receptive radius, the tiled result equals the untiled one (tests/test_upscalers.py).

Dtypes: on CUDA fp16 where spandrel says the architecture supports it, else bf16 where it and the
GPU do, else fp32; MPS fp16 or fp32; the CPU fp32, as sdlab's VAE there (fp16 convolutions are
emulated on CPUs, and an upscaler writes final pixels). `dtype=` overrides, and is refused for an
architecture spandrel marks as not supporting it.

spandrel is optional (`pip install "sdlab[upscale]"`); its non-commercial `spandrel_extra_arches`
is never used.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import logging
import math
import os
import re
import sys
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image

from .errors import SdlabError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["BUILTIN", "DEFAULT_OVERLAP", "DEFAULT_TILE", "ExtrasUpscale", "FOLDERS", "LATENT_UPSCALE_MODES",
           "UpscaleProgress", "UpscalerEntry", "UpscalerModel", "Upscalers", "load_upscaler_model",
           "postprocess_infotext", "tile_spans", "tiled_upscale", "upscale_extras"]

DEFAULT_TILE = 192  # the web UI's ESRGAN_tile (0: no tiling)
DEFAULT_OVERLAP = 8  # the web UI's ESRGAN_tile_overlap

BUILTIN = ("None", "Lanczos", "Nearest")  # listed first, in this order, as the web UI does

# The web UI's model folders (`models/<Upscaler.name>`) and ComfyUI's, in the order a name is
# looked for; with the `model_name` the web UI's /sdapi/v1/upscalers reports for their files.
FOLDERS: dict[str, str | None] = {
    "ESRGAN": "ESRGAN_4x", "RealESRGAN": None, "SwinIR": "SwinIR 4x", "DAT": None, "HAT": None,
    "upscale_models": None,
}
MODEL_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt")

# Hires fix's latent modes (A1111 `shared.latent_upscale_modes`): F.interpolate's mode, antialias.
LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}

_SCALE_IN_NAME = re.compile(r"(\d)[xX]|[xX](\d)")  # "4x-UltraSharp", "RealESRGAN_x2plus" (the web UI's rule)


# --------------------------------------------------------------------------------------
# spandrel
# --------------------------------------------------------------------------------------

_IMPORT_LOCK = threading.Lock()


def import_spandrel() -> types.ModuleType:
    """`spandrel`, or `MissingDependency` saying how to install it.

    spandrel imports torchvision for two architectures sdlab never runs (LaMa, an inpainting
    model, and RestoreFormer, a face restorer). Where torchvision is not installed, as with a
    CPU build of torch that has no matching torchvision on PyPI, a stand-in that raises on use
    is put in its place while spandrel imports, and taken out again at once, so no other
    library ever sees it.
    """
    from .optional import require

    with _IMPORT_LOCK:
        if sys.modules.get("spandrel") is not None:
            return sys.modules["spandrel"]
        purpose = "running an upscaler model (ESRGAN, Real-ESRGAN, SwinIR, ...)"
        if not _installed("spandrel") or _installed("torchvision"):
            try:
                return require("spandrel", extra="upscale", purpose=purpose)
            except (RuntimeError, ImportError) as e:  # a torchvision built for another torch
                if isinstance(e, ModuleNotFoundError):
                    raise
                from .errors import MissingDependency

                raise MissingDependency(f"{purpose} needs spandrel, which fails to import ({str(e).splitlines()[0]}); "
                                        "install the torchvision built for your torch, or uninstall torchvision") \
                    from None
        stand_ins = _torchvision_stand_in()
        sys.modules.update(stand_ins)
        try:
            return require("spandrel", extra="upscale", purpose=purpose)
        finally:
            for name, module in stand_ins.items():
                if sys.modules.get(name) is module:
                    del sys.modules[name]


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # blocked in sys.modules, or a broken parent
        return False


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise SdlabError("this model needs torchvision, which is not installed")

    root = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.rotate = unavailable
    functional.normalize = unavailable
    functional.InterpolationMode = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC")
    root.transforms, transforms.functional = transforms, functional
    return {"torchvision": root, "torchvision.transforms": transforms, "torchvision.transforms.functional": functional}


def read_upscaler_file(path: Path) -> dict[str, Any]:
    """The raw state dict of an upscaler file: .safetensors, or a pickle opened with
    `torch.load(weights_only=True)` (never TorchScript, never code from the file)."""
    import pickle

    import torch

    from .checkpoints.io import SAFETENSORS_SUFFIXES

    try:
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SdlabError(f"{path}: no such file") from None
    except pickle.UnpicklingError as e:
        raise SdlabError(f"{path}: refused or unreadable ({str(e).splitlines()[0][:160]}); sdlab only opens pickles "
                         "that hold tensors; use a .safetensors version") from None
    except Exception as e:  # a damaged file fails anywhere inside the reader
        raise SdlabError(f"{path}: not a readable model file ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(obj, dict):
        raise SdlabError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


@dataclass
class UpscalerModel:
    """A loaded upscaler network: spandrel's `ImageModelDescriptor` on a device, in a dtype."""

    descriptor: Any  # spandrel.ImageModelDescriptor
    path: Path
    dtype: torch.dtype

    @property
    def scale(self) -> int:
        return self.descriptor.scale

    @property
    def architecture(self) -> str:
        return self.descriptor.architecture.name

    @property
    def device(self) -> torch.device:
        return self.descriptor.device

    @property
    def multiple_of(self) -> int:
        return self.descriptor.size_requirements.multiple_of

    @property
    def tiles(self) -> bool:
        """False for models that tile internally, which spandrel says must get the whole image."""
        return self.descriptor.tiling.name != "INTERNAL"

    @property
    def image_mode(self) -> str:
        return {1: "L", 3: "RGB", 4: "RGBA"}[self.descriptor.input_channels]

    def __call__(self, x: Tensor) -> Tensor:
        """(1, C, h, w) in [0, 1] on the model's device and dtype -> (1, C', h*scale, w*scale)."""
        return self.descriptor(x)


def choose_dtype(descriptor: Any, device: torch.device, requested: torch.dtype | None = None) -> torch.dtype:
    """The dtype to run an upscaler in (module docstring); `requested` is checked against what
    spandrel says the architecture supports."""
    import torch

    name = descriptor.architecture.name
    if requested is not None:
        if requested == torch.float16 and not descriptor.supports_half:
            raise SdlabError(f"{name} models do not run in fp16 (spandrel marks them so); use fp32"
                             + (" or bf16" if descriptor.supports_bfloat16 else ""))
        if requested == torch.bfloat16 and not descriptor.supports_bfloat16:
            raise SdlabError(f"{name} models do not run in bf16 (spandrel marks them so); use fp32"
                             + (" or fp16" if descriptor.supports_half else ""))
        return requested
    if device.type == "cuda":
        if descriptor.supports_half:
            return torch.float16
        if descriptor.supports_bfloat16 and torch.cuda.is_bf16_supported():
            return torch.bfloat16
    elif device.type == "mps" and descriptor.supports_half:
        return torch.float16
    return torch.float32


def load_upscaler_model(path: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> UpscalerModel:
    """Load an upscaler file through spandrel.

    Args:
        path: a .pth/.pt/.ckpt/.safetensors file of an architecture spandrel knows.
        device: where to run it (default: CUDA when available, else the CPU).
        dtype: None chooses per device and architecture (`choose_dtype`).

    Raises:
        SdlabError: unreadable file, an architecture spandrel does not know, or not an upscaler.
        MissingDependency: spandrel is not installed.
    """
    from .device import choose_device

    spandrel = import_spandrel()
    path = Path(path)
    device = choose_device(device)
    sd = spandrel.canonicalize_state_dict(read_upscaler_file(path))
    try:
        descriptor = spandrel.ModelLoader("cpu").load_from_state_dict(sd)
    except spandrel.UnsupportedModelError:
        raise SdlabError(f"{path}: not an upscaler architecture spandrel knows (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, "
                         "...)") from None
    except Exception as e:  # spandrel's detection asserts on odd shapes
        raise SdlabError(f"{path}: spandrel could not build the model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    arch = descriptor.architecture
    if type(arch).__module__.startswith("spandrel_extra_arches"):
        raise SdlabError(f"{path}: {arch.name} comes from spandrel_extra_arches, whose licences forbid commercial "
                         "use; sdlab does not run it")
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose == "FaceSR":
        what = "a face restoration model" if getattr(descriptor, "purpose", "") == "FaceSR" else "not an upscaler"
        raise SdlabError(f"{path}: {arch.name} is {what}; use an upscaling model (ESRGAN, Real-ESRGAN, SwinIR, ...)")
    if descriptor.input_channels not in (1, 3, 4) or descriptor.output_channels not in (1, 3, 4):
        raise SdlabError(f"{path}: the model takes {descriptor.input_channels} channels and gives "
                         f"{descriptor.output_channels}; sdlab runs models on grey, RGB or RGBA images")
    dtype = choose_dtype(descriptor, device, dtype)
    descriptor.to(device=device, dtype=dtype).eval()
    log.info("%s: %s x%d on %s in %s", path.name, arch.name, descriptor.scale, device, dtype)
    return UpscalerModel(descriptor, path, dtype)


# --------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------

def tile_spans(size: int, tile: int, overlap: int, multiple_of: int = 1) -> list[tuple[int, int]]:
    """(start, length) of the tiles along one axis, placed as the web UI's `images.split_grid`
    places them: as few as cover the axis with at least `overlap` shared, spread evenly so the
    last one ends at the edge. Starts are multiples of `multiple_of`, so that a model that
    pixel-unshuffles sees its 2x2 / 4x4 groups where the whole image has them; the last tile
    grows by what that rounding leaves uncovered."""
    tile = max(tile, 2 * overlap + 1) if tile > 0 else 0
    if tile <= 0 or tile >= size:
        return [(0, size)]
    count = math.ceil((size - overlap) / (tile - overlap))
    step = (size - tile) / (count - 1)
    starts = sorted({min(int(i * step), size - tile) // multiple_of * multiple_of for i in range(count)})
    # Rounding a start down may shorten the overlap with the tile before: that one grows to keep it.
    ends = [max(start + tile, min(size, following + overlap)) for start, following in zip(starts, starts[1:])]
    return [(start, end - start) for start, end in zip(starts, [*ends, size])]


def _axis_weights(spans: list[tuple[int, int]], overlap: int, scale: int) -> list[Tensor]:
    """Each tile's blending weight along one axis, in output pixels: 1 inside, a linear ramp
    across each overlap with a neighbour, 0 on the outer quarter of the nominal overlap at a
    shared edge (see the module docstring)."""
    import torch

    margin = overlap // 4 * scale
    out = []
    for i, (start, length) in enumerate(spans):
        w = torch.ones(length * scale)
        x = torch.arange(length * scale, dtype=torch.float32) + 0.5
        if i > 0:
            shared = (spans[i - 1][0] + spans[i - 1][1] - start) * scale
            if shared > 0:
                w = torch.minimum(w, ((x - margin) / max(shared - 2 * margin, 1)).clamp(0, 1))
        if i < len(spans) - 1:
            shared = (start + length - spans[i + 1][0]) * scale
            if shared > 0:
                w = torch.minimum(w, ((length * scale - x - margin) / max(shared - 2 * margin, 1)).clamp(0, 1))
        out.append(w)
    return out


def _weight_sum(spans: list[tuple[int, int]], weights: list[Tensor], scale: int) -> Tensor:
    import torch

    total = torch.zeros((spans[-1][0] + spans[-1][1]) * scale)
    for (start, _), w in zip(spans, weights):
        total[start * scale:start * scale + len(w)] += w
    return total.clamp_min(1e-12)


def tiled_upscale(model: Callable[[Tensor], Tensor], image: Tensor, scale: int, *, tile: int = DEFAULT_TILE,
                  overlap: int = DEFAULT_OVERLAP, multiple_of: int = 1, device: torch.device | str = "cpu",
                  dtype: torch.dtype | None = None, progress: Callable[[int, int], None] | None = None,
                  ) -> Iterator[tuple[int, Tensor]]:
    """Run `model` over `image` tile by tile; yield the output as it is finished, in bands of
    rows: `(first row, (C, rows, W*scale) float32 on the CPU)`.

    Memory stays bounded whatever the image size: besides the input, one tile and its output
    are on the device, and two bands of at most `tile * scale` rows (the one being filled and the
    rows not finished yet) on the CPU.

    Args:
        model: (1, C, h, w) in [0, 1] -> (1, C', h*scale, w*scale), on `device` in `dtype`.
        image: (C, H, W), uint8 or float in [0, 1], on the CPU.
        tile, overlap: in input pixels; tile 0 runs the whole image at once.
        multiple_of: tile starts are multiples of this (the model's size requirement).
        progress: called with (tiles done, tiles in all) after each tile.
    """
    import torch

    _, height, width = image.shape
    rows = tile_spans(height, tile, overlap, multiple_of)
    cols = tile_spans(width, tile, overlap, multiple_of)
    wy, wx = _axis_weights(rows, overlap, scale), _axis_weights(cols, overlap, scale)
    sy, sx = _weight_sum(rows, wy, scale), _weight_sum(cols, wx, scale)
    total, done = len(rows) * len(cols), 0
    pending: Tensor | None = None  # rows [base, base + len) of the output, not finished yet
    base = 0
    for (y, h), wrow in zip(rows, wy):
        band: Tensor | None = None
        for (x, w), wcol in zip(cols, wx):
            part = image[:, y:y + h, x:x + w]
            if part.dtype == torch.uint8:
                part = part.to(device=device, dtype=torch.float32).div_(255)
            with torch.inference_mode():
                out = model(part.to(device=device, dtype=dtype or part.dtype)[None])[0].float().cpu()
            if out.shape[-2:] != (h * scale, w * scale):
                raise SdlabError(f"the model made a {out.shape[-1]}x{out.shape[-2]} tile from {w}x{h}; "
                                 f"expected x{scale}")
            if band is None:
                band = torch.zeros(out.shape[0], h * scale, width * scale)
            band[:, :, x * scale:(x + w) * scale] += out * wcol
            done += 1
            if progress is not None:
                progress(done, total)
        band /= sx
        band *= (wrow / sy[y * scale:(y + h) * scale])[:, None]
        top = y * scale
        if pending is None:
            pending, base = band, top
            continue
        # Rows above this band are final: nothing later reaches them (starts only grow).
        if top > base:
            yield base, pending[:, :top - base]
        kept = pending[:, top - base:]
        band[:, :kept.shape[1]] += kept
        pending, base = band, top
    if pending is not None:
        yield base, pending


def _upscale_image_with_model(model: UpscalerModel, image: Image.Image, tile: int, overlap: int,
                              progress: Callable[[int, int], None] | None) -> Image.Image:
    """One pass of the model over a PIL image, tiled, into a uint8 image."""
    import numpy as np
    import torch

    mode = model.image_mode
    src = torch.from_numpy(np.array(image.convert(mode), dtype=np.uint8).reshape(image.height, image.width, -1))
    src = src.permute(2, 0, 1)  # (C, H, W), a view: the input is not copied again
    channels = model.descriptor.output_channels
    out = np.empty((image.height * model.scale, image.width * model.scale, channels), dtype=np.uint8)
    for y, rows in tiled_upscale(model, src, model.scale, tile=tile if model.tiles else 0, overlap=overlap,
                                 multiple_of=model.multiple_of, device=model.device, dtype=model.dtype,
                                 progress=progress):
        out[y:y + rows.shape[1]] = rows.clamp_(0, 1).mul_(255).round_().to(torch.uint8).permute(1, 2, 0).numpy()
    result = Image.fromarray(out[:, :, 0] if channels == 1 else out, {1: "L", 3: "RGB", 4: "RGBA"}[channels])
    return result if result.mode == "RGB" else result.convert("RGB")


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UpscalerEntry:
    """One upscaler as /sdapi/v1/upscalers lists it."""

    name: str
    path: Path | None  # None for the built-ins
    folder: str | None  # the models-root folder it was found in
    scale: float  # the listing's scale: from the file name ("4x-..."), else 4 as the web UI reports

    @property
    def model_name(self) -> str | None:
        return FOLDERS.get(self.folder) if self.folder else None


@dataclass(frozen=True)
class UpscaleProgress:
    upscaler: str
    done: int  # tiles done, over all model passes of this upscale
    total: int


ProgressFn = Callable[[UpscaleProgress], None]


class Upscalers:
    """The upscalers of one models folder, and the one model file loaded last.

    Cheap to create; every listing reads the folders afresh. Thread-safe: one upscale runs at
    a time (the loaded model is shared).

    Args:
        root: the models root (the web UI's `models/`), holding ESRGAN/, RealESRGAN/, ... .
        device: where models run (default: CUDA when available, else the CPU).
        dtype: None chooses per device and architecture (module docstring).
        tile, overlap: tiling in input pixels (the web UI's ESRGAN_tile / ESRGAN_tile_overlap).
        max_pixels: refuse an upscale whose result, or an intermediate model pass, would have
            more pixels than this (None: no limit).
        allow_paths: also accept a path to a model file as a name (the CLI; never the server).
    """

    def __init__(self, root: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                 max_pixels: int | None = None, allow_paths: bool = False):
        from .models_dir import ModelsDir

        if tile < 0 or overlap < 0 or (tile and overlap * 2 >= tile):
            raise SdlabError(f"tile {tile} and overlap {overlap}: the overlap must be under half the tile "
                             "(tile 0: no tiling)")
        self.root = ModelsDir(root).root
        self.device = device
        self.dtype = dtype
        self.tile, self.overlap = tile, overlap
        self.max_pixels = max_pixels
        self.allow_paths = allow_paths
        self._lock = threading.RLock()
        self._loaded: UpscalerModel | None = None
        self._scales: dict[Path, int] = {}  # true scales of the files loaded so far

    def list(self) -> list[UpscalerEntry]:
        """"None", "Lanczos", "Nearest", then the model files by name (case-insensitive). A name
        found in two folders is listed once, from the first folder in `FOLDERS`."""
        entries: dict[str, UpscalerEntry] = {}
        for folder in FOLDERS:
            base = self.root / folder
            if not base.is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in sorted(filenames):
                    p = Path(dirpath) / f
                    if f.startswith(".") or p.suffix.lower() not in MODEL_SUFFIXES:
                        continue
                    if not p.resolve().is_relative_to(base.resolve()):
                        log.warning("%s: links outside %s; left out", p, base)
                        continue
                    if p.stem in entries or p.stem in BUILTIN:
                        log.info("upscaler %r is in two places; using %s", p.stem, entries.get(p.stem, p.stem))
                        continue
                    entries[p.stem] = UpscalerEntry(p.stem, p, folder, self._listed_scale(p))
        builtins = [UpscalerEntry(name, None, None, 4) for name in BUILTIN]
        return builtins + sorted(entries.values(), key=lambda e: e.name.lower())

    def _listed_scale(self, path: Path) -> float:
        if path.resolve() in self._scales:
            return self._scales[path.resolve()]
        m = _SCALE_IN_NAME.search(path.stem)
        return int(m.group(1) or m.group(2)) if m else 4

    def find(self, name: str) -> UpscalerEntry:
        """The upscaler of that name (exact, then ignoring case; the CLI also takes a file path).

        Raises:
            SdlabError: no upscaler has that name; the message lists those there are.
        """
        entries = self.list()
        for match in (lambda e: e.name == name, lambda e: e.name.lower() == name.strip().lower()):
            hit = next((e for e in entries if match(e)), None)
            if hit is not None:
                return hit
        if self.allow_paths:
            p = Path(name).expanduser()
            if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES:
                return UpscalerEntry(p.stem, p, None, self._listed_scale(p))
        names = [e.name for e in entries]
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        where = ", ".join(f"{f}/" for f in FOLDERS)
        raise SdlabError(f"no upscaler named {name!r} (available: {shown}; model files go in {where} under "
                         f"{self.root})")

    def model(self, entry: UpscalerEntry) -> UpscalerModel:
        """The loaded model of a file entry (the last one stays loaded)."""
        with self._lock:
            if self._loaded is None or self._loaded.path != entry.path:
                self._loaded = None  # free the old one first
                self._loaded = load_upscaler_model(entry.path, self.device, self.dtype)
                self._scales[entry.path.resolve()] = self._loaded.scale
            return self._loaded

    def upscale(self, image: Image.Image, name: str, scale: float,
                progress: ProgressFn | None = None) -> Image.Image:
        """Upscale by `scale` with the named upscaler, as the web UI's `Upscaler.upscale`: the
        result is `int(w*scale)//8*8` x `int(h*scale)//8*8`.

        Raises:
            SdlabError: unknown name, a result under 8 pixels, or over `max_pixels`.
        """
        entry = self.find(name)
        dest = (int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8))
        if dest[0] < 8 or dest[1] < 8:
            raise SdlabError(f"upscaling {image.width}x{image.height} by {scale:g} gives less than 8 pixels a side")
        self._check_size(dest, f"upscaling {image.width}x{image.height} by {scale:g}")
        with self._lock:
            if entry.path is None:
                step = _builtin_step(entry.name, scale)
                total = 0
            else:
                model = self.model(entry)
                step = None
                total = self._planned_tiles(image.size, dest, model)
            done = 0

            def tile_done(n: int, _: int) -> None:
                if progress is not None:
                    progress(UpscaleProgress(entry.name, done + n, total))

            for _ in range(3):
                before = image.size
                if step is not None:
                    image = step(image)
                else:
                    self._check_size((image.width * model.scale, image.height * model.scale),
                                     f"the {entry.name} pass on {image.width}x{image.height}")
                    image = _upscale_image_with_model(model, image, self.tile, self.overlap, tile_done)
                    done = self._tiles(before, model) + done
                if image.size == before or (image.width >= dest[0] and image.height >= dest[1]):
                    break
        if image.size != dest:
            image = image.resize(dest, resample=Image.Resampling.LANCZOS)
        return image

    def _tiles(self, size: tuple[int, int], model: UpscalerModel) -> int:
        tile = self.tile if model.tiles else 0
        return (len(tile_spans(size[0], tile, self.overlap, model.multiple_of))
                * len(tile_spans(size[1], tile, self.overlap, model.multiple_of)))

    def _planned_tiles(self, size: tuple[int, int], dest: tuple[int, int], model: UpscalerModel) -> int:
        total = 0
        for _ in range(3):
            total += self._tiles(size, model)
            size = (size[0] * model.scale, size[1] * model.scale)
            if model.scale <= 1 or (size[0] >= dest[0] and size[1] >= dest[1]):
                break
        return total

    def _check_size(self, size: tuple[int, int], what: str) -> None:
        if self.max_pixels is not None and size[0] * size[1] > self.max_pixels:
            raise SdlabError(f"{what} makes {size[0]}x{size[1]}, more pixels than this server allows "
                            f"({self.max_pixels})")


def _builtin_step(name: str, scale: float) -> Callable[[Image.Image], Image.Image]:
    if name == "None":
        return lambda img: img
    resample = Image.Resampling.LANCZOS if name == "Lanczos" else Image.Resampling.NEAREST
    return lambda img: img.resize((int(img.width * scale), int(img.height * scale)), resample=resample)


# --------------------------------------------------------------------------------------
# The Extras tab's "Upscale"
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExtrasUpscale:
    """The web UI's postprocessing upscale (`scripts/postprocessing_upscale.py`)."""

    upscaler_1: str = "None"  # "None": no upscaling at all
    upscaler_2: str = "None"
    upscaler_2_visibility: float = 0.0  # Image.blend(first, second, visibility)
    resize_mode: Literal[0, 1] = 0  # 0: scale by upscale_by; 1: scale to upscale_to_width x _height
    upscale_by: float = 2.0
    upscale_to_width: int = 512
    upscale_to_height: int = 512
    upscale_crop: bool = True  # resize_mode 1: paste centred on a black canvas of exactly that size

    def __post_init__(self) -> None:
        if self.resize_mode not in (0, 1):
            raise SdlabError(f"resize_mode must be 0 (scale by) or 1 (scale to), got {self.resize_mode!r}")
        if self.resize_mode == 0 and not self.upscale_by > 0:
            raise SdlabError(f"the upscale factor must be above 0, got {self.upscale_by}")
        if self.resize_mode == 1 and (self.upscale_to_width < 1 or self.upscale_to_height < 1):
            raise SdlabError(f"the target size must be at least 1x1, got "
                             f"{self.upscale_to_width}x{self.upscale_to_height}")
        if not 0 <= self.upscaler_2_visibility <= 1:
            raise SdlabError(f"the second upscaler's visibility must be 0-1, got {self.upscaler_2_visibility}")


def upscale_extras(image: Image.Image, options: ExtrasUpscale, upscalers: Upscalers,
                   progress: ProgressFn | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """The Extras tab's upscale of one image, as the web UI does it.

    Returns:
        The RGB result, and the `postprocessing` infotext entries (`postprocess_infotext`
        joins them); both upscalers start from the original image.
    """
    image = image.convert("RGB")
    info: dict[str, Any] = {}
    if options.upscaler_1 == "None":
        return image, info
    first = upscalers.find(options.upscaler_1)
    second = None if options.upscaler_2 == "None" else upscalers.find(options.upscaler_2)
    result = _extras_pass(image, first.name, options, upscalers, info, progress)
    info["Postprocess upscaler"] = first.name
    if second is not None and options.upscaler_2_visibility > 0:
        other = _extras_pass(image, second.name, options, upscalers, info, progress)
        result = Image.blend(result, other.convert(result.mode), options.upscaler_2_visibility)
        info["Postprocess upscaler 2"] = second.name
    return result, info


def _extras_pass(image: Image.Image, name: str, options: ExtrasUpscale, upscalers: Upscalers, info: dict[str, Any],
                 progress: ProgressFn | None) -> Image.Image:
    width, height = options.upscale_to_width, options.upscale_to_height
    if options.resize_mode == 1:
        scale = max(width / image.width, height / image.height)
        info["Postprocess upscale to"] = f"{width}x{height}"
    else:
        scale = options.upscale_by
        info["Postprocess upscale by"] = options.upscale_by
    result = upscalers.upscale(image, name, scale, progress)
    if options.resize_mode == 1 and options.upscale_crop:
        canvas = Image.new("RGB", (width, height))
        canvas.paste(result, (width // 2 - result.width // 2, height // 2 - result.height // 2))
        result = canvas
        info["Postprocess crop to"] = f"{width}x{height}"
    return result


def postprocess_infotext(info: dict[str, Any]) -> str:
    """The `postprocessing` PNG text the web UI writes: `key: value` pairs joined by ", "."""
    from .infotext import format_value, quote

    return ", ".join(k if format_value(v) == k else f"{k}: {quote(v)}" for k, v in info.items() if v is not None)
