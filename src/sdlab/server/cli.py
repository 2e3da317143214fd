"""`sdlab serve`: the HTTP API and the web page. Imports nothing heavy until it runs."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
from pathlib import Path

from ..errors import SdlabError, UsageError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    from .settings import Limits

    d = Limits()
    p = subparsers.add_parser(
        "serve", help="serve the web UI's HTTP API and a web page",
        description="Serve the AUTOMATIC1111-compatible API under /sdapi/v1 (docs at /docs) and a web page at /. "
                    "Binds to 127.0.0.1 unless --host or --listen says otherwise.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--listen", dest="host", action="store_const", const="0.0.0.0",
                   help="answer on every network interface (--host 0.0.0.0), as the web UI's --listen")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--models-dir", default=os.environ.get("SDLAB_MODELS_DIR", "models"),
                   help="models folder with Stable-diffusion/, Lora/, embeddings/ "
                        "(default $SDLAB_MODELS_DIR or ./models)")
    p.add_argument("--model", help="checkpoint to load first: a name in the models folder, a file path, or demo for "
                                   "the built-in demo model (a checkpoint or file named demo comes first; default: "
                                   "the folder's first checkpoint, else demo)")
    p.add_argument("--api-auth", metavar="USER:PASS[,USER2:PASS2]",
                   help="require HTTP Basic auth with one of these credentials on every route")
    p.add_argument("--outputs-dir", default="outputs",
                   help="where requests with save_images write their images, as the web UI: "
                        "txt2img-images/DATE/NNNNN-SEED.png ... (default ./outputs)")
    p.add_argument("--styles-file", help="the web UI's styles.csv (columns name,prompt,negative_prompt) that "
                   "requests' styles name (default: styles.csv in the models folder)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    p.add_argument("--dtype", help="weight dtype: fp16, bf16, fp32 (default: fp16 on CUDA; on a CPU bf16 where "
                   "it has AVX512-BF16/AMX, else fp32; see sdlab info --device)")
    p.add_argument("--weight-dtype", help="keep the UNet's and text encoder's matrices in this dtype, upcast layer "
                   "by layer: fp16, bf16, fp8_e4m3fn, fp8_e5m2, fp32 (default: fp16 on a CPU computing in fp32; "
                   "else as --dtype)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (the first image compiles it)")
    p.add_argument("--offload", action="store_true",
                   help="keep models in CPU memory, each on the GPU only while it runs (small GPUs)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice); 1 is often "
                   "fastest for small models on a busy machine")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help=f"most width x height per image (default {d.max_pixels})")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help=f"most sampling steps (default {d.max_steps})")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"most images per request, batch_size x n_iter (default {d.max_batch})")
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / 2**20,
                   help=f"largest request body in MiB (default {d.max_upload_bytes // 2**20})")
    p.add_argument("--vae", metavar="NAME|PATH",
                   help="the VAE to use (a file in the models folder's VAE/ or a path): what the sd_vae option's "
                        "Automatic means; needed by SD3 files without one (sd3.5_large.safetensors). Default: "
                        "each checkpoint's own")
    p.add_argument("--t5-max-length", type=int, default=77,
                   help="SD3: T5 tokens per prompt chunk (default 77, as the reference and ComfyUI; diffusers uses 256)")
    p.add_argument("--control-net-unit-count", type=int, default=3,
                   help="most ControlNet units one request may enable (the extension's setting; default 3)")
    p.set_defaults(func=cmd_serve)


def settings_from_args(args: argparse.Namespace):
    from ..device import parse_dtype, parse_weight_dtype
    from .settings import Limits, ServerSettings, parse_api_auth

    parse_dtype(args.dtype)  # a wrong name fails here, not at the first request
    parse_weight_dtype(args.weight_dtype)
    if args.t5_max_length < 1:
        raise UsageError(f"--t5-max-length must be at least 1, got {args.t5_max_length}")
    if args.vae:  # found now, before the port is bound or anything loads
        from ..models_dir import ModelsDir

        if not Path(args.vae).expanduser().is_file():
            try:
                ModelsDir(Path(args.models_dir)).resolve_vae(args.vae)
            except SdlabError as e:
                raise UsageError(f"--vae: {e}") from None
    limits = Limits(max_pixels=args.max_pixels, max_steps=args.max_steps, max_batch=args.max_batch,
                    max_upload_bytes=int(args.max_upload_mb * 2**20))
    return ServerSettings(models_dir=Path(args.models_dir), model=args.model, host=args.host, port=args.port,
                          api_auth=parse_api_auth(args.api_auth), device=args.device, dtype=args.dtype,
                          weight_dtype=args.weight_dtype, compile=args.compile, offload=args.offload, limits=limits,
                          outputs_dir=Path(args.outputs_dir),
                          styles_file=Path(args.styles_file) if args.styles_file else None,
                          control_net_unit_count=args.control_net_unit_count, vae=args.vae,
                          t5_max_length=args.t5_max_length)


def cmd_serve(args: argparse.Namespace) -> None:
    from ..optional import require

    # Checked before anything else loads, so a missing one is one line, not a traceback.
    require("fastapi", extra="serve", purpose="sdlab serve")
    uvicorn = require("uvicorn", extra="serve", purpose="sdlab serve")
    from .app import create_app

    settings = settings_from_args(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # The port first: taken, it is one line and exit code 2 before anything loads or claims to serve.
    sock = bind_socket(settings.host, settings.port)
    try:
        if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_auth:
            log.warning("serving on %s without --api-auth: anyone who can reach this address can use it",
                        settings.host)
        app = create_app(settings)
        print("\n".join(startup_lines(app.state.sdlab)), flush=True)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for the server to listen on (bound here rather than by uvicorn,
    so that a port in use is found before the model loads, and nothing can take it in between).

    Raises:
        UsageError: the port is in use, or the address is not one of this machine's.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As uvicorn binds: a port left in TIME_WAIT by a server just stopped can be taken again.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is already in use (another sdlab or web UI?); stop it or "
                             f"choose another with --port") from None
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}); check --host and --port") from None
    sock.set_inheritable(True)
    return sock


def startup_lines(state) -> list[str]:
    """What `sdlab serve` says when it starts: the model it loads first and how it will run it,
    and where the page and the API docs are."""
    from .._version import __version__
    from ..device import choose_device, dtype_name, parse_dtype, parse_weight_dtype, vae_dtype
    from ..perf import inference_dtypes
    from .state import checkpoint_family

    s = state.settings
    device = choose_device(s.device)
    dtype, weights = inference_dtypes(device, parse_dtype(s.dtype), parse_weight_dtype(s.weight_dtype), s.compile)
    entry, family = state.selected, None
    if entry is None:
        model = f"none: put a checkpoint in {state.catalog.root / 'Stable-diffusion'}"
    else:
        try:
            family, has_vae = checkpoint_family(entry.path)
            model = f"{entry.name} ({family.label})"
            if not has_vae and state.vae_for(entry) is None:
                model += " holds no VAE: give one with --vae"
        except SdlabError as e:  # the load in the worker will say so again; the server still starts
            model = f"{entry.name} (unreadable: {e})"
    dtypes = f"{dtype_name(dtype)}, weights stored as {dtype_name(weights)}" if weights != dtype else dtype_name(dtype)
    vae = dtype_name(vae_dtype(device, dtype, family.name if family else None))
    if state.default_vae is not None:
        vae += f", from {state.default_vae.name}"
    # A wildcard address is not one a browser can open; this machine's loopback serves it too.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(s.host, s.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{s.port}"
    rows = [("model", model), ("device", str(device)), ("UNet / text encoder", dtypes), ("VAE", vae),
            ("web page", f"{url}/"), ("API docs", f"{url}/docs")]
    width = max(len(k) for k, _ in rows)
    return [f"sdlab {__version__}: serving the web UI's API (/sdapi/v1) on {s.host}:{s.port}",
            *(f"  {k.ljust(width)}  {v}" for k, v in rows)]
