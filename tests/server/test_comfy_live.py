"""ComfyUI's own example flow (script_examples/websockets_api_example.py) against a real server on
loopback: connect the websocket with a clientId, queue the graph with urllib, follow the
messages until `executing` with node null, read /history/{id}, fetch the image with /view. The
image is the one the generation steps give for ComfyUI's rules, and within a level or two of
`Pipeline.generate` with the same seed, sampler, schedule, steps and CFG."""

from __future__ import annotations

import io
import json
import threading
import urllib.parse
import urllib.request
import uuid

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
websocket = pytest.importorskip("websocket")  # websocket-client, what ComfyUI's example uses

from PIL import Image  # noqa: E402

from sdlab.server.app import create_app  # noqa: E402
from sdlab.server.settings import ServerSettings  # noqa: E402
from tests.server.live import serving  # noqa: E402
from tests.server.test_comfy import graph  # noqa: E402
from tests.tiny import save_native, tiny_bundle  # noqa: E402

SEED, STEPS, CFG = 12345, 4, 6.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "Stable-diffusion").mkdir()
    save_native(tiny_bundle("sd1", seed=0), root / "Stable-diffusion" / "tiny.safetensors")
    app = create_app(ServerSettings(models_dir=root, model="tiny.safetensors",
                                    outputs_dir=tmp_path_factory.mktemp("outputs")))
    with serving(app) as port:
        yield f"127.0.0.1:{port}", app, root / "Stable-diffusion" / "tiny.safetensors"


def queue_prompt(address: str, prompt: dict, client_id: str) -> dict:
    data = json.dumps({"prompt": prompt, "client_id": client_id}).encode("utf-8")
    return json.loads(urllib.request.urlopen(urllib.request.Request(f"http://{address}/prompt", data=data)).read())


def get(address: str, path: str, **params) -> bytes:
    url = f"http://{address}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url) as response:
        return response.read()


def run_example(address: str, prompt: dict) -> tuple[list[dict], dict, list[Image.Image]]:
    """websockets_api_example.py, with the messages kept."""
    client_id = str(uuid.uuid4())
    ws = websocket.WebSocket()
    ws.connect(f"ws://{address}/ws?clientId={client_id}", timeout=60)
    try:
        events = [json.loads(ws.recv())]
        prompt_id = queue_prompt(address, prompt, client_id)["prompt_id"]
        while True:
            out = ws.recv()
            if isinstance(out, str):
                message = json.loads(out)
                events.append(message)
                if message["type"] == "executing":
                    data = message["data"]
                    if data["node"] is None and data["prompt_id"] == prompt_id:
                        break
    finally:
        ws.close()
    assert events[0] == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client_id}}
    history = json.loads(get(address, f"/history/{prompt_id}"))[prompt_id]
    images = []
    for node_output in history["outputs"].values():
        for image in node_output.get("images", []):
            img = Image.open(io.BytesIO(get(address, "/view", **image)))
            img.load()
            images.append(img)
    return events, history, images


def reference(path, prompt: str, negative: str, width: int, height: int) -> tuple[Image.Image, Image.Image]:
    """The same image from the steps with ComfyUI's two rules (noise scaled by sqrt(1 + sigma^2)
    at full denoise; pixels truncated to 8 bits), and `Pipeline.generate`'s."""
    from sdlab import steps
    from sdlab.device import parse_dtype, parse_weight_dtype
    from sdlab.model import unet_model
    from sdlab.perf import load_for_inference
    from sdlab.pipeline import GenerationRequest, Pipeline
    from sdlab.sampling.denoiser import CFGDenoiser
    from sdlab.sampling.noise import BatchNoise
    from sdlab.sampling.samplers import SAMPLERS
    from sdlab.sampling.schedules import SCHEDULES
    from sdlab.text.conditioning import prompt_schedule

    bundle = load_for_inference(path, None, parse_dtype(None), compile=False, offload=False,
                                weight_dtype=parse_weight_dtype(None))
    pipe = Pipeline(bundle)
    generated = pipe.generate(GenerationRequest(prompt=prompt, negative_prompt=negative, seed=SEED, steps=STEPS,
                                                cfg_scale=CFG, sampler="Euler", schedule="normal", width=width,
                                                height=height)).images[0]
    with torch.no_grad():
        model = unet_model(bundle)
        pos, neg = prompt_schedule(pipe.text, [prompt, negative], STEPS, 1)
        f = bundle.config.vae.downsample_factor
        noise = BatchNoise((1, 4, height // f, width // f), SEED)
        sigmas = SCHEDULES["normal"].function(STEPS, model.sampling)
        x = noise.initial() * float(torch.sqrt(1 + sigmas[0] ** 2))
        cfg = CFGDenoiser(model, model.conditioning(pos.at(0), 1, None, False),
                          model.conditioning(neg.at(0), 1, None, True), CFG)
        x = steps.sample(model.sampling, cfg, x, sigmas, SAMPLERS["Euler"], noise.sampler_noise(x, sigmas, False))
        pixels = ((steps.decode(bundle.vae, x, bundle.family).float() + 1) / 2).clamp(0, 1)
        arr = np.clip(255.0 * pixels[0].permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8)
    return Image.fromarray(arr), generated


def test_websocket_example_flow_and_the_image(server):
    address, app, path = server
    g = graph(seed=SEED, steps=STEPS, cfg=CFG)
    events, history, images = run_example(address, g)
    kinds = [e["type"] for e in events]
    # ComfyUI's order: status (queued), execution_start, execution_cached, executing/progress per
    # node, executed, execution_success, status (done), executing null.
    assert kinds[1:4] == ["status", "execution_start", "execution_cached"]
    assert kinds[-3:] == ["execution_success", "status", "executing"]
    executing = [e["data"]["node"] for e in events if e["type"] == "executing"]
    assert executing[:-1] and set(executing[:-1]) == set(g) and executing[-1] is None
    assert executing.index("3") < executing.index("8") < executing.index("9")
    progress = [e["data"] for e in events if e["type"] == "progress"]
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(i, STEPS, "3") for i in range(1, STEPS + 1)]
    executed = [e["data"] for e in events if e["type"] == "executed"]
    assert executed == [{"node": "9", "display_node": "9", "output": history["outputs"]["9"],
                         "prompt_id": events[-1]["data"]["prompt_id"]}]
    assert history["outputs"]["9"]["images"][0]["filename"] == "ComfyUI_00001_.png"
    assert history["status"]["status_str"] == "success" and history["status"]["completed"]

    [image] = images
    expected, generated = reference(path, "a red cat", "bad hands", 64 // 2, 64 // 2)  # the tiny VAE is 4x
    assert image.size == expected.size == generated.size
    got = np.asarray(image.convert("RGB"), dtype=int)
    assert np.array_equal(got, np.asarray(expected, dtype=int))
    assert np.abs(got - np.asarray(generated, dtype=int)).max() <= 2

    # The same prompt again: nothing runs, every node is reported cached, the image re-announced.
    events, again, _ = run_example(address, g)
    kinds = [e["type"] for e in events]
    cached = next(e["data"]["nodes"] for e in events if e["type"] == "execution_cached")
    assert sorted(cached) == sorted(g) and "progress" not in kinds
    assert [e["data"]["node"] for e in events if e["type"] == "executing"] == [None]
    assert again["outputs"] == history["outputs"]


def test_interleaved_clients_of_both_faces(server):
    """/sdapi/v1/txt2img and /prompt from several threads at once: all answered, each image the
    one the same request gives alone."""
    import base64

    address = server[0]

    def txt2img(seed: int) -> bytes:
        body = json.dumps({"prompt": "a cat", "seed": seed, "steps": 3, "width": 32, "height": 32,
                           "sampler_name": "Euler"}).encode()
        req = urllib.request.Request(f"http://{address}/sdapi/v1/txt2img", data=body,
                                     headers={"Content-Type": "application/json"})
        return base64.b64decode(json.loads(urllib.request.urlopen(req).read())["images"][0])

    def comfy(seed: int) -> np.ndarray:
        return np.asarray(run_example(address, graph(seed=seed))[2][0])

    alone = {("a", s): txt2img(s) for s in (1, 2)} | {("c", s): comfy(s) for s in (3, 4)}
    results: dict = {}

    def work(kind: str, seed: int) -> None:
        results[(kind, seed)] = txt2img(seed) if kind == "a" else comfy(seed)

    threads = [threading.Thread(target=work, args=key) for key in [("a", 1), ("c", 3), ("a", 2), ("c", 4)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert set(results) == set(alone)
    for key, value in alone.items():
        if key[0] == "a":
            a, b = (np.asarray(Image.open(io.BytesIO(v)).convert("RGB")) for v in (value, results[key]))
            assert np.array_equal(a, b), key
        else:
            assert np.array_equal(value, results[key]), key
