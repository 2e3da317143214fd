"""The job queue: one thread owns the model and the device and runs jobs one at a time,
in arrival order.

HTTP handlers never touch the model. They put a `Job` on the queue and wait for its
future; the worker switches checkpoints between jobs when a job asks for another one,
reports progress (with a preview and an ETA) for GET /progress, and stops the running
job at the next sampling step on interrupt, skip, or when the client that asked for it
has gone away.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from PIL import Image

from ..errors import SdlabError
from ..outputs import samples_folder, save_image
from ..pipeline import GenerationRequest, GenerationResult, Interrupted, Pipeline, Progress
from .catalog import CheckpointEntry, ModelCatalog
from .errors import ModelLoadError, NeedsOption, NoModel

log = logging.getLogger(__name__)

JobKind = Literal["txt2img", "img2img", "load", "graph", "extras", "merge"]


@dataclass
class Job:
    kind: JobKind
    checkpoint: CheckpointEntry | None  # None: whatever the worker has (only if nothing is named anywhere)
    request: GenerationRequest | None = None  # seeds already resolved; None for a load job
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: str = ""
    # save_images: the outputs folder to write each finished batch's images to, as the web UI
    # does (`outputs.save_image`); None: nothing is written.
    save_to: Path | None = None
    # A "graph" job (ComfyUI's face): what runs in the worker thread, given a `TaskContext`;
    # its return value is the job's result.
    task: Callable[[TaskContext], Any] | None = None
    # Load options (`ServerState.load_options`: sd_vae, fp8_storage) this job's model is loaded
    # with instead of the server's: a request's override_settings. A job after it without them
    # loads the model as the options say again, as the web UI restores them afterwards.
    options: Mapping[str, Any] = field(default_factory=dict)

    def cancel(self) -> None:
        """The client is gone: drop the job if it waits, stop it at the next step if it runs."""
        self.cancelled.set()
        self.future.cancel()


@dataclass
class JobResult:
    result: GenerationResult
    checkpoint: CheckpointEntry
    interrupted: bool
    steps_done: int  # sampling steps of the last batch that ran (== total unless stopped early)
    saved: list[str] = field(default_factory=list)  # files written (save_to), relative to save_to
    notes: list[str] = field(default_factory=list)  # what the client should know (an image not saved)


@dataclass
class _State:
    """What GET /progress reports; the web UI's `shared.state` fields."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    job_timestamp: str = "0"
    sampling_step: int = 0
    sampling_steps: int = 0
    skipped: bool = False
    interrupted: bool = False
    time_start: float = 0.0
    textinfo: str | None = None
    preview: Callable[[], Image.Image | None] | None = None


@dataclass(frozen=True)
class ProgressSnapshot:
    progress: float
    eta_relative: float
    state: dict
    textinfo: str | None
    preview: Callable[[], Image.Image | None] | None


Loader = Callable[[CheckpointEntry, Mapping[str, Any]], Pipeline]  # (checkpoint, a job's load options)


class Worker:
    """One thread, one model, one queue."""

    def __init__(self, catalog: ModelCatalog, loader: Loader,
                 load_key: Callable[[Mapping[str, Any]], Any] = lambda options: None):
        """`load_key(options)`: the settings a model is loaded with (its weight dtype, say), given a
        job's overrides of them; a model loaded under another key is loaded again."""
        self.catalog = catalog
        self._loader = loader
        self._load_key = load_key
        self._loaded_key: Any = None
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._state = _State()
        self._thread: threading.Thread | None = None
        self._pipeline: Pipeline | None = None
        self.loaded: CheckpointEntry | None = None
        self._counter = 0

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sdlab-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the running job is interrupted; jobs still waiting are cancelled."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
        with self._lock:
            self._state.interrupted = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    # -- called from HTTP handlers -----------------------------------------------------

    def submit(self, job: Job) -> Job:
        with self._lock:
            self._counter += 1
            job.id = f"task({self._counter})"
        self._queue.put(job)
        return job

    def interrupt(self) -> None:
        with self._lock:
            if self._state.job:
                self._state.interrupted = True

    def skip(self) -> None:
        with self._lock:
            if self._state.job:
                self._state.skipped = True

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def snapshot(self) -> ProgressSnapshot:
        """The web UI's /progress arithmetic: a little progress as soon as a job starts,
        then batches done plus steps done in this batch; ETA from the time so far."""
        with self._lock:
            s = self._state
            state = {"skipped": s.skipped, "interrupted": s.interrupted, "stopping_generation": False,
                     "job": s.job, "job_count": s.job_count, "job_timestamp": s.job_timestamp,
                     "job_no": s.job_no, "sampling_step": s.sampling_step, "sampling_steps": s.sampling_steps,
                     "queued": self._queue.qsize()}
            if s.job_count == 0:
                return ProgressSnapshot(0.0, 0.0, state, s.textinfo, None)
            progress = 0.01 + s.job_no / s.job_count
            if s.sampling_steps > 0:
                progress += s.sampling_step / s.sampling_steps / s.job_count
            elapsed = time.time() - s.time_start
            eta = elapsed / progress - elapsed
            return ProgressSnapshot(min(progress, 1.0), max(eta, 0.0), state, s.textinfo, s.preview)

    # -- the worker thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
                continue
            try:
                if job.kind == "load":
                    result = self._load_job(job)
                elif job.task is not None:  # a graph (ComfyUI), an upscale (extras), a merge
                    result = self._task_job(job)
                else:
                    result = self._generate_job(job)
            except BaseException as e:  # noqa: BLE001 - every failure goes back to the waiting client
                if not isinstance(e, SdlabError):
                    log.exception("job %s failed", job.id)
                job.future.set_exception(e)
            else:
                job.future.set_result(result)
            finally:
                with self._lock:
                    self._state = _State()

    def _begin(self, job: Job, job_count: int, steps: int, textinfo: str) -> None:
        with self._lock:
            self._state = _State(job=job.kind, job_count=job_count, sampling_steps=steps,
                                 job_timestamp=time.strftime("%Y%m%d%H%M%S"), time_start=time.time(),
                                 textinfo=textinfo)

    def _ensure_model(self, entry: CheckpointEntry | None,
                      options: Mapping[str, Any] = MappingProxyType({})) -> tuple[Pipeline, CheckpointEntry]:
        if entry is None:
            if self._pipeline is not None:
                return self._pipeline, self.loaded
            raise NoModel(f"no model to generate with: put a checkpoint in {self.catalog.root / 'Stable-diffusion'} "
                          "or start the server with --model")
        key = self._load_key(options)
        if (self._pipeline is not None and self.loaded is not None and self.loaded.path == entry.path
                and self._loaded_key == key):
            return self._pipeline, self.loaded
        # Free the old model before loading the next: two never fit at once on a small GPU.
        self._pipeline, self.loaded = None, None
        gc.collect()
        _empty_device_cache()
        with self._lock:
            self._state.textinfo = f"Loading {entry.name}"
        log.info("loading %s", entry.path)
        try:
            self._pipeline = self._loader(entry, options)
        except NeedsOption:
            raise  # the client's to fix (a 422), not a broken file
        except SdlabError as e:
            raise ModelLoadError(f"cannot load {entry.name}: {e}") from None
        self._loaded_key = key
        self.loaded = next((e for e in self.catalog.checkpoints() if e.path == entry.path), entry)
        for parking in (self._pipeline.text_parking, self._pipeline.refiner_text_parking):
            if parking is not None:  # a GPU's text encoders stay there while another request waits
                parking.keep = self.generation_waiting
        return self._pipeline, self.loaded

    def generation_waiting(self) -> bool:
        """Whether a txt2img / img2img job waits in the queue (its prompts will need the encoders)."""
        with self._queue.mutex:
            return any(job is not None and job.kind in ("txt2img", "img2img") for job in self._queue.queue)

    def _load_job(self, job: Job) -> CheckpointEntry:
        self._begin(job, 1, 0, f"Loading {job.checkpoint.name if job.checkpoint else ''}")
        return self._ensure_model(job.checkpoint, job.options)[1]

    def _task_job(self, job: Job) -> Any:
        self._begin(job, 1, 0, {"graph": "Running a graph", "extras": "Upscaling", "merge": "Merging checkpoints"}
                    .get(job.kind, job.kind))
        return job.task(TaskContext(self, job))

    def _generate_job(self, job: Job) -> JobResult:
        req = job.request
        self._begin(job, req.n_iter, req.steps, f"Preparing {job.kind}")
        pipeline, entry = self._ensure_model(job.checkpoint, job.options)
        steps_done = 0

        def callback(p: Progress) -> None:
            nonlocal steps_done
            steps_done = p.step
            with self._lock:
                s = self._state
                s.sampling_step, s.sampling_steps, s.preview = p.step, p.total, p.preview
                s.textinfo = f"Sampling step {p.step}/{p.total}"
                stop = s.interrupted or s.skipped
            if stop or job.cancelled.is_set():
                raise Interrupted()

        # Batch by batch, so "skip" can end one batch and go on with the next, as the web UI's
        # skip does (`Pipeline.batches` numbers the seeds as one run).
        images, infotexts, seeds, subseeds, maps = [], [], [], [], []
        interrupted = False
        saved, notes = [], []
        for batch, part in enumerate(pipeline.batches(req, callback)):
            images += part.images
            infotexts += part.infotexts
            maps = maps or part.detected_maps  # the same in every batch
            if part.images:
                seeds += part.seeds
                subseeds += part.subseeds
            # Saved batch by batch, so a client that goes away later loses nothing already made. A
            # batch stopped early (interrupt, skip) is not saved, as the web UI's default
            # (save_incomplete_images off) has it.
            if job.save_to is not None and not part.interrupted:
                self._save(job.save_to, part, saved, notes)
            with self._lock:
                stopped_by_user = self._state.interrupted
                self._state.job_no, self._state.sampling_step, self._state.skipped = batch + 1, 0, False
            if job.cancelled.is_set() or stopped_by_user:
                interrupted = True
                break
        result = GenerationResult(images, infotexts, seeds, subseeds, req, interrupted, maps)
        return JobResult(result, entry, interrupted, steps_done, saved, notes)

    @staticmethod
    def _save(outputs: Path, part: GenerationResult, saved: list[str], notes: list[str]) -> None:
        folder = samples_folder(outputs, part.request.mode)
        for image, text, seed in zip(part.images, part.infotexts, part.seeds):
            try:
                path = save_image(image, folder, seed, text)
            except OSError as e:  # a full disk must not cost the client the images it is about to receive
                log.error("save_images: cannot write to %s: %s", folder, e)
                notes.append(f"save_images: cannot write to {folder} ({e.strerror or e}); this batch's images "
                             "were not saved")
                return
            saved.append(path.relative_to(outputs).as_posix())


class TaskContext:
    """What a graph job (`Job.task`) sees of the worker: the model it asks for, loaded by the
    worker (switching checkpoints as any job does), and progress reports that also stop it on
    interrupt (raising `Interrupted`)."""

    def __init__(self, worker: Worker, job: Job):
        self._worker = worker
        self.job = job

    def pipeline(self, entry: CheckpointEntry | None) -> Pipeline:
        return self._worker._ensure_model(entry, self.job.options)[0]

    @property
    def loaded(self) -> CheckpointEntry | None:
        return self._worker.loaded

    def progress(self, step: int, total: int, textinfo: str | None = None,
                 preview: Callable[[], Image.Image | None] | None = None) -> None:
        """Report a sampling step for GET /sdapi/v1/progress; raises `Interrupted` when the job
        was interrupted or cancelled."""
        with self._worker._lock:
            s = self._worker._state
            s.sampling_step, s.sampling_steps = step, total
            s.preview = preview
            s.textinfo = textinfo or f"Sampling step {step}/{total}"
            stop = s.interrupted
        self.check()
        if stop:
            raise Interrupted()

    def jobs(self, done: int, count: int) -> None:
        """Report a job of several parts (the X/Y/Z plot's cells): `done` of `count` finished, as
        the web UI's job_no / job_count, which GET /progress counts in."""
        with self._worker._lock:
            s = self._worker._state
            s.job_no, s.job_count, s.sampling_step = done, count, 0

    def check(self) -> None:
        """Raise `Interrupted` if the job was interrupted or cancelled."""
        with self._worker._lock:
            stop = self._worker._state.interrupted
        if stop or self.job.cancelled.is_set():
            raise Interrupted()


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
