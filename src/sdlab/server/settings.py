"""What `sdlab serve` was started with. One frozen object, built by the CLI (or a test) and
handed to `create_app`; nothing reads the environment or argv at import time."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SdlabError
from ..styles import STYLES_FILE


@dataclass(frozen=True)
class Limits:
    """Per-request ceilings; a request over one is answered 422 with the limit in the message."""

    max_pixels: int = 2048 * 2048  # width * height of one image
    max_steps: int = 150
    max_batch: int = 16  # batch_size * n_iter: images made by one request
    max_upload_bytes: int = 64 * 1024 * 1024  # a whole request body (base64 images inside)
    max_image_pixels: int = 4096 * 4096  # an uploaded image, checked from its header before decoding


@dataclass(frozen=True)
class ServerSettings:
    models_dir: Path = Path("models")
    model: str | None = None  # checkpoint to load first: a name in the models folder or a file path
    host: str = "127.0.0.1"  # loopback unless the operator says otherwise
    port: int = 7860
    api_auth: tuple[tuple[str, str], ...] = ()  # (user, password) pairs; empty: no auth
    device: str | None = None  # None: CUDA when available, else CPU
    dtype: str | None = None  # "fp16", "bf16", "fp32"; None: the fastest the device runs well
    weight_dtype: str | None = None  # storage of the matrices ("fp16", "fp8_e4m3fn", ...); None: the default
    compile: bool = False  # torch.compile the UNet
    offload: bool = False  # model CPU offload (GPU only)
    limits: Limits = field(default_factory=Limits)
    # Where save_images writes (txt2img-images/, img2img-images/ below it, as the web UI's ./outputs).
    outputs_dir: Path = Path("outputs")
    styles_file: Path | None = None  # the web UI's styles.csv; None: styles.csv in the models folder
    control_net_unit_count: int = 3  # most ControlNet units a request may enable (the extension's setting)
    # The VAE the sd_vae option's "Automatic" means (--vae): a file in the models folder's VAE/ or a path;
    # None: each checkpoint's own. An SD3 file that carries none (sd3.5_large) needs one.
    vae: str | None = None
    t5_max_length: int = 77  # SD3: T5 tokens per prompt chunk (--t5-max-length; diffusers' 256)

    @property
    def styles_path(self) -> Path:
        return self.styles_file if self.styles_file is not None else self.models_dir / STYLES_FILE

    def check_credentials(self, user: str, password: str) -> bool:
        # compare_digest on every pair, so the time taken does not tell which part was wrong
        ok = False
        for u, p in self.api_auth:
            same_user = secrets.compare_digest(u.encode(), user.encode())
            ok |= same_user & secrets.compare_digest(p.encode(), password.encode())
        return ok


def parse_api_auth(text: str | None) -> tuple[tuple[str, str], ...]:
    """`user:pass[,user2:pass2]` as the web UI's --api-auth takes it."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise SdlabError(f"--api-auth: {item.strip()!r} is not user:password; "
                             "give user:pass or user1:pass1,user2:pass2")
        pairs.append((user, password))
    return tuple(pairs)
