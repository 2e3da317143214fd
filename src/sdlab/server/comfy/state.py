"""What ComfyUI's face keeps while the server runs: the prompts waiting and running (each one a
job in the server's one queue), the history, the websocket connections, the executor's cache,
and the input / output / temp folders under the outputs folder."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import SdlabError
from ..catalog import CheckpointEntry, NotFound
from ..worker import Job
from . import graph
from .nodes import IMAGE_SUFFIXES, NodeError

if TYPE_CHECKING:
    from ..state import ServerState

log = logging.getLogger(__name__)

MAXIMUM_HISTORY_SIZE = 10000
FOLDERS = ("output", "input", "temp")
SENSITIVE = ("auth_token_comfy_org", "api_key_comfy_org")


class Hub:
    """The websocket connections by session id. Messages are put on each connection's own
    asyncio queue (from any thread) and sent in order by its sender task."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sockets: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def connect(self, sid: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._sockets[sid] = q
        return q

    def disconnect(self, sid: str, q: asyncio.Queue) -> None:
        with self._lock:
            if self._sockets.get(sid) is q:
                del self._sockets[sid]

    def send(self, event: str, data: Any, sid: str | None = None) -> None:
        """A JSON message to the socket `sid`; None: to every socket."""
        self._put(json.dumps({"type": event, "data": data}), sid)

    def send_bytes(self, frame: bytes, sid: str) -> None:
        """A binary frame (ComfyUI's previews) to the socket `sid` only."""
        self._put(frame, sid)

    def _put(self, message: str | bytes, sid: str | None) -> None:
        with self._lock:
            loop = self._loop
            targets = list(self._sockets.values()) if sid is None else [self._sockets[sid]] if sid in self._sockets else []
        if loop is None or not targets:
            return
        for q in targets:
            try:
                loop.call_soon_threadsafe(q.put_nowait, message)
            except RuntimeError:  # the loop has closed (shutdown)
                return


@dataclass
class QueueItem:
    number: float
    prompt_id: str
    prompt: dict
    extra_data: dict
    outputs: list[str]
    job: Job | None = None
    started: float | None = None

    def as_list(self) -> list:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass
class Env:
    """What the nodes read of the server: the models folder, the input/output folders, the
    device. Names are listed as ComfyUI's combos list them, and found only in those listings."""

    state: ComfyState
    _embeddings: Any = field(default=None, init=False, repr=False)

    def checkpoint_names(self) -> list[str]:
        return [e.name for e in self.state.server.catalog.checkpoints()]

    def find_checkpoint(self, name: str) -> CheckpointEntry:
        try:
            return self.state.server.catalog.find_checkpoint(name)
        except NotFound as e:
            raise NodeError(str(e)) from None

    def lora_names(self) -> list[str]:
        return [m.name + m.path.suffix for m in self.state.server.catalog.models.list_loras()]

    def find_lora(self, name: str) -> Path:
        return self.state.server.catalog.models.resolve_lora(name)

    def vae_names(self) -> list[str]:
        return [m.name + m.path.suffix for m in self.state.server.catalog.models.list("vae") if m.path.is_file()]

    def find_vae(self, name: str) -> Path:
        listing = {m.name + m.path.suffix: m.path for m in self.state.server.catalog.models.list("vae")}
        return self._find(name, listing, "VAE")

    def controlnet_names(self) -> list[str]:
        return list(self._controlnets())

    def find_controlnet(self, name: str) -> Path:
        return self._find(name, self._controlnets(), "ControlNet")

    def _controlnets(self) -> dict[str, Path]:
        from ...controlnet.units import CONTROLNET_FOLDERS, SUFFIXES
        from .loaders import files_in

        found = files_in([self.models_root / f for f in CONTROLNET_FOLDERS], SUFFIXES, folder_models=True)
        # The web UI extension's preprocessor networks live in ControlNet/annotators: not control models.
        return {name: path for name, path in found.items() if not name.startswith("annotators/")}

    def upscale_model_names(self) -> list[str]:
        return list(self._upscale_models())

    def find_upscale_model(self, name: str) -> Path:
        return self._find(name, self._upscale_models(), "upscale model")

    def _upscale_models(self) -> dict[str, Path]:
        from ...upscalers import FOLDERS, MODEL_SUFFIXES
        from .loaders import files_in

        return files_in([self.models_root / f for f in FOLDERS], MODEL_SUFFIXES)

    def text_encoder_names(self) -> list[str]:
        return list(self._text_encoders())

    def find_text_encoder(self, name: str) -> Path:
        return self._find(name, self._text_encoders(), "text encoder")

    def _text_encoders(self) -> dict[str, Path]:
        from .loaders import ENCODER_FOLDERS, ENCODER_SUFFIXES, files_in

        return files_in([self.models_root / f for f in ENCODER_FOLDERS], ENCODER_SUFFIXES)

    @staticmethod
    def _find(name: str, listing: dict[str, Path], what: str) -> Path:
        if name not in listing:
            raise NodeError(f"no {what} named {name!r} in the models folder")
        return listing[name]

    @property
    def models_root(self) -> Path:
        return self.state.server.catalog.models.root

    def device(self):
        """Where files a graph loads on its own run (the server's device)."""
        from ...device import choose_device

        return choose_device(self.state.server.settings.device)

    def dtype(self, device):
        """The dtype they compute in (the server's, else the device's default)."""
        from ...device import default_dtype, parse_dtype

        return parse_dtype(self.state.server.settings.dtype) or default_dtype(device)

    def embedding_library(self):
        """The models folder's embeddings, for text encoders loaded from files."""
        from ...embeddings import EmbeddingLibrary

        if self._embeddings is None:
            self._embeddings = EmbeddingLibrary(self.state.server.catalog.models.folder("embedding"))
        return self._embeddings

    def folder(self, kind: str) -> Path:
        return self.state.folder(kind)

    def input_images(self) -> list[str]:
        folder = self.state.folder("input")
        return sorted(f.name for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)

    def annotated_path(self, name: str, default: str = "input") -> Path | None:
        return self.state.annotated_path(name, default)


class ComfyState:
    def __init__(self, server: ServerState):
        self.server = server
        self.root = server.outputs_dir / "comfy"
        self.env = Env(self)
        self.hub = Hub()
        self.cache = graph.OutputCache()
        self._lock = threading.RLock()
        self.pending: OrderedDict[str, QueueItem] = OrderedDict()
        self.running: QueueItem | None = None
        self.history: OrderedDict[str, dict] = OrderedDict()
        self._number = 0
        self._temp_cleared = False

    # -- folders ----------------------------------------------------------------------

    def folder(self, kind: str) -> Path:
        path = self.root / kind
        if kind == "temp" and not self._temp_cleared:
            self._temp_cleared = True  # ComfyUI empties its temp folder at startup
            shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def annotated_path(self, name: str, default: str = "input", subfolder: str = "") -> Path | None:
        """`name [output]` / `sub/name` inside one of the folders; None if it leads outside it."""
        kind = default
        for k in FOLDERS:
            if name.endswith(f" [{k}]"):
                name, kind = name[: -len(k) - 3], k
        return self.inside(kind, os.path.join(subfolder, name) if subfolder else name)

    def inside(self, kind: str, relative: str) -> Path | None:
        if kind not in FOLDERS or "\x00" in relative:
            return None
        base = self.folder(kind).resolve()
        path = (base / relative).resolve()
        return path if path.is_relative_to(base) and path != base else None

    # -- the queue ----------------------------------------------------------------------

    def queue_remaining(self) -> int:
        with self._lock:
            return len(self.pending) + (1 if self.running is not None else 0)

    def status(self) -> dict:
        return {"exec_info": {"queue_remaining": self.queue_remaining()}}

    def broadcast_status(self) -> None:
        self.hub.send("status", {"status": self.status()})

    def next_number(self, number: Any, front: bool) -> float:
        with self._lock:
            if number is not None:
                return float(number)
            number, self._number = self._number, self._number + 1
            return -number if front else number

    def enqueue(self, item: QueueItem) -> None:
        job = Job("graph", None, task=lambda ctx: self._run(ctx, item))
        item.job = job
        with self._lock:
            self.pending[item.prompt_id] = item
        self.server.worker.submit(job)
        self.broadcast_status()

    def delete(self, prompt_ids: list[str]) -> None:
        with self._lock:
            items = [self.pending.pop(p) for p in prompt_ids if p in self.pending]
        for item in items:
            item.job.cancel()
        if items:
            self.broadcast_status()

    def clear(self) -> None:
        self.delete(list(self.pending))

    def interrupt(self, prompt_id: str | None) -> None:
        with self._lock:
            running = self.running
        if prompt_id is not None and (running is None or running.prompt_id != prompt_id):
            log.info("prompt %s is not running; not interrupted", prompt_id)
            return
        self.server.worker.interrupt()

    def queue(self) -> dict:
        with self._lock:
            running = [self.running.as_list()] if self.running is not None else []
            pending = sorted((i.as_list() for i in self.pending.values()), key=lambda x: x[0])
        return {"queue_running": running, "queue_pending": pending}

    # -- running one prompt (in the worker thread) -----------------------------------------

    def _run(self, ctx, item: QueueItem) -> dict:
        with self._lock:
            self.pending.pop(item.prompt_id, None)
            self.running = item
        item.started = time.time()
        client = item.extra_data.get("client_id")

        def send(event: str, data: dict, broadcast: bool = False) -> None:
            if broadcast:
                self.hub.send(event, data)
            elif client is not None:
                self.hub.send(event, data, client)

        messages: list = []
        status_str, outputs, meta = "error", {}, {}
        try:
            send_bytes = None if client is None else (lambda frame: self.hub.send_bytes(frame, client))
            status_str, outputs, meta = graph.execute(ctx, self.env, item.prompt_id, item.prompt, item.extra_data,
                                                      item.outputs, self.cache, send, messages, send_bytes)
        finally:
            entry = {"prompt": item.as_list(), "outputs": outputs,
                     "status": {"status_str": status_str, "completed": status_str == "success",
                                "messages": messages},
                     "meta": meta}
            with self._lock:
                if len(self.history) >= MAXIMUM_HISTORY_SIZE:
                    self.history.popitem(last=False)
                self.history[item.prompt_id] = entry
                self.running = None
            self.broadcast_status()
            send("executing", {"node": None, "prompt_id": item.prompt_id})
        return entry

    # -- history ------------------------------------------------------------------------

    def get_history(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> dict:
        with self._lock:
            if prompt_id is not None:
                return {prompt_id: json.loads(json.dumps(self.history[prompt_id]))} if prompt_id in self.history else {}
            keys = list(self.history)
            if offset < 0 and max_items is not None:
                offset = len(keys) - max_items
            offset = max(offset, 0)
            keys = keys[offset:]
            if max_items is not None:
                keys = keys[:max_items]
            return {k: self.history[k] for k in keys}

    def delete_history(self, prompt_ids: list[str] | None) -> None:
        with self._lock:
            if prompt_ids is None:
                self.history.clear()
            for p in prompt_ids or []:
                self.history.pop(p, None)

    def jobs(self) -> list[dict]:
        """The editor's /api/jobs view of the queue and the history (comfy_execution/jobs.py)."""
        out = []
        with self._lock:
            items = ([(self.running, "in_progress")] if self.running else []) + [(i, "pending") for i in self.pending.values()]
            for item, status in items:
                out.append({"id": item.prompt_id, "status": status, "priority": item.number,
                            "create_time": item.extra_data.get("create_time", 0), "outputs_count": 0,
                            **({"execution_start_time": int(item.started * 1000)} if item.started else {})})
            for prompt_id, entry in self.history.items():
                st = entry["status"]
                events = [m[0] for m in st["messages"]]
                status = ("completed" if st["status_str"] == "success" else
                          "cancelled" if "execution_interrupted" in events else "failed")
                images = [dict(img, nodeId=n, mediaType="images") for n, o in entry["outputs"].items()
                          for img in o.get("images", [])]
                times = [m[1].get("timestamp") for m in st["messages"]]
                job = {"id": prompt_id, "status": status, "priority": entry["prompt"][0],
                       "create_time": entry["prompt"][3].get("create_time", 0), "outputs_count": len(images),
                       "execution_start_time": times[0] if times else None,
                       "execution_end_time": times[-1] if times else None}
                if images:
                    job["preview_output"] = images[0]
                error = next((m[1] for m in st["messages"] if m[0] == "execution_error"), None)
                if error is not None:
                    job["execution_error"] = error
                out.append(job)
        return out


def new_prompt_id() -> str:
    return str(uuid.uuid4())


def strip_sensitive(extra_data: dict) -> dict:
    return {k: v for k, v in extra_data.items() if k not in SENSITIVE}


class ComfyError(SdlabError):
    pass
