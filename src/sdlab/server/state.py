"""Everything one running server holds: its settings, the models folder, the worker,
and the web UI's options. Built once per app and reached from handlers through the
`get_state` dependency (app.state, not a module global, so tests can run several apps)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from fastapi import Request

from ..demo_model import builtin_model, demo_model_path
from ..errors import SdlabError
from .catalog import CheckpointEntry, ModelCatalog, NotFound
from .settings import ServerSettings
from .worker import Worker

log = logging.getLogger(__name__)

RANDN_SOURCES = {"CPU": "cpu", "NV": "nv", "GPU": "cpu"}  # noise is always drawn on the CPU (DESIGN 4)
FP8_STORAGE = ("Disable", "Enable for SDXL", "Enable")  # the web UI's "FP8 weight" setting


class ServerState:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        # Resolved once: a relative folder means the one the server was started in.
        self.outputs_dir = settings.outputs_dir.expanduser().resolve()
        self.styles_file = settings.styles_path.expanduser().resolve()
        extra = self._extra_checkpoint(settings)
        self.catalog = ModelCatalog(settings.models_dir, extra)
        self.selected: CheckpointEntry | None = self._initial_checkpoint(settings, extra)
        self._lock = threading.Lock()
        self._options: dict[str, Any] = {"CLIP_stop_at_last_layers": 1, "randn_source": "CPU",
                                         "sd_noise_schedule": "Default", "fp8_storage": "Disable",
                                         # the ControlNet extension's "Do not append detectmap to output"
                                         "control_net_no_detectmap": False}
        # A model is loaded again when fp8_storage changes what its weights are stored as.
        self.worker = Worker(self.catalog, self._load_pipeline, load_key=lambda: self.option("fp8_storage"))
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

    def _load_pipeline(self, entry: CheckpointEntry):
        import torch

        from ..device import parse_dtype, parse_weight_dtype
        from ..perf import load_for_inference
        from ..pipeline import Pipeline

        s = self.settings
        weight_dtype = torch.float8_e4m3fn if self._fp8_weights(entry) else parse_weight_dtype(s.weight_dtype)
        root = self.catalog.models.root  # SD3's separate encoders, where ComfyUI keeps them (as sdlab.load)
        bundle = load_for_inference(entry.path, s.device, parse_dtype(s.dtype), compile=s.compile, offload=s.offload,
                                    weight_dtype=weight_dtype, text_encoder_dirs=[root / "text_encoders", root / "clip"])
        if entry.path.is_file():
            sha = self.catalog.sha256(entry)
            # The bundle would hash the file again for its infotext; hand it the hash we have.
            bundle.sha256 = sha
        return Pipeline(bundle, models=self.catalog.models, styles_file=self.styles_file)

    def _fp8_weights(self, entry: CheckpointEntry) -> bool:
        """Whether the fp8_storage option asks for fp8 weights for this model (the web UI's rule:
        "Enable", or "Enable for SDXL" and an SDXL model, base or refiner)."""
        choice = self.option("fp8_storage")
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
                "sd_vae": "Automatic",
            }

    def set_option(self, key: str, value: Any) -> bool:
        """Set one option; False if sdlab has no such option (the web UI ignores those too)."""
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
        elif key in ("sd_model_checkpoint", "sd_checkpoint_hash", "samples_format", "sd_vae"):
            return key == "sd_model_checkpoint"  # handled by the router (a model switch)
        else:
            return False
        with self._lock:
            self._options[key] = value
        return True

    def option(self, key: str) -> Any:
        with self._lock:
            return self._options[key]


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
