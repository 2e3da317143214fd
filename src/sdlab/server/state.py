"""Everything one running server holds: its settings, the models folder, the worker,
and the web UI's options. Built once per app and reached from handlers through the
`get_state` dependency (app.state, not a module global, so tests can run several apps)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fastapi import Request

from ..demo_model import builtin_model, demo_model_path
from ..errors import SdlabError
from ..families import Family
from .catalog import CheckpointEntry, ModelCatalog, NotFound
from .errors import NeedsOption
from .settings import ServerSettings
from .worker import Worker

log = logging.getLogger(__name__)

RANDN_SOURCES = {"CPU": "cpu", "NV": "nv", "GPU": "cpu"}  # noise is always drawn on the CPU (DESIGN 4)
FP8_STORAGE = ("Disable", "Enable for SDXL", "Enable")  # the web UI's "FP8 weight" setting
# The web UI's sd_vae choices besides a file's name: "Automatic" is the server's --vae where it was
# started with one, else the checkpoint's own VAE; "None" is always the checkpoint's own.
VAE_AUTOMATIC, VAE_NONE = "Automatic", "None"
# The options a model is loaded with: a change of one (or a request's override_settings of one)
# loads it again.
LOAD_OPTIONS = ("fp8_storage", "sd_vae")
NO_SUCH_OPTION = object()
EMPTY: Mapping[str, Any] = MappingProxyType({})


class ServerState:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        # Resolved once: a relative folder means the one the server was started in.
        self.outputs_dir = settings.outputs_dir.expanduser().resolve()
        self.styles_file = settings.styles_path.expanduser().resolve()
        extra = self._extra_checkpoint(settings)
        self.catalog = ModelCatalog(settings.models_dir, extra)
        # --vae, found once: a wrong name stops the server at startup, not at its first load.
        self.default_vae: Path | None = self._default_vae(settings.vae) if settings.vae else None
        self.selected: CheckpointEntry | None = self._initial_checkpoint(settings, extra)
        self._lock = threading.Lock()
        self._options: dict[str, Any] = {"CLIP_stop_at_last_layers": 1, "randn_source": "CPU",
                                         "sd_noise_schedule": "Default", "fp8_storage": "Disable",
                                         # the ControlNet extension's "Do not append detectmap to output"
                                         "control_net_no_detectmap": False, "sd_vae": VAE_AUTOMATIC}
        # A model is loaded again when fp8_storage changes what its weights are stored as, or sd_vae
        # its VAE (the options' values, or a job's override_settings of them).
        self.worker = Worker(self.catalog, self._load_pipeline, load_key=self.load_options)
        # ComfyUI's face (its queue records, history, websockets), whose jobs share the worker.
        from .comfy.state import ComfyState

        self.comfy = ComfyState(self)

    @staticmethod
    def _extra_checkpoint(settings: ServerSettings) -> Path | None:
        # --model may be a file the operator trusts outside the folder; else the demo model
        # when the folder has no checkpoint.
        if settings.model is not None:
            p = Path(settings.model).expanduser()
            return p if p.is_file() or (p / "model_index.json").is_file() else None
        return None

    def _initial_checkpoint(self, settings: ServerSettings, extra: Path | None) -> CheckpointEntry | None:
        if settings.model is not None:
            if extra is not None:
                return next(e for e in self.catalog.checkpoints() if e.path == extra.resolve())
            try:
                return self.catalog.find_checkpoint(settings.model)
            except NotFound:
                if builtin_model(settings.model) is None:
                    raise
            # `--model demo`, and the folder has no checkpoint of that name: the built-in one.
            entry = self._list_demo_model()
            if entry is None:
                raise SdlabError("the built-in demo model is missing from this install; give --model PATH")
            return entry
        return self.catalog.default_checkpoint() or self._list_demo_model()

    def _list_demo_model(self) -> CheckpointEntry | None:
        """Add the built-in demo model to the listing (as the extra checkpoint); its entry, or None
        where this install lacks the file."""
        demo = demo_model_path().resolve()
        if not demo.is_file():
            return None
        self.catalog.extra_checkpoint = demo
        self.catalog.refresh()
        return next(e for e in self.catalog.checkpoints() if e.path == demo)

    def _load_pipeline(self, entry: CheckpointEntry, overrides: Mapping[str, Any] = EMPTY):
        """The pipeline of a checkpoint, loaded with the server's load options (LOAD_OPTIONS) or a
        request's `overrides` of them (its override_settings)."""
        import torch

        from ..device import parse_dtype, parse_weight_dtype
        from ..perf import load_for_inference
        from ..pipeline import Pipeline

        s = self.settings
        vae = self.vae_for(entry, overrides.get("sd_vae"))
        if vae is None and not checkpoint_family(entry.path)[1]:
            raise NeedsOption(f"{entry.name} holds no VAE (SD3.5 files ship without one): choose SD3's VAE with the "
                             f"sd_vae option (a file in {self.catalog.models.folder('vae')}, POST /sdapi/v1/options "
                             '{"sd_vae": "NAME"}) or start the server with --vae NAME|PATH')
        weight_dtype = (torch.float8_e4m3fn if self._fp8_weights(entry, overrides.get("fp8_storage"))
                        else parse_weight_dtype(s.weight_dtype))
        root = self.catalog.models.root  # SD3's separate encoders, where ComfyUI keeps them (as sdlab.load)
        # As sdlab.load(model, vae=...): an SD3 file without a VAE is built with this one; every
        # other model has its own replaced by it (`Pipeline.use_vae`, named in the infotext).
        bundle = load_for_inference(entry.path, s.device, parse_dtype(s.dtype), compile=s.compile, offload=s.offload,
                                    weight_dtype=weight_dtype, text_encoder_dirs=[root / "text_encoders", root / "clip"],
                                    t5_max_length=s.t5_max_length, vae_file=vae)
        if entry.path.is_file():
            sha = self.catalog.sha256(entry)
            # The bundle would hash the file again for its infotext; hand it the hash we have.
            bundle.sha256 = sha
        pipeline = Pipeline(bundle, models=self.catalog.models, styles_file=self.styles_file)
        if vae is not None:
            pipeline.use_vae(vae)
        return pipeline

    def load_options(self, overrides: Mapping[str, Any] = EMPTY) -> tuple[Any, ...]:
        """The options a model is loaded with (LOAD_OPTIONS; a request's `overrides` of them
        first): a change of one loads the model again."""
        return tuple(overrides.get(key, self.option(key)) for key in LOAD_OPTIONS)

    def vae_for(self, entry: CheckpointEntry, choice: str | None = None) -> Path | None:
        """The VAE file the sd_vae option (or `choice`, a request's) chooses for a checkpoint
        (None: its own). A file named in the option replaces any model's VAE, as the web UI's; --vae
        ("Automatic") only those of the models whose latents it makes, so that an SD3 VAE given for
        SD3.5 files leaves SD 1.x alone."""
        choice = choice or self.option("sd_vae")
        if choice == VAE_NONE:
            return None
        if choice != VAE_AUTOMATIC:
            return self._vae_path(choice)
        if self.default_vae is None:
            return None
        own = _latent_channels(entry.path)
        return self.default_vae if own is None or own == _latent_channels(self.default_vae) else None

    def _vae_path(self, name: str) -> Path:
        """A VAE by the name the web UI's sd_vae gives it: a file in the models folder's VAE/ (a
        client's name never leads outside it)."""
        return self.catalog.models.resolve_vae(name)

    def _default_vae(self, name: str) -> Path:
        """--vae: a file's path (the operator's, trusted as --model's is), else a name in VAE/."""
        path = Path(name).expanduser()
        return path.resolve() if path.is_file() else self._vae_path(name)

    def vae_names(self) -> list[tuple[str, Path]]:
        """The VAE files the sd_vae option may name, as GET /sdapi/v1/sd-vae lists them."""
        return [(m.name + m.path.suffix, m.path) for m in self.catalog.models.list_vaes()]

    def _fp8_weights(self, entry: CheckpointEntry, choice: str | None = None) -> bool:
        """Whether the fp8_storage option (or `choice`, a request's) asks for fp8 weights for this
        model (the web UI's rule: "Enable", or "Enable for SDXL" and an SDXL model, base or refiner)."""
        choice = choice or self.option("fp8_storage")
        if choice != "Enable for SDXL":
            return choice == "Enable"
        from ..checkpoints.loader import config_of, open_model

        return config_of(open_model(entry.path)[0]).family.name.startswith("sdxl")

    # -- the web UI's options ---------------------------------------------------------

    def options(self) -> dict[str, Any]:
        entry = self.selected
        if entry is not None:  # the title gains its hash once the file was hashed
            entry = next((e for e in self.catalog.checkpoints() if e.path == entry.path), entry)
        with self._lock:
            return {
                "sd_model_checkpoint": entry.title if entry else None,
                "sd_checkpoint_hash": entry.sha256 if entry else None,
                **self._options,
                "samples_format": "png",
            }

    def set_option(self, key: str, value: Any) -> bool:
        """Set one option; False if sdlab has no such option (the web UI ignores those too)."""
        if key in ("sd_model_checkpoint", "sd_checkpoint_hash", "samples_format"):
            return key == "sd_model_checkpoint"  # handled by the router (a model switch)
        value = self.checked_option(key, value)
        if value is NO_SUCH_OPTION:
            return False
        with self._lock:
            self._options[key] = value
        return True

    def checked_option(self, key: str, value: Any) -> Any:
        """An option's value as the server keeps it (NO_SUCH_OPTION for a key sdlab does not have).

        Raises:
            SdlabError: a value the option does not take.
        """
        if key == "CLIP_stop_at_last_layers":
            value = clip_skip_value(value)
        elif key == "randn_source":
            value = randn_source_value(value)
        elif key == "sd_noise_schedule":
            value = noise_schedule_value(value)
        elif key == "control_net_no_detectmap":
            value = bool_option(key, value)
        elif key == "fp8_storage":
            if value not in FP8_STORAGE:
                raise SdlabError(f"fp8_storage must be one of {', '.join(FP8_STORAGE)}, got {value!r}")
        elif key == "sd_vae":
            value = str(value)
            if value not in (VAE_AUTOMATIC, VAE_NONE):
                try:
                    self._vae_path(value)
                except SdlabError as e:
                    raise SdlabError(f"sd_vae: {e}; or 'Automatic' / 'None' (the checkpoint's own VAE)") from None
        else:
            return NO_SUCH_OPTION
        return value

    def option(self, key: str) -> Any:
        with self._lock:
            return self._options[key]


def checkpoint_family(path: Path) -> tuple[Family, bool]:
    """A checkpoint's family and whether it holds a VAE, from its header: an SD3 file without a
    VAE (sd3.5_large.safetensors) has a family before it is given one."""
    from ..checkpoints import sd3
    from ..checkpoints.loader import config_of, open_model
    from ..families import VAE_PREFIX, detect_sd3_family

    sd = open_model(path)[0]
    if sd3.is_sd3(sd) and not any(k.startswith(VAE_PREFIX) for k in sd.shapes):
        return detect_sd3_family(sd.shapes), False
    return config_of(sd).family, True


def _latent_channels(path: Path) -> int | None:
    """How many latent channels the VAE in a checkpoint or VAE file makes (its decoder's input),
    from the header; None where it holds no VAE or cannot be read so."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            if key.endswith("decoder.conv_in.weight") and not key.startswith(("model.", "cond_stage_model.")):
                return f.get_slice(key).get_shape()[1]
    return None


def clip_skip_value(value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise SdlabError(f"CLIP_stop_at_last_layers must be a whole number 1-12, got {value!r}") from None
    if not 1 <= n <= 12:
        raise SdlabError(f"CLIP_stop_at_last_layers must be 1-12, got {n}")
    return n


def randn_source_value(value: Any) -> str:
    text = str(value).upper()
    if text not in RANDN_SOURCES:
        raise SdlabError(f"randn_source must be one of GPU, CPU, NV, got {value!r}")
    return text


def bool_option(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise SdlabError(f"{key} must be true or false, got {value!r}")


NOISE_SCHEDULES = ("Default", "Zero Terminal SNR")  # the web UI's sd_noise_schedule


def noise_schedule_value(value: Any) -> str:
    if value not in NOISE_SCHEDULES:
        raise SdlabError(f"sd_noise_schedule must be one of {', '.join(map(repr, NOISE_SCHEDULES))}, got {value!r}")
    return value


def get_state(request: Request) -> ServerState:
    """FastAPI dependency: the state of the app that received the request."""
    return request.app.state.sdlab
