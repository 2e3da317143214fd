"""From a file, folder or hub id to a `Bundle` of built networks.

Networks are built on the meta device and the checkpoint's tensors are assigned
to them (`load_state_dict(assign=True)`), each cast once to the target dtype, so
no second copy of the weights is ever made (DESIGN.md decision 2).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ..demo_model import builtin_model
from ..device import vae_dtype
from ..errors import SdlabError
from ..families import UNET_PREFIX, VAE_PREFIX, ModelConfig, Prediction, model_config, with_prediction
from ..models.clip import CLIPTextModel
from ..models.mmdit import MMDiT
from ..models.t5 import T5Config, T5Encoder
from ..models.storage import compute_dtype
from ..models.unet import UNet
from ..models.vae import AutoencoderKL
from ..text.t5_tokenizer import T5Tokenizer
from ..text.tokenizer import CLIPTokenizer
from . import sd3
from .building import Bundle, Lazy, build, file_sha256, take, tokenizer_for
from .diffusers_folder import is_diffusers_folder, read_diffusers_folder
from .io import StateDict, atomic_write, read_state_dict, save_safetensors

__all__ = ["EMA_PREFIX", "Bundle", "config_of", "file_sha256", "load_bundle", "looks_like_repo_id",
           "looks_like_v_prediction", "new_bundle", "open_model", "save_checkpoint"]

log = logging.getLogger(__name__)

EMA_PREFIX = "model_ema."


def open_model(model: str | Path) -> tuple[StateDict, Path]:
    """Resolve a path, diffusers folder, `demo` (the built-in model) or hub repo id to a (lazy)
    native state dict."""
    path = Path(model).expanduser()
    if sd3.is_sd3_folder(path):
        return sd3.read_sd3_folder(path)[0], path
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
                weight_dtype: torch.dtype | None = None,
                text_encoder_files: dict[str, str | Path] | None = None, t5_max_length: int = 77,
                text_encoder_dirs: list[Path] | None = None, vae_file: str | Path | None = None) -> Bundle:
    """Load a checkpoint file, diffusers folder or hub repo id into a Bundle.

    Args:
        model: a .safetensors/.ckpt path, a diffusers folder, or a hub repo id.
        device: where the networks run (default: CUDA when available, else CPU).
        dtype: dtype the UNet and text encoders compute in (default fp16 on CUDA, fp32 on CPU).
        weight_dtype: keep their matrices in this narrower dtype, upcast layer by layer as they
            run (`models.storage`; default: `dtype`). Read from the file straight into it.
        prediction: "eps" or "v" to override what detection decides.
        use_ema: take the EMA weights when the file holds both EMA and raw ones.
        text_encoder_files: SD3: separate encoder files by name ("clip_l", "clip_g", "t5xxl"),
            which win over the checkpoint's own copies.
        t5_max_length: SD3: T5 tokens per prompt chunk (77 as the reference; diffusers' 256).
        text_encoder_dirs: SD3: folders where encoders that are neither given nor in the checkpoint
            are looked for (clip_l*.safetensors, clip_g*.safetensors, t5xxl*.safetensors).
        vae_file: SD3: the VAE of a checkpoint that carries none (sd3.5_large.safetensors), a
            16-channel VAE file in the original or diffusers layout. (Replacing a model's own VAE
            is `Pipeline.use_vae`, for every family.)
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or default_dtype(device)
    sd, path = open_model(model)
    if sd3.is_sd3(sd):
        return sd3.load(sd, path, device, dtype, weight_dtype, text_encoder_files, t5_max_length, text_encoder_dirs,
                        vae_file)
    cfg = config_of(sd, prediction)
    saved_prediction = sd.metadata.get("sdlab.prediction")
    if prediction is None and saved_prediction in ("eps", "v"):
        cfg = with_prediction(cfg, saved_prediction)

    has_ema = any(k.startswith(EMA_PREFIX) and k not in ("model_ema.decay", "model_ema.num_updates") for k in sd)
    unet_sd = take(sd, UNET_PREFIX)
    used_ema = False
    if has_ema and use_ema:
        unet_sd, used_ema = _with_ema(sd, unet_sd)

    unet = build(UNet, cfg.unet, unet_sd, dtype, "UNet", path, weight_dtype)
    # The VAE loads straight in the dtype it runs in (fp32 on the CPU, see device.vae_dtype): loaded
    # in `dtype` and upcast later, an fp32 file's VAE would lose its bits to bf16 and briefly be
    # held twice.
    vae = build(AutoencoderKL, cfg.vae, take(sd, VAE_PREFIX), vae_dtype(device, dtype, cfg.family.name),
                 "VAE", path)
    text_encoders = [build(CLIPTextModel, te_cfg, take(sd, slot.prefix), dtype, "text encoder", path, weight_dtype)
                     for slot, te_cfg in zip(cfg.family.text_encoders, cfg.text_encoders)]

    if prediction is None and saved_prediction is None and cfg.family.name == "sd2":
        if looks_like_v_prediction(unet):
            cfg = with_prediction(cfg, "v")
            log.info("%s: detected v-prediction (override with --prediction eps)", path.name)

    tokenizers = [tokenizer_for(path, slot, i) for i, slot in enumerate(cfg.family.text_encoders)]
    bundle = Bundle(cfg, unet, vae, text_encoders, tokenizers, name=path.stem if path.is_file() else path.name,
                    source=path, has_ema=has_ema, used_ema=used_ema, prediction_forced=prediction is not None)
    for net in bundle.networks().values():
        net.to(device).eval().requires_grad_(False)
    return bundle


def _with_ema(sd: StateDict, unet_sd: dict[str, Lazy]) -> tuple[dict[str, Lazy], bool]:
    """EMA twins are stored as `model_ema.diffusion_model<path without dots>`."""
    out, found = {}, 0
    for k, lazy in unet_sd.items():
        ema_key = EMA_PREFIX + ("diffusion_model." + k).replace(".", "")
        if ema_key in sd:
            out[k], found = Lazy(sd, ema_key), found + 1
        else:
            out[k] = lazy
    return out, found > 0


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
    t5 = sd3.slot_of("t5xxl").prefix
    if t5 + "shared.weight" in sd:
        # Released SD3 files hold T5's tied token table under both names: the web UI detects T5 by
        # the second, and diffusers' single-file loader leaves it unset without it.
        sd[t5 + "encoder.embed_tokens.weight"] = sd[t5 + "shared.weight"].clone()
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
        unet = (MMDiT if cfg.family.is_flow else UNet)(cfg.unet)
        vae = AutoencoderKL(cfg.vae)
        tes = [T5Encoder(c) if isinstance(c, T5Config) else CLIPTextModel(c) for c in cfg.text_encoders]
    if init_std is not None:
        with torch.no_grad():
            for net in [unet, vae, *tes]:
                for p in net.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * init_std)
    tokenizers = [T5Tokenizer() if slot.layout == "t5" else CLIPTokenizer(pad_token=slot.pad_token)
                  for slot in cfg.family.text_encoders]
    bundle = Bundle(cfg, unet, vae, tes, tokenizers, name=name)
    for net in bundle.networks().values():
        net.eval().requires_grad_(False)
    return bundle
