"""The training configuration: one TOML file, overridable from the command line.

Top-level keys are `TrainConfig` fields; the tables `[model]`, `[data]`, `[lora]`, `[embedding]`
and `[validation]` fill the nested configs. `dataset_config = "x.toml"` reads kohya's dataset config
(`kohya_dataset`) into `[data]` and `batch_size`; keys this config sets itself win.
`--set lr=1e-4` or `--set data.folder=imgs` overrides any key (the value is read as TOML,
falling back to a plain string).
Relative paths are relative to the current directory, as in kohya's scripts.
"""

from __future__ import annotations

import tomllib
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from ..errors import SdlabError
from ..sampling.samplers import resolve_sampler
from .data import DataConfig
from .kohya_dataset import dataset_fields
from .lora_blocks import parse_numbers

Mode = Literal["lora", "finetune", "scratch", "embedding"]
MODES = ("lora", "finetune", "scratch", "embedding")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
PRECISIONS = ("no", "bf16", "fp16")
SAVE_FORMATS = ("safetensors", "ckpt", "diffusers", "diffusers_safetensors", "pt")
OPTIMIZERS = ("adamw", "adamw8bit")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")


@dataclass(frozen=True)
class ModelSpec:
    """What `scratch` mode builds: a named preset (`demo`, `tiny`) with optional per-network
    field overrides, e.g. `unet = { model_channels = 96 }`."""

    preset: str = "demo"
    family: str = "sd1"
    unet: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    text_encoder: dict = field(default_factory=dict)


NETWORK_MODULES = ("networks.lora", "networks.lora_sd3", "lycoris.kohya")
# SD3 / SD3.5 (rectified flow, `training.flow`): kohya's timestep schemes ("none" is "uniform").
WEIGHTING_SCHEMES = ("uniform", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
LORA_FORMATS = ("kohya", "diffusers")
# kohya's --network_args names -> LoRAConfig fields (and the type their strings are read as)
_NETWORK_ARGS = {"conv_dim": ("conv_rank", int), "conv_rank": ("conv_rank", int), "conv_alpha": ("conv_alpha", float),
                 "algo": ("algo", str), "factor": ("factor", int), "dropout": ("dropout", float),
                 "rank_dropout": ("rank_dropout", float), "module_dropout": ("module_dropout", float),
                 **{k: (k, str) for k in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
                                          "down_lr_weight", "mid_lr_weight", "up_lr_weight")},
                 **{k: (k, float) for k in ("block_lr_zero_threshold", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                                            "loraplus_text_encoder_lr_ratio")}}


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16  # kohya's network_dim
    alpha: float = 1.0  # kohya's network_alpha: the update is scaled by alpha / rank
    # "networks.lora" (kohya's LoRA, LoCon with conv_rank) or "lycoris.kohya" (the LyCORIS package's
    # network, with `algo`): the layers trained and the file written are those of that module.
    network_module: str = "networks.lora"
    algo: str = "lora"  # lycoris.kohya: "locon" (= "lora"), "loha" or "lokr"
    factor: int = -1  # LoKr: split each dimension at this factor (-1: as near a square as divides)
    # kohya's --network_args as it writes them, e.g. ["algo=loha", "conv_dim=4", "conv_alpha=1"]; they
    # set the fields of the same meaning (conv_dim is conv_rank) over what the table says.
    network_args: tuple[str, ...] = ()
    # > 0: LoCon / C3Lier, LoRA on the 3x3 convs of the ResBlocks and resamplers too. lycoris.kohya
    # always trains them (0: at `rank`, as LyCORIS's conv_dim defaults to network_dim).
    conv_rank: int = 0
    conv_alpha: float | None = None  # default: 1 (kohya's); lycoris.kohya: `alpha` (LyCORIS's default)
    train_unet: bool = True
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None  # default: the main lr
    dropout: float = 0.0  # dropout on the rank-r activations (kohya's network_dropout)
    # kohya's network_args: drop whole ranks of a sample / the whole update of a layer, in training
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    # A LoRA file to start from instead of zero (kohya's network_weights), e.g. to train on: kohya's
    # format in either UNet spelling, or diffusers/PEFT; same ranks. Its alphas replace `alpha` /
    # `conv_alpha` module by module.
    network_weights: str | None = None
    # kohya's block-wise LoRA (network_args; `training.lora_blocks`): per UNet block, in kohya's
    # numbering (25 blocks for SD 1.x / 2.x, 23 for SDXL), the rank and alpha of the Linear / 1x1
    # layers and of the 3x3 convolutions; lists, or kohya's comma-separated strings.
    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None
    # ... and learning-rate weights: 12 / 1 / 12 numbers (SDXL 9 / 3 / 9), or for down and up one of
    # cosine, sine, linear, reverse_linear, zeros (optionally "+x"). A block weighted 0 gets no LoRA.
    down_lr_weight: str | tuple[float, ...] | None = None
    mid_lr_weight: tuple[float, ...] | None = None
    up_lr_weight: str | tuple[float, ...] | None = None
    block_lr_zero_threshold: float = 0.0  # weights not above this count as 0
    # LoRA+ (kohya's loraplus_*lr_ratio): the lora_up weights learn at lr x ratio (16 in the paper)
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None  # for the UNet, instead of loraplus_lr_ratio
    loraplus_text_encoder_lr_ratio: float | None = None

    def __post_init__(self) -> None:
        given = set()
        for arg in self.network_args:
            key, sep, value = str(arg).partition("=")
            key, value = key.strip(), value.strip()
            if not sep or key not in _NETWORK_ARGS:
                raise SdlabError(f"lora.network_args {arg!r}: expected key=value with a key sdlab knows "
                                 f"({', '.join(sorted(_NETWORK_ARGS))})")
            name, kind = _NETWORK_ARGS[key]
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                raise SdlabError(f"lora.network_args {arg!r}: {value!r} is not a {kind.__name__}") from None
            given.add(name)
        lycoris = self.network_module == "lycoris.kohya"
        if self.conv_alpha is None:  # LyCORIS's conv_alpha defaults to network_alpha, kohya's to 1
            object.__setattr__(self, "conv_alpha", float(self.alpha) if lycoris else 1.0)
        if lycoris and not self.conv_rank:
            object.__setattr__(self, "conv_rank", self.rank)
        # kohya's network_args are strings ("2,4,4,..."): read them as the lists TOML gives.
        for name, kind in (("block_dims", int), ("block_alphas", float), ("conv_block_dims", int),
                           ("conv_block_alphas", float), ("mid_lr_weight", float), ("down_lr_weight", float),
                           ("up_lr_weight", float)):
            value = getattr(self, name)
            curve = isinstance(value, str) and "," not in value and name in ("down_lr_weight", "up_lr_weight")
            if value is not None and not curve:
                object.__setattr__(self, name, parse_numbers(value, kind, name))


@dataclass(frozen=True)
class EmbeddingConfig:
    """Textual inversion (`mode = "embedding"`), with kohya's names (`train_textual_inversion.py`)."""

    # The word that stands for the new vectors in the captions (and in validation prompts). The
    # file is named after it unless output_name is set; the web UIs use an embedding by its file name.
    token_string: str = ""
    # The vectors start as this text's token embeddings, spread over num_vectors_per_token as the web
    # UI spreads its "initialization text" (vector i = the text's token i * tokens // n); "": zeros.
    init_word: str = ""
    num_vectors_per_token: int = 1  # kohya's name
    num_vectors: int | None = None  # the same, shorter (wins when given)
    # The web UI's prompt template: "[filewords]" is the image's caption and "[name]" the token, e.g.
    # "a photo of a [name], [filewords]". Without one, a caption holding [name] or the token keeps it
    # where it is; any other caption gets the token in front ("sksobj, <caption>").
    caption_template: str | None = None

    def __post_init__(self) -> None:
        if self.num_vectors is not None:
            object.__setattr__(self, "num_vectors_per_token", self.num_vectors)
        object.__setattr__(self, "num_vectors", self.num_vectors_per_token)


@dataclass(frozen=True)
class SamplePrompt:
    """One validation prompt with kohya's per-prompt options (`--n`, `--w`, `--h`, `--d`, `--s`,
    `--l`, `--ss`); None where the line gives none."""

    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None


# kohya's sampler names that sdlab's samplers do not already take as aliases (euler_a, k_lms, ddim, ...).
_KOHYA_SAMPLERS = {"dpmsolver++": "DPM++ 2M", "dpm_2": "DPM2", "dpm_2_a": "DPM2 a"}
_SAMPLE_OPTIONS = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
                   "s": ("steps", int), "l": ("cfg_scale", float), "ss": ("sampler", str)}


def parse_sample_prompt(line: str) -> SamplePrompt:
    """A prompt line as kohya's `--sample_prompts` files write it:
    `a dog --n blurry --w 768 --h 512 --d 42 --s 28 --l 6.5 --ss euler_a`. Options kohya knows but
    sdlab does not use (`--cn`, `--g`, ...) are skipped; anything else is an error."""
    prompt, *options = line.split(" --")
    fields: dict = {"prompt": prompt.strip()}
    for option in options:
        key, _, value = option.strip().partition(" ")
        if key not in _SAMPLE_OPTIONS:
            if key in ("cn", "i", "g", "ctr", "rcfg", "fs", "am"):
                continue
            raise SdlabError(f"validation prompt {line!r}: unknown option --{key}; "
                             f"use --{', --'.join(_SAMPLE_OPTIONS)}")
        name, kind = _SAMPLE_OPTIONS[key]
        try:
            fields[name] = kind(value.strip())
        except ValueError:
            raise SdlabError(f"validation prompt {line!r}: --{key} needs a {kind.__name__}, got {value.strip()!r}") from None
    if "sampler" in fields:
        fields["sampler"] = _KOHYA_SAMPLERS.get(fields["sampler"].lower(), fields["sampler"])
        resolve_sampler(fields["sampler"])  # an unknown name fails with the list of known ones
    return SamplePrompt(**fields)


@dataclass(frozen=True)
class ValidationConfig:
    # Each may carry kohya's options: "a dog --n blurry --w 768 --h 512 --d 42 --s 28 --l 6.5 --ss euler_a"
    # (a --d seed replaces `seeds` for that prompt).
    prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)  # one image per (prompt, seed)
    every_n_steps: int = 0  # 0: only at the end (when prompts are given)
    every_n_epochs: int = 0  # kohya's sample_every_n_epochs: after every n-th pass over the data too
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "Euler a"
    width: int | None = None  # default: the data resolution
    height: int | None = None


@dataclass(frozen=True)
class TrainConfig:
    mode: Mode
    data: DataConfig
    output_dir: Path = Path("output")
    output_name: str = "model"
    base_model: str | None = None  # lora / finetune: a checkpoint file or diffusers folder
    model: ModelSpec = field(default_factory=ModelSpec)  # scratch
    prediction: Literal["eps", "v"] | None = None  # default: the base model's (scratch: the family's)
    seed: int = 0
    steps: int = 1000  # optimizer steps of the diffusion phase (epochs follow from it)
    epochs: int = 0  # > 0: instead of `steps`, this many passes over the data (kohya's max_train_epochs)
    batch_size: int = 1  # per process
    grad_accum: int = 1
    lr: float = 1e-4
    # diffusers' / kohya's names: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1  # cosine_with_restarts: how many cosine cycles
    lr_scheduler_power: float = 1.0  # polynomial: the decay's power
    # "adamw", "adamw8bit" (bitsandbytes), or any optimizer class by its import path, as kohya's
    # --optimizer_type takes it ("prodigyopt.Prodigy", "torch.optim.Adafactor", "lion_pytorch.Lion"):
    # it gets the learning rate and `optimizer_args` only (kohya's --optimizer_args).
    optimizer: str = "adamw"
    optimizer_args: dict = field(default_factory=dict)
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0  # 0: no clipping
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    # kohya's --fp8_base (lora): the frozen UNet's and text encoders' matrices kept in fp8
    # (e4m3fn) and upcast to the mixed-precision dtype layer by layer (`models.storage`): half
    # their memory at rest; with gradient_checkpointing the upcast copies live one block at a time.
    fp8_base: bool = False
    gradient_checkpointing: bool = False
    deterministic: bool = False  # GPU: deterministic kernels, so --resume is exact there too (a little slower)
    min_snr_gamma: float = 0.0  # 0: off; 5 is the paper's value
    noise_offset: float = 0.0
    # kohya's: each image's offset grows by this times the absolute mean of its latent channel
    # (brighter or darker images get a larger offset); needs noise_offset.
    adaptive_noise_scale: float = 0.0
    # kohya's --zero_terminal_snr: noise with the schedule rescaled to no signal at the last
    # timestep (Lin et al. 2023; for v-prediction); the loss weightings keep the original SNR.
    zero_terminal_snr: bool = False
    # kohya's loss and noise options, with its names, defaults and formulas (losses.LossOptions).
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = "l2"
    huber_c: float = 0.1
    huber_schedule: Literal["snr", "exponential", "constant"] = "snr"
    huber_scale: float = 1.0
    scale_v_pred_loss_like_noise_pred: bool = False
    debiased_estimation_loss: bool = False
    noise_offset_random_strength: bool = False  # each batch's offset uniform in [0, noise_offset)
    multires_noise_iterations: int = 0  # 0: off; kohya's docs suggest 6-10
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0  # input perturbation of the noise; 0.1 in the paper
    ip_noise_gamma_random_strength: bool = False
    masked_loss: bool = False  # weight the loss by each image's alpha channel (needs data.alpha_mask)
    min_timestep: int = 0  # timesteps are drawn from [min_timestep, max_timestep)
    max_timestep: int = 1000
    ema_decay: float = 0.0  # 0: no EMA; the saved model holds the EMA weights when on
    train_text_encoder: bool = False  # finetune / scratch
    # The web UIs' and kohya's CLIP skip: 2 conditions on the text encoder layer before the one the
    # family uses (anime models based on NovelAI's are trained, and sampled, with 2).
    clip_skip: int = 1
    # kohya's --max_token_length: captions are read in 75-token chunks, as prompts at sampling;
    # 150 or 225 keeps two or three (a longer caption is cut, with a warning).
    max_token_length: int = 75
    text_encoder_lr: float | None = None
    # scratch: the VAE first learns to reconstruct for vae_steps, then is frozen
    vae_steps: int = 0
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_batch_size: int = 1  # images per VAE call when caching latents (data.cache_latents[_to_disk]), as kohya's
    # SD3 / SD3.5 (rectified flow; `training.flow`), with kohya's names and defaults: the timesteps'
    # density (uniform, logit_normal with logit_mean / logit_std, mode with mode_scale; sigma_sqrt
    # and cosmap draw uniformly and weight the loss), shifted by training_shift (> 1: noisier).
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    training_shift: float = 1.0
    # kohya's loss (and diffusers' default): the prediction preconditioned to x0, the latents the target;
    # false: diffusers' other setting, the velocity against noise - latents.
    precondition_outputs: bool = True
    # T5 tokens per caption (padded with 0 or cut): 77 as sdlab samples by default (--t5-max-length);
    # kohya trains at 256 (then sample with --t5-max-length 256).
    t5xxl_max_token_length: int = 77
    # kohya's: the text encoders that do not train run once per caption before training, and T5
    # leaves memory; _to_disk keeps the results in <data folder>/.te_cache for later runs too.
    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False
    text_encoder_batch_size: int = 8  # captions per encoder call when caching (kohya's name)
    # kohya's --clip_l / --clip_g / --t5xxl: separate encoder files for an SD3 file without them.
    clip_l: str | None = None
    clip_g: str | None = None
    t5xxl: str | None = None
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    save_every_n_steps: int = 0  # 0: only at the end
    save_every_n_epochs: int = 0  # kohya's: `<name>-000002.safetensors` after the 2nd pass over the data, ...
    keep_states: int = 2  # training states kept for --resume
    save_dtype: Literal["fp32", "fp16", "bf16"] = "fp16"
    # A LoRA's layout: kohya's (`lora_unet_...`, which the web UIs, ComfyUI and diffusers read), or for
    # SD3 / SD3.5 diffusers' PEFT layout (`transformer.transformer_blocks.N.attn.to_q.lora_A.weight`).
    lora_format: Literal["kohya", "diffusers"] = "kohya"
    # kohya's: a fine-tuned or new model as one .safetensors file, a .ckpt, or a diffusers folder
    # ("diffusers" and "diffusers_safetensors" both write safetensors weights). LoRAs: safetensors.
    save_model_as: Literal["safetensors", "ckpt", "diffusers", "diffusers_safetensors"] = "safetensors"
    log_every_n_steps: int = 10
    tensorboard: bool = False
    num_workers: int = 0
    time_limit_minutes: float = 0.0  # > 0: stop after this long and save as if the run had ended

    def __post_init__(self) -> None:
        def bad(msg: str) -> SdlabError:
            return SdlabError(f"training config: {msg}")

        if self.mode not in MODES:
            raise bad(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode in ("lora", "finetune", "embedding") and not self.base_model:
            raise bad(f"mode {self.mode!r} needs base_model (a checkpoint file or diffusers folder)")
        if self.lr_scheduler not in SCHEDULERS:
            raise bad(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.mixed_precision not in PRECISIONS:
            raise bad(f"mixed_precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")
        if self.optimizer not in OPTIMIZERS and "." not in self.optimizer:
            raise bad(f"optimizer must be one of {', '.join(OPTIMIZERS)} or a class path such as "
                      f"\"prodigyopt.Prodigy\", got {self.optimizer!r}")
        if not isinstance(self.optimizer_args, dict):
            raise bad(f"optimizer_args must be a table, e.g. optimizer_args = {{ momentum = 0.9 }}, "
                      f"got {self.optimizer_args!r}")
        if self.prediction not in (None, "eps", "v"):
            raise bad(f"prediction must be 'eps' or 'v', got {self.prediction!r}")
        if self.max_token_length not in (75, 150, 225):
            raise bad(f"max_token_length must be 75, 150 or 225, got {self.max_token_length!r}")
        model_formats = [f for f in SAVE_FORMATS if f != "pt"]
        if self.save_model_as not in SAVE_FORMATS or (self.save_model_as == "pt" and self.mode != "embedding"):
            raise bad(f"save_model_as must be one of {', '.join(model_formats)}, got {self.save_model_as!r} "
                      "('pt' is for mode 'embedding')" if self.save_model_as == "pt" else
                      f"save_model_as must be one of {', '.join(SAVE_FORMATS)}, got {self.save_model_as!r}")
        if self.mode == "embedding" and self.save_model_as not in ("safetensors", "pt"):
            raise bad(f"save_model_as = {self.save_model_as!r}: an embedding is saved as .safetensors or .pt "
                      "(the web UI's formats)")
        if self.mode == "lora" and self.save_model_as != "safetensors":
            raise bad(f"save_model_as = {self.save_model_as!r}: a LoRA is saved as .safetensors (kohya's format)")
        if self.save_dtype not in ("fp32", "fp16", "bf16"):
            raise bad(f"save_dtype must be fp32, fp16 or bf16, got {self.save_dtype!r}")
        for name in ("steps", "batch_size", "grad_accum", "keep_states", "log_every_n_steps", "clip_skip",
                     "lr_scheduler_num_cycles", "vae_batch_size"):
            if getattr(self, name) < 1:
                raise bad(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "vae_steps", "save_every_n_steps", "num_workers", "epochs", "save_every_n_epochs"):
            if getattr(self, name) < 0:
                raise bad(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not self.lr > 0:
            raise bad(f"lr must be positive, got {self.lr}")
        if self.lr_scheduler == "polynomial" and not (self.lr > 1e-7 and self.lr_scheduler_power > 0):
            raise bad("polynomial decay ends at lr 1e-7: it needs lr above that and lr_scheduler_power > 0")
        if not 0 <= self.ema_decay < 1:
            raise bad(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("min_snr_gamma", "noise_offset", "multires_noise_iterations", "ip_noise_gamma"):
            if getattr(self, name) < 0:
                raise bad(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.loss_type not in LOSS_TYPES:
            raise bad(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise bad(f"huber_schedule must be one of {', '.join(HUBER_SCHEDULES)}, got {self.huber_schedule!r}")
        if not 0 < self.huber_c <= 1:
            raise bad(f"huber_c must be in (0, 1], got {self.huber_c}")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise bad(f"timesteps: need 0 <= min_timestep < max_timestep <= 1000, got {self.min_timestep} "
                      f"and {self.max_timestep}")
        if not 0 < self.multires_noise_discount <= 1:
            raise bad(f"multires_noise_discount must be in (0, 1], got {self.multires_noise_discount}")
        if self.masked_loss and not self.data.alpha_mask:
            raise bad("masked_loss needs data.alpha_mask = true (the mask is each image's alpha channel)")
        if self.adaptive_noise_scale and not self.noise_offset:
            raise bad("adaptive_noise_scale adds to noise_offset: set noise_offset too (e.g. 0.05)")
        if self.fp8_base and (self.mode != "lora" or self.mixed_precision == "no"):
            raise bad("fp8_base keeps a LoRA's frozen base in fp8: it needs mode 'lora' and mixed_precision "
                      "'bf16' or 'fp16', as kohya's")
        if self.mode == "embedding":
            ec = self.embedding
            if not ec.token_string.strip() or ec.token_string != ec.token_string.strip():
                raise bad(f"mode 'embedding' needs embedding.token_string, the new word the captions use "
                          f"(e.g. --set embedding.token_string=sksobj), got {ec.token_string!r}")
            if any(c in ec.token_string for c in "[](){}:,|\\/"):
                raise bad(f"embedding.token_string {ec.token_string!r}: use letters and digits (it is a word in "
                          "prompts and the file's name)")
            if not 1 <= ec.num_vectors_per_token <= 75:
                raise bad(f"embedding.num_vectors_per_token must be 1 to 75, got {ec.num_vectors_per_token}")
            if ec.caption_template is not None and "[name]" not in ec.caption_template:
                raise bad(f"embedding.caption_template {ec.caption_template!r} has no [name] (where the token goes)")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise bad(f"weighting_scheme must be one of {', '.join(WEIGHTING_SCHEMES)}, got {self.weighting_scheme!r}")
        if not (self.logit_std > 0 and self.training_shift > 0):
            raise bad(f"logit_std and training_shift must be positive, got {self.logit_std} and {self.training_shift}")
        if self.t5xxl_max_token_length < 2 or self.text_encoder_batch_size < 1:
            raise bad("t5xxl_max_token_length must be at least 2 and text_encoder_batch_size at least 1")
        if self.lora_format not in LORA_FORMATS:
            raise bad(f"lora_format must be one of {', '.join(LORA_FORMATS)}, got {self.lora_format!r}")
        if self.lora_format != "kohya" and self.mode != "lora":
            raise bad(f"lora_format = {self.lora_format!r} is the layout of a LoRA file: it needs mode 'lora'")
        if self.cache_text_encoder_outputs_to_disk:  # kohya's: to disk implies caching
            object.__setattr__(self, "cache_text_encoder_outputs", True)
        if self.vae_steps and self.mode != "scratch":
            raise bad("vae_steps (the VAE reconstruction phase) only applies to mode 'scratch'")
        if self.mode == "lora":
            lc = self.lora
            if lc.rank < 1 or lc.conv_rank < 0:
                raise bad(f"lora.rank must be at least 1 and lora.conv_rank 0 or more, got {lc.rank}, {lc.conv_rank}")
            if not (lc.train_unet or lc.train_text_encoder):
                raise bad("lora: nothing to train; set lora.train_unet or lora.train_text_encoder")
            for name in ("dropout", "rank_dropout", "module_dropout"):
                if not 0 <= getattr(lc, name) < 1:
                    raise bad(f"lora.{name} must be in [0, 1), got {getattr(lc, name)}")
            for name in ("block_dims", "conv_block_dims"):
                if any(d < 0 for d in getattr(lc, name) or ()):
                    raise bad(f"lora.{name} must be 0 or more in every block, got {getattr(lc, name)}")
            for name in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
                if getattr(lc, name) is not None and not getattr(lc, name) > 0:
                    raise bad(f"lora.{name} must be positive, got {getattr(lc, name)}")
            if lc.network_module not in NETWORK_MODULES:
                raise bad(f"lora.network_module must be one of {', '.join(NETWORK_MODULES)}, got {lc.network_module!r}")
            from .lora_network import ALGOS

            if lc.network_module == "lycoris.kohya":
                if lc.algo not in ALGOS:
                    raise bad(f"lora.algo {lc.algo!r}: the LyCORIS algorithms sdlab trains are {', '.join(ALGOS)} "
                              "(locon is lora)")
                if any(getattr(lc, k) is not None for k in ("block_dims", "conv_block_dims", "down_lr_weight",
                                                              "mid_lr_weight", "up_lr_weight")):
                    raise bad("block-wise ranks and learning rates are kohya's networks.lora options, not lycoris.kohya's")
                if lc.algo in ("loha", "lokr") and any(getattr(lc, k) is not None for k in (
                        "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")):
                    raise bad("LoRA+ scales LoRA's up weights; LoHa and LoKr have none")
                if lc.factor == 0 or lc.factor < -1:
                    raise bad(f"lora.factor must be -1 or a positive number, got {lc.factor}")
            elif lc.algo != "lora":
                raise bad(f"lora.algo = {lc.algo!r} needs lora.network_module = \"lycoris.kohya\" "
                          "(or network_args = [\"algo=...\"] with it)")
        if self.validation.every_n_steps < 0 or self.validation.every_n_epochs < 0:
            raise bad("validation.every_n_steps and every_n_epochs must be 0 or more")
        if self.validation.prompts and not self.validation.seeds:
            raise bad("validation.seeds must not be empty")
        for line in self.validation.prompts:
            parse_sample_prompt(line)  # a malformed line fails now, not at the first validation
        if self.validation.prompts:
            resolve_sampler(self.validation.sampler)

    @property
    def state_dir(self) -> Path:
        return self.output_dir / "state"


# Options of the DDPM-trained UNets (SD 1.x / 2.x / SDXL) that mean nothing to a rectified-flow model,
# and the SD3 ones that mean nothing to those UNets (kohya's scripts take them per family too).
_DDPM_ONLY = ("prediction", "min_snr_gamma", "noise_offset", "adaptive_noise_scale", "noise_offset_random_strength",
              "multires_noise_iterations", "ip_noise_gamma", "ip_noise_gamma_random_strength", "zero_terminal_snr",
              "scale_v_pred_loss_like_noise_pred", "debiased_estimation_loss")
_FLOW_ONLY = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "training_shift", "precondition_outputs",
              "t5xxl_max_token_length", "cache_text_encoder_outputs", "lora_format", "clip_l", "clip_g", "t5xxl")


def check_for_family(cfg: TrainConfig, family) -> None:
    """The options that the base model's family cannot train with, refused in one line before any
    step: SD 1.x's noise and loss options on SD3 (and what sdlab does not train there: LyCORIS,
    LoCon, block-wise LoRA, embeddings), SD3's options or an SD3 LoRA module on the others."""
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}

    def set_(names: tuple[str, ...]) -> list[str]:
        return [n for n in names if getattr(cfg, n) != defaults[n]]

    label = family.label
    if family.is_flow:
        for name in set_(_DDPM_ONLY):
            raise SdlabError(f"training config: {name} = {getattr(cfg, name)!r} is an option of the DDPM-trained UNets "
                             f"(SD 1.x, 2.x, SDXL); {label} trains by rectified flow: remove it (its options are "
                             "weighting_scheme, training_shift, precondition_outputs, ...)")
        if cfg.mode == "embedding":
            raise SdlabError(f"training config: mode 'embedding' (textual inversion) is not supported on {label}; "
                             "train a LoRA (mode 'lora') instead")
        if cfg.loss_type in ("huber", "smooth_l1") and cfg.huber_schedule == "snr":
            raise SdlabError(f"training config: huber_schedule 'snr' needs a DDPM noise schedule, which {label} has not; "
                             "set huber_schedule = \"exponential\" or \"constant\"")
        if cfg.save_model_as.startswith("diffusers"):
            raise SdlabError(f"training config: save_model_as = {cfg.save_model_as!r}: sdlab does not write {label} "
                             "as a diffusers folder; use \"safetensors\" (the single-file layout)")
        lc = cfg.lora
        if cfg.mode == "lora":
            if lc.network_module == "lycoris.kohya":
                raise SdlabError(f"training config: lora.network_module 'lycoris.kohya' is not supported on {label}; "
                                 "use networks.lora_sd3 (kohya's SD3 LoRA)")
            if lc.conv_rank or any(getattr(lc, k) is not None for k in (
                    "block_dims", "conv_block_dims", "down_lr_weight", "mid_lr_weight", "up_lr_weight")):
                raise SdlabError(f"training config: conv_rank and block-wise ranks / learning rates are options of the "
                                 f"UNet's LoRA; {label}'s MMDiT has no convolutions or UNet blocks: remove them")
        return
    if cfg.mode == "lora" and cfg.lora.network_module == "networks.lora_sd3":
        raise SdlabError(f"training config: lora.network_module 'networks.lora_sd3' is kohya's SD3 LoRA, but the base "
                         f"model is {label}: use networks.lora, or an SD3 / SD3.5 base_model")
    for name in set_(_FLOW_ONLY):
        raise SdlabError(f"training config: {name} = {getattr(cfg, name)!r} is an SD3 / SD3.5 option (rectified flow), "
                         f"but the base model is {label}: remove it")


_SECTIONS = {"data": DataConfig, "lora": LoRAConfig, "embedding": EmbeddingConfig, "validation": ValidationConfig,
             "model": ModelSpec}
# What textual inversion defaults to where the config does not say: the web UI's learning rate (0.005)
# and its AdamW without weight decay (which would pull the vectors towards zero), and its fp32 vectors.
_EMBEDDING_DEFAULTS = {"lr": 5e-3, "weight_decay": 0.0, "save_dtype": "fp32"}


def parse_value(text: str) -> Any:
    """A `--set` value: TOML (numbers, booleans, arrays, quoted strings), else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `key=value` / `section.key=value` overrides to a raw config dict (a copy)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SdlabError(f"override {item!r}: expected key=value, e.g. lr=1e-4 or data.folder=images")
        parts = key.strip().split(".")
        target = out
        for p in parts[:-1]:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise SdlabError(f"override {item!r}: {p} is not a table")
        target[parts[-1]] = parse_value(value.strip())
    return out


def _build(cls, raw: dict, where: str):
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise SdlabError(f"training config: unknown key '{where}{unknown[0]}'; known: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in raw.items():
        if k in ("output_dir", "folder", "latent_cache_dir") and v is not None:
            v = Path(v)
        elif isinstance(v, list):
            v = tuple(v)
        elif isinstance(v, int) and not isinstance(v, bool) and names[k].type in ("float", "float | None"):
            # TOML reads `alpha = 2` as an int; the field (and kohya's metadata, "2.0") is a float
            v = float(v)
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise SdlabError(f"training config{' [' + where.rstrip('.') + ']' if where else ''}: {e}") from None
    except ValueError as e:  # DataConfig validates with ValueError
        raise SdlabError(f"training config: {e}") from None


def config_from_dict(raw: dict) -> TrainConfig:
    raw = dict(raw)
    if "data" not in raw or "folder" not in raw.get("data", {}):
        raise SdlabError("training config: [data] folder is required (a folder of captioned images), "
                         "or dataset_config (kohya's dataset config)")
    nested = {}
    for name, cls in _SECTIONS.items():
        if name in raw:
            if not isinstance(raw[name], dict):
                raise SdlabError(f"training config: {name} must be a table ([{name}])")
            nested[name] = _build(cls, raw.pop(name), f"{name}.")
    if raw.get("mode") == "embedding":
        raw = {**_EMBEDDING_DEFAULTS, **raw}
        if "output_name" not in raw and "embedding" in nested and nested["embedding"].token_string.strip():
            raw["output_name"] = nested["embedding"].token_string  # the word a prompt uses it by
    return _build(TrainConfig, {**raw, **nested}, "")


def _read_toml(path: Path, what: str) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SdlabError(f"{path}: no such {what}") from None
    except tomllib.TOMLDecodeError as e:
        raise SdlabError(f"{path}: not valid TOML ({e})") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a TOML training config and apply `key=value` overrides."""
    raw = _read_toml(Path(path), "training config") if path is not None else {}
    raw = apply_overrides(raw, list(overrides))
    if (dataset_config := raw.pop("dataset_config", None)) is not None:
        # kohya's --dataset_config: its data options and batch size, under what this config sets itself.
        data, top = dataset_fields(_read_toml(Path(dataset_config), "dataset config"), Path(dataset_config))
        if not isinstance(raw.get("data", {}), dict):
            raise SdlabError("training config: data must be a table ([data])")
        raw["data"] = {**data, **raw.get("data", {})}
        raw = {**top, **raw}
    data_seed_given = "seed" in raw.get("data", {})
    cfg = config_from_dict(raw)
    if not data_seed_given:  # the data's augmentation seed follows the run's unless [data] sets its own
        cfg = replace(cfg, data=replace(cfg.data, seed=cfg.seed))
    return cfg
