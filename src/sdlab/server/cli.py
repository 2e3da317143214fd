"""`sdlab serve`: the HTTP API and the web page. Imports nothing heavy until it runs."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    from .settings import Limits

    d = Limits()
    p = subparsers.add_parser(
        "serve", help="serve the web UI's HTTP API and a web page",
        description="Serve the AUTOMATIC1111-compatible API under /sdapi/v1 (docs at /docs) and a web page at /. "
                    "Binds to 127.0.0.1 unless --host says otherwise.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--models-dir", default=os.environ.get("SDLAB_MODELS_DIR", "models"),
                   help="models folder with Stable-diffusion/, Lora/, embeddings/ "
                        "(default $SDLAB_MODELS_DIR or ./models)")
    p.add_argument("--model", help="checkpoint to load first: a name in the models folder or a file path")
    p.add_argument("--api-auth", metavar="USER:PASS[,USER2:PASS2]",
                   help="require HTTP Basic auth with one of these credentials on every route")
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
    p.set_defaults(func=cmd_serve)


def settings_from_args(args: argparse.Namespace):
    from ..device import parse_dtype, parse_weight_dtype
    from .settings import Limits, ServerSettings, parse_api_auth

    parse_dtype(args.dtype)  # a wrong name fails here, not at the first request
    parse_weight_dtype(args.weight_dtype)
    limits = Limits(max_pixels=args.max_pixels, max_steps=args.max_steps, max_batch=args.max_batch,
                    max_upload_bytes=int(args.max_upload_mb * 2**20))
    return ServerSettings(models_dir=Path(args.models_dir), model=args.model, host=args.host, port=args.port,
                          api_auth=parse_api_auth(args.api_auth), device=args.device, dtype=args.dtype,
                          weight_dtype=args.weight_dtype, compile=args.compile, offload=args.offload, limits=limits)


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from .app import create_app

    settings = settings_from_args(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_auth:
        log.warning("serving on %s without --api-auth: anyone who can reach this address can use it", settings.host)
    app = create_app(settings)
    print(f"sdlab: serving on http://{settings.host}:{settings.port}/ (API docs at /docs)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=5)
