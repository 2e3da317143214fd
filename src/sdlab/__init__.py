"""sdlab: Stable Diffusion in Python.

    import sdlab
    pipe = sdlab.load("v1-5-pruned-emaonly.safetensors")   # or sdlab.load() for the demo model
    image = pipe.txt2img("a red circle on a blue background", seed=42)[0]
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ._version import __version__
from .demo_model import builtin_model, demo_model_path

if TYPE_CHECKING:
    import torch

    from .pipeline import Pipeline


def load(model: str | Path | None = None, device: str | None = None, dtype: "torch.dtype | None" = None,
         prediction: str | None = None, use_ema: bool = True, models_dir: str | Path | None = None,
         compile: bool = False, offload: bool = False, weight_dtype: "torch.dtype | None" = None,
         text_encoder_files: "dict[str, str | Path] | None" = None, t5_max_length: int = 77,
         vae: str | Path | None = None) -> "Pipeline":
    """Load a model and return a Pipeline (`txt2img`, `img2img`, `inpaint`).

    Args:
        model: a .safetensors/.ckpt file, a diffusers folder or a hub repo id;
            None or "demo" for the built-in demo model (a file or folder named demo wins).
        device: "cpu", "cuda", ... (default: CUDA when available).
        dtype: weight dtype for the UNet and text encoder (default: fp16 on CUDA; on a CPU,
            bf16 where it has AVX512-BF16 or AMX, else fp32).
        prediction: "eps" or "v" to override detection.
        use_ema: prefer the EMA weights when a file has both.
        models_dir: where LoRAs and embeddings named in prompts are found (web UI layout;
            default: $SDLAB_MODELS_DIR or ./models).
        compile: `torch.compile` the UNet (the first image compiles it: minutes on a CPU).
        offload: keep the networks in CPU memory and move each to the GPU only while it runs
            (for GPUs with little memory).
        weight_dtype: keep the UNet's and text encoder's matrices in this dtype (torch.float16,
            torch.float8_e4m3fn, ...) and upcast each layer as it runs. Default: fp16 on a CPU
            computing in fp32 when no dtype is given (half the memory), else `dtype`.
        text_encoder_files: SD3's encoders as separate files, {"clip_l": ..., "clip_g": ...,
            "t5xxl": ...}; encoders neither given nor in the checkpoint are looked for in the models
            folder's text_encoders/ and clip/ (ComfyUI's layout).
        t5_max_length: SD3: T5 tokens per prompt chunk (77; diffusers' max_sequence_length is 256).
        vae: a separate VAE file replacing the model's (the web UI's "SD VAE", named in the
            infotext); for an SD3 file that carries no VAE (sd3.5_large.safetensors), its VAE.
    """
    from .errors import SdlabError
    from .perf import load_for_inference
    from .pipeline import Pipeline

    if model is None or builtin_model(model) is not None:
        model = demo_model_path()
        if not model.exists():
            raise SdlabError("the built-in demo model is missing from this install; give --model PATH")
    from .models_dir import ModelsDir

    models = ModelsDir(models_dir) if models_dir is not None else None
    root = (models or ModelsDir()).root
    sd3_options = dict(text_encoder_files=text_encoder_files, t5_max_length=t5_max_length,
                       text_encoder_dirs=[root / "text_encoders", root / "clip"], vae_file=vae)
    # dtype None: the fastest this machine runs well (fp16 on GPUs; bf16 on CPUs with
    # AVX512-BF16 or AMX, else fp32), the VAE in fp32 on the CPU (see device.vae_dtype).
    bundle = load_for_inference(model, device, dtype, prediction=prediction, use_ema=use_ema, compile=compile,
                                offload=offload, weight_dtype=weight_dtype, **sd3_options)
    pipe = Pipeline(bundle, models=models)
    if vae is not None:
        pipe.use_vae(Path(vae))
    return pipe
