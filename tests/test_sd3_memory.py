"""SD3's text encoders and memory (issue 27, item 8): needed once per prompt, so

- on the CPU they keep the narrow dtype their file stores (T5 in fp16 / bf16 / fp8) through
  encoding, upcast layer by layer as they run, and give what the same weights widened give;
- on a GPU they wait in CPU memory between prompts (`perf.TextEncoderParking`): brought to the
  device by a prompt the runners have not cached, sent back once a request's prompts are encoded,
  kept when the server's queue holds another generation job. Tested here with a fake device (the
  moves are recorded, nothing is allocated), so it runs on any CPU.
"""

from __future__ import annotations

import pytest
import torch

from sdlab.checkpoints.io import save_safetensors
from sdlab.checkpoints.loader import load_bundle
from sdlab.models.storage import narrowable, set_dtypes, storage_dtype
from sdlab.perf import TextEncoderParking, load_for_inference
from sdlab.pipeline import GenerationRequest, Pipeline

from .test_sd3 import PROMPT, SIZE

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def files(tmp_path_factory, sd3_folder):
    """The tiny SD3 model as a file without T5, and its T5 stored in three narrow dtypes."""
    root = tmp_path_factory.mktemp("sd3mem")
    bundle = load_bundle(sd3_folder, device="cpu", dtype=torch.float32)
    sd = {k: v.clone() for k, v in bundle.state_dict().items()}
    prefix = "text_encoders.t5xxl.transformer."
    save_safetensors({k: v for k, v in sd.items() if not k.startswith(prefix)}, root / "sd3.safetensors")
    t5 = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    out = {"model": root / "sd3.safetensors"}
    for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn):
        name = str(dtype).removeprefix("torch.")
        # Matrices narrow, norms as released files keep them (fp16 / bf16; fp32 beside fp8 weights).
        narrow = {k: v.to(dtype) if v.ndim >= 2 else v.to(torch.float32 if dtype.itemsize == 1 else dtype)
                  for k, v in t5.items()}
        save_safetensors(narrow, root / f"t5xxl_{name}.safetensors")
        out[dtype] = root / f"t5xxl_{name}.safetensors"
    return out


def _matrices(net: torch.nn.Module) -> set[torch.dtype]:
    return {getattr(m, a).dtype for m, a in narrowable(net).values() if getattr(m, a).ndim >= 2
            and not isinstance(m, torch.nn.Embedding)}


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float8_e4m3fn], ids=str)
def test_t5_keeps_its_file_dtype_through_encoding_and_upcasts_exactly(files, stored):
    pipe = Pipeline(load_for_inference(files["model"], "cpu", torch.float32, text_encoder_files={"t5xxl": files[stored]}))
    t5, runner = pipe.bundle.text_encoders[2], pipe.text[2]
    assert storage_dtype(t5) == stored and _matrices(t5) == {stored}
    chunks = runner.chunks(PROMPT)
    context = runner.encode(chunks).context
    # Encoding upcast layer by layer and left the stored weights as they were.
    assert storage_dtype(t5) == stored and _matrices(t5) == {stored}
    assert context.abs().max() > 0.1 and context.isfinite().all()
    # The same weights widened to fp32 up front give the same context (the upcast is exact).
    wide = load_bundle(files["model"], device="cpu", dtype=torch.float32,
                       text_encoder_files={"t5xxl": files[stored]}).text_encoders[2]
    set_dtypes(wide, torch.float32)
    assert _matrices(wide) == {torch.float32}
    ids = torch.tensor([[t for c in chunks for t in c.tokens]])
    with torch.no_grad():
        assert torch.equal(wide(ids).float(), context)


class _FakeDevice:
    """Records where the parking would move each encoder; moves nothing (no GPU needed)."""

    def __init__(self, names: dict[int, str]):
        self.names, self.moves = names, []

    def module(self, net: torch.nn.Module, device: torch.device) -> None:
        self.moves.append((self.names[id(net)], device.type))

    @staticmethod
    def value(value, device):
        return value


@pytest.fixture(scope="module")
def pipe(files):
    return Pipeline(load_for_inference(files["model"], "cpu", torch.float32,
                                       text_encoder_files={"t5xxl": files[torch.float16]}))


def test_text_encoders_leave_the_gpu_after_encoding_unless_the_next_request_needs_them(pipe):
    encoders = list(pipe.bundle.text_encoders)
    fake = _FakeDevice({id(te): name for te, name in zip(encoders, ("clip_l", "clip_g", "t5xxl"))})
    waiting = [False]
    pipe.text_parking = TextEncoderParking(encoders, "cuda", keep=lambda: waiting[0], move_module=fake.module,
                                           move_value=fake.value)
    try:
        where_while_sampling = []

        def run(prompt: str) -> None:
            pipe.generate(GenerationRequest(prompt, steps=1, sampler="Euler", cfg_scale=4.0, seed=1, width=SIZE,
                                            height=SIZE),
                          callback=lambda p: where_while_sampling.append(set(pipe.text_parking.where.values())))

        run("a green square")  # a new prompt: each encoder to the GPU once, all back before sampling
        assert fake.moves == [(n, "cuda") for n in ("clip_l", "clip_g", "t5xxl")] + \
            [(n, "cpu") for n in ("clip_l", "clip_g", "t5xxl")]
        assert where_while_sampling and all(w == {torch.device("cpu")} for w in where_while_sampling)
        fake.moves.clear()
        run("a green square")  # cached prompts: nothing moves
        assert fake.moves == []
        waiting[0] = True  # another request waits: they stay on the GPU after encoding
        where_while_sampling.clear()
        run("a yellow star")
        assert fake.moves == [(n, "cuda") for n in ("clip_l", "clip_g", "t5xxl")]
        assert all(w == {torch.device("cuda")} for w in where_while_sampling)
        waiting[0] = False
        pipe.park_text_encoders()
        assert fake.moves[-3:] == [(n, "cpu") for n in ("clip_l", "clip_g", "t5xxl")]
    finally:
        pipe.text_parking.remove("cpu")
        pipe.text_parking = None


def test_parking_is_only_for_gpus_and_not_with_offload(pipe):
    from sdlab.perf import text_encoder_parking

    assert pipe.text_parking is None and text_encoder_parking(pipe.bundle) is None  # on the CPU they run where they are


def test_the_server_keeps_encoders_while_a_generation_job_waits():
    from sdlab.server.worker import Job, Worker

    worker = Worker(catalog=None, loader=lambda entry, options: None)
    assert not worker.generation_waiting()
    worker._queue.put(Job("load", None))
    assert not worker.generation_waiting()
    worker._queue.put(Job("img2img", None, GenerationRequest("x")))
    assert worker.generation_waiting()
