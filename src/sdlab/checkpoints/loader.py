"""From a file, folder or hub id to a `Bundle` of built networks.

Networks are built on the meta device and the checkpoint's tensors are assigned
to them (`load_state_dict(assign=True)`), each cast once to the target dtype, so
no second copy of the weights is ever made (DESIGN.md decision 2).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..demo_model import builtin_model
from ..device import vae_dtype
from ..errors import SdlabError
from ..families import UNET_PREFIX, VAE_PREFIX, ModelConfig, Prediction, model_config, with_prediction
from ..models.clip import CLIPTextModel
from ..models.storage import compute_dtype, narrowable, narrowed, set_dtypes
from ..models.unet import UNet
from ..models.vae import AutoencoderKL
from ..text.tokenizer import CLIPTokenizer
from .diffusers_folder import is_diffusers_folder, read_diffusers_folder, tokenizer_pad_token
from .io import StateDict, atomic_write, cast_floating, read_state_dict, save_safetensors

log = logging.getLogger(__name__)

EMA_PREFIX = "model_ema."


@dataclass
class Bundle:
    """The networks of one loaded model, with what is needed to use them."""

    config: ModelConfig
    unet: UNet
    vae: AutoencoderKL
    text_encoders: list[CLIPTextModel]
    tokenizers: list[CLIPTokenizer]
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


def open_model(model: str | Path) -> tuple[StateDict, Path]:
    """Resolve a path, diffusers folder, `demo` (the built-in model) or hub repo id to a (lazy)
    native state dict."""
    path = Path(model).expanduser()
    if is_diffusers_folder(path):
        sd, _ = read_diffusers_folder(path)
        return sd, path
    if path.exists():
        return read_state_dict(path), path
    if (demo := builtin_model(model)) is not None:
        return open_model(demo)
    if looks_like_repo_id(str(model)):
        return open_model(_download(str(model)))
    raise SdlabError(f"{model}: no such file or folder")


def looks_like_repo_id(text: str) -> bool:
    """`owner/name`, as a Hugging Face repo id is written (a missing local file is not one)."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and not text.endswith((".safetensors", ".ckpt"))


def _download(repo_id: str) -> Path:
    from ..optional import require

    hub = require("huggingface_hub", extra="hub", otherwise="give a local path",
                  purpose=f"{repo_id} looks like a Hugging Face repo id; downloading it")
    try:
        return Path(hub.snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"],
                                          ignore_patterns=["*.fp16.*", "*non_ema*", "*ema_only*"]))
    except Exception as e:  # network, auth, missing repo: all one message for the user
        raise SdlabError(f"{repo_id}: could not download from the Hugging Face hub ({str(e).splitlines()[0][:160]})") from None


def config_of(sd: StateDict, prediction: Prediction | None = None) -> ModelConfig:
    """The model config of an opened checkpoint; errors name the file."""
    try:
        return model_config(sd.shapes, sd.metadata, prediction=prediction)
    except SdlabError as e:
        raise SdlabError(f"{sd.path}: {e}") from None


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def load_bundle(model: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                prediction: Prediction | None = None, use_ema: bool = True,
                weight_dtype: torch.dtype | None = None) -> Bundle:
    """Load a checkpoint file, diffusers folder or hub repo id into a Bundle.

    Args:
        model: a .safetensors/.ckpt path, a diffusers folder, or a hub repo id.
        device: where the networks run (default: CUDA when available, else CPU).
        dtype: dtype the UNet and text encoders compute in (default fp16 on CUDA, fp32 on CPU).
        weight_dtype: keep their matrices in this narrower dtype, upcast layer by layer as they
            run (`models.storage`; default: `dtype`). Read from the file straight into it.
        prediction: "eps" or "v" to override what detection decides.
        use_ema: take the EMA weights when the file holds both EMA and raw ones.
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or default_dtype(device)
    sd, path = open_model(model)
    cfg = config_of(sd, prediction)
    saved_prediction = sd.metadata.get("sdlab.prediction")
    if prediction is None and saved_prediction in ("eps", "v"):
        cfg = with_prediction(cfg, saved_prediction)

    has_ema = any(k.startswith(EMA_PREFIX) and k not in ("model_ema.decay", "model_ema.num_updates") for k in sd)
    unet_sd = _take(sd, UNET_PREFIX)
    used_ema = False
    if has_ema and use_ema:
        unet_sd, used_ema = _with_ema(sd, unet_sd)

    unet = _build(UNet, cfg.unet, unet_sd, dtype, "UNet", path, weight_dtype)
    # The VAE loads straight in the dtype it runs in (fp32 on the CPU, see device.vae_dtype): loaded
    # in `dtype` and upcast later, an fp32 file's VAE would lose its bits to bf16 and briefly be
    # held twice.
    vae = _build(AutoencoderKL, cfg.vae, _take(sd, VAE_PREFIX), vae_dtype(device, dtype, cfg.family.name),
                 "VAE", path)
    text_encoders = [_build(CLIPTextModel, te_cfg, _take(sd, slot.prefix), dtype, "text encoder", path, weight_dtype)
                     for slot, te_cfg in zip(cfg.family.text_encoders, cfg.text_encoders)]

    if prediction is None and saved_prediction is None and cfg.family.name == "sd2":
        if looks_like_v_prediction(unet):
            cfg = with_prediction(cfg, "v")
            log.info("%s: detected v-prediction (override with --prediction eps)", path.name)

    tokenizers = [_tokenizer_for(path, slot, i) for i, slot in enumerate(cfg.family.text_encoders)]
    bundle = Bundle(cfg, unet, vae, text_encoders, tokenizers, name=path.stem if path.is_file() else path.name,
                    source=path, has_ema=has_ema, used_ema=used_ema, prediction_forced=prediction is not None)
    for net in bundle.networks().values():
        net.to(device).eval().requires_grad_(False)
    return bundle


class _Lazy:
    """A tensor not read yet: the file is touched only when the network takes it."""

    __slots__ = ("sd", "key")

    def __init__(self, sd: StateDict, key: str):
        self.sd, self.key = sd, key

    def __call__(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.sd.read(self.key, dtype)

    @property
    def stored_dtype(self) -> torch.dtype:
        return self.sd.dtypes[self.key]


def _take(sd: StateDict, prefix: str) -> dict[str, _Lazy]:
    """The entries under a prefix, prefix stripped, not yet read."""
    return {k[len(prefix):]: _Lazy(sd, k) for k in sd.keys() if k.startswith(prefix)}


def _with_ema(sd: StateDict, unet_sd: dict[str, _Lazy]) -> tuple[dict[str, _Lazy], bool]:
    """EMA twins are stored as `model_ema.diffusion_model<path without dots>`."""
    out, found = {}, 0
    for k, lazy in unet_sd.items():
        ema_key = EMA_PREFIX + ("diffusion_model." + k).replace(".", "")
        if ema_key in sd:
            out[k], found = _Lazy(sd, ema_key), found + 1
        else:
            out[k] = lazy
    return out, found > 0


def _build(cls, cfg, entries: dict[str, _Lazy], dtype: torch.dtype, what: str, path: Path,
           weight_dtype: torch.dtype | None = None) -> nn.Module:
    if not entries:
        raise SdlabError(f"{path}: has no {what} weights")
    with torch.device("meta"), _skip_init_on_meta():
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
    _materialize_buffers(module)
    if narrow:
        set_dtypes(module.requires_grad_(False), dtype, weight_dtype)
    return module


def _skip_init_on_meta():
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


def _materialize_buffers(module: nn.Module) -> None:
    """Non-persistent buffers are not in the file; rebuild any left on the meta device."""
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            raise SdlabError(f"internal error: buffer {name} was not loaded")


@torch.no_grad()
def looks_like_v_prediction(unet: UNet) -> bool:
    """The web UIs' test for SD 2.x checkpoints, which do not say what they predict:
    on a constant input at t=999, a v-model's output is strongly negative relative to
    the input, an eps-model's is not (A1111 `is_using_v_parameterization_for_sd2`)."""
    p, dtype = next(unet.parameters()), compute_dtype(unet)
    x = torch.full((1, unet.cfg.in_channels, 8, 8), 0.5, device=p.device, dtype=dtype)
    ctx = torch.full((1, 2, unet.cfg.context_dim), 0.5, device=p.device, dtype=dtype)
    out = unet(x, torch.tensor([999.0], device=p.device), ctx)
    return (out.float() - x.float()).mean().item() < -1


def _tokenizer_for(path: Path, slot, index: int) -> CLIPTokenizer:
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


def save_checkpoint(bundle: Bundle, path: str | Path, dtype: torch.dtype | None = None,
                    metadata: dict[str, str] | None = None) -> None:
    """Write the bundle as one native-layout .safetensors file (atomically), with
    its exact config in the metadata so sdlab reloads it without guessing; or, for a `.ckpt`
    path, as the original `{"state_dict": ...}` pickle of tensors, with the same metadata strings
    beside it (other tools read only the state dict, and the marker keys)."""
    sd = bundle.state_dict(dtype)
    meta = {"sdlab.config": bundle.config.to_json(), "sdlab.prediction": bundle.prediction,
            "modelspec.architecture": bundle.family.name, "modelspec.prediction_type": bundle.prediction}
    meta.update(metadata or {})
    # The marker keys ComfyUI (supported_models.SDXL.model_type) and the web UIs read to sample
    # such a model right; `families.model_config` reads them too.
    if bundle.prediction == "v":
        sd["v_pred"] = torch.tensor([])
    if bundle.family.zero_terminal_snr:
        sd["ztsnr"] = torch.tensor([])
    if Path(path).suffix == ".ckpt":
        data = {"state_dict": {k: v.detach().contiguous().cpu() for k, v in sd.items()}, "metadata": meta}
        atomic_write(Path(path), lambda tmp: torch.save(data, tmp))
    else:
        save_safetensors(sd, path, meta)


def new_bundle(cfg: ModelConfig, seed: int = 0, init_std: float | None = None, name: str = "new-model") -> Bundle:
    """A Bundle of freshly initialised networks (training from scratch, tests, benchmarks).

    `init_std` replaces every parameter with N(0, init_std) noise instead of the modules'
    own initialisation: tests use it so no layer starts at zero and hides a wrong key.
    """
    gen = torch.Generator("cpu").manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae = UNet(cfg.unet), AutoencoderKL(cfg.vae)
        tes = [CLIPTextModel(c) for c in cfg.text_encoders]
    if init_std is not None:
        with torch.no_grad():
            for net in [unet, vae, *tes]:
                for p in net.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * init_std)
    tokenizers = [CLIPTokenizer(pad_token=slot.pad_token) for slot in cfg.family.text_encoders]
    bundle = Bundle(cfg, unet, vae, tes, tokenizers, name=name)
    for net in bundle.networks().values():
        net.eval().requires_grad_(False)
    return bundle
