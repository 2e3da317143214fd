"""The pieces every checkpoint reader builds with: the `Bundle` of loaded networks, and the lazy,
cast-once assignment of a file's tensors to networks built on the meta device (DESIGN.md
decision 2). `loader` (SD 1.x, 2.x, SDXL) and `sd3` both build through these.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import SdlabError
from ..families import UNET_PREFIX, VAE_PREFIX, ModelConfig, Prediction
from ..models.clip import CLIPTextModel
from ..models.mmdit import MMDiT
from ..models.storage import compute_dtype, narrowable, narrowed, set_dtypes
from ..models.t5 import T5Encoder
from ..models.unet import UNet
from ..models.vae import AutoencoderKL
from ..text.t5_tokenizer import T5Tokenizer
from ..text.tokenizer import CLIPTokenizer
from .diffusers_folder import tokenizer_pad_token
from .io import StateDict, cast_floating

__all__ = ["Bundle", "build", "file_sha256", "skip_init_on_meta", "take", "tokenizer_for"]


@dataclass
class Bundle:
    """The networks of one loaded model, with what is needed to use them."""

    config: ModelConfig
    unet: UNet | MMDiT  # the denoiser: SD3's MMDiT for the flow families (also as `denoiser`)
    vae: AutoencoderKL
    text_encoders: list[CLIPTextModel | T5Encoder]
    tokenizers: list[CLIPTokenizer | T5Tokenizer]
    name: str = "model"
    source: Path | None = None
    has_ema: bool = False
    used_ema: bool = False
    # The caller chose the prediction type (`--prediction`) instead of the file and detection:
    # the infotext records it then, so that a replay chooses it too.
    prediction_forced: bool = False
    # The file's SHA-256, when whoever loaded it already knows it (else computed when first asked).
    sha256: str | None = field(default=None, repr=False)

    @property
    def family(self):
        return self.config.family

    @property
    def denoiser(self) -> UNet | MMDiT:
        return self.unet

    @property
    def prediction(self) -> Prediction:
        return self.config.family.prediction

    @property
    def device(self) -> torch.device:
        """Where the bundle computes: the GPU when offloaded (`perf.ModelOffload`, whose weights
        wait in CPU memory), else where the UNet's weights are."""
        offload = getattr(self.unet, "sdlab_offload", None)
        return offload.device if offload is not None else next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.unet)

    @property
    def short_hash(self) -> str | None:
        """The web UIs' model hash: the first 10 hex digits of the file's SHA-256."""
        if self.sha256 is None and self.source is not None and self.source.is_file():
            self.sha256 = file_sha256(self.source)
        return self.sha256[:10] if self.sha256 is not None else None

    def networks(self) -> dict[str, nn.Module]:
        nets = {"unet": self.unet, "vae": self.vae}
        nets.update({f"text_encoder{'' if i == 0 else '_' + str(i + 1)}": te for i, te in enumerate(self.text_encoders)})
        return nets

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """All weights in the native single-file layout; the floating-point ones in `dtype` if given."""
        sd = {UNET_PREFIX + k: v for k, v in self.unet.state_dict().items()}
        sd.update({VAE_PREFIX + k: v for k, v in self.vae.state_dict().items()})
        for slot, te in zip(self.family.text_encoders, self.text_encoders):
            sd.update({slot.prefix + k: v for k, v in te.state_dict().items()})
        return {k: cast_floating(v, dtype) for k, v in sd.items()}


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Lazy:
    """A tensor not read yet: the file is touched only when the network takes it."""

    __slots__ = ("sd", "key")

    def __init__(self, sd: StateDict, key: str):
        self.sd, self.key = sd, key

    def __call__(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.sd.read(self.key, dtype)

    @property
    def stored_dtype(self) -> torch.dtype:
        return self.sd.dtypes[self.key]


def take(sd: StateDict, prefix: str) -> dict[str, Lazy]:
    """The entries under a prefix, prefix stripped, not yet read."""
    return {k[len(prefix):]: Lazy(sd, k) for k in sd.keys() if k.startswith(prefix)}


def build(cls, cfg, entries: dict[str, Lazy], dtype: torch.dtype, what: str, path: Path,
           weight_dtype: torch.dtype | None = None) -> nn.Module:
    if not entries:
        raise SdlabError(f"{path}: has no {what} weights")
    with torch.device("meta"), skip_init_on_meta():
        module = cls(cfg)
    narrow = narrowable(module, weight_dtype) if weight_dtype not in (None, dtype) else {}
    ignored = [re.compile(p) for p in getattr(module, "IGNORED_KEYS", ())]
    expected = module.state_dict()
    tensors, unexpected = {}, []
    for k, lazy in entries.items():
        if k not in expected:
            if not any(rx.search(k) for rx in ignored):
                unexpected.append(k)
            continue
        if k in narrow and lazy.stored_dtype == weight_dtype:
            t = lazy(weight_dtype)  # an fp16 file into fp16 storage: as it is
        else:
            t = lazy(dtype)  # cast as it is read: the file's own copy is never held whole
            if k in narrow:
                t = narrowed(t, weight_dtype, dtype)
        if tuple(t.shape) != tuple(expected[k].shape):
            # Some checkpoints keep 1x1 conv weights as 2-D matrices; let the module's hook decide.
            if t.numel() != expected[k].numel():
                raise SdlabError(f"{path}: {what} weight {k} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(expected[k].shape)}; the file does not match its detected model type")
        tensors[k] = t
    missing = [k for k in expected if k not in tensors]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}"
                         f"{', ...' if len(unexpected) > 3 else ''})")
        raise SdlabError(f"{path}: {what} keys do not match: {'; '.join(parts)}")
    module.load_state_dict(tensors, strict=True, assign=True)
    materialize_buffers(module)
    if narrow:
        set_dtypes(module.requires_grad_(False), dtype, weight_dtype)
    return module


def skip_init_on_meta():
    """Initialisers applied to meta tensors do nothing here: there is nothing to fill, and on
    meta `normal_` alone costs a `torch._dynamo` import (about a second and 70 MiB)."""
    from torch.overrides import TorchFunctionMode

    inplace_inits = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_}

    class SkipMetaInit(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in inplace_inits or getattr(func, "__module__", None) == "torch.nn.init":
                target = args[0] if args else kwargs.get("tensor")  # nn.init passes it by keyword
                if isinstance(target, torch.Tensor) and target.is_meta:
                    return target
            return func(*args, **kwargs)

    return SkipMetaInit()


def materialize_buffers(module: nn.Module) -> None:
    """Non-persistent buffers are not in the file; rebuild any left on the meta device."""
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            raise SdlabError(f"internal error: buffer {name} was not loaded")


def tokenizer_for(path: Path, slot, index: int) -> CLIPTokenizer:
    folder = path / slot.tokenizer_folder if path.is_dir() else None
    if folder is not None and (folder / "vocab.json").exists():
        tok = CLIPTokenizer.from_files(folder / "vocab.json", folder / "merges.txt", pad_token=slot.pad_token)
    else:
        tok = CLIPTokenizer(pad_token=slot.pad_token)
    # Padded as the folder's own pipelines pad, which may differ from the family's rule.
    pad = tokenizer_pad_token(folder, tok.vocab, slot.pad_token) if folder is not None and folder.is_dir() else None
    if pad is None or pad == slot.pad_token:
        return tok
    if (folder / "vocab.json").exists():
        return CLIPTokenizer.from_files(folder / "vocab.json", folder / "merges.txt", pad_token=pad)
    return CLIPTokenizer(pad_token=pad)
