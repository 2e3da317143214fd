"""ComfyUI's API (/prompt, /history, /queue, /object_info, /view, /upload/image ...) through
FastAPI's test client, on a tiny random SD1 model: validation bodies, caching, SaveImage's
files, LoRA on a graph, and the queue shared with /sdapi/v1."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from sdlab.server.app import create_app  # noqa: E402
from sdlab.server.settings import Limits, ServerSettings  # noqa: E402
from tests.test_lora import _kohya  # noqa: E402
from tests.tiny import save_native, tiny_bundle  # noqa: E402


def graph(seed: int = 5, text: str = "a red cat", **sampler) -> dict:
    """ComfyUI's basic_api_example graph, sized for the tiny model."""
    ks = {"seed": seed, "steps": 3, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
          "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], **sampler}
    return {
        "3": {"class_type": "KSampler", "inputs": ks, "_meta": {"title": "KSampler"}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "bad hands", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]},
              "_meta": {"title": "Save Image"}},
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "Stable-diffusion").mkdir()
    bundle = tiny_bundle("sd1", seed=0)
    save_native(bundle, root / "Stable-diffusion" / "tiny.safetensors")
    (root / "Lora").mkdir()
    save_file(_kohya(bundle, rank=2, alpha=2.0), root / "Lora" / "style.safetensors")
    outputs = tmp_path_factory.mktemp("outputs")
    app = create_app(ServerSettings(models_dir=root, model="tiny.safetensors", outputs_dir=outputs,
                                    limits=Limits(max_pixels=512 * 512, max_steps=1000, max_upload_bytes=2 * 1024 * 1024)))
    with TestClient(app) as c:
        yield c, outputs


@pytest.fixture(scope="module")
def client(setup):
    return setup[0]


def queue(client, prompt: dict, path: str = "/prompt", **extra) -> str:
    r = client.post(path, content=json.dumps({"prompt": prompt, **extra}),
                    headers={"Content-Type": "application/x-www-form-urlencoded"})  # as urllib posts it
    assert r.status_code == 200, r.text
    return r.json()["prompt_id"]


def wait(client, prompt_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = client.get(f"/history/{prompt_id}").json()
        if h:
            return h[prompt_id]
        time.sleep(0.02)
    raise AssertionError("the prompt did not finish")


def messages(entry: dict) -> dict:
    return {name: data for name, data in entry["status"]["messages"]}


def view(client, image: dict) -> Image.Image:
    r = client.get("/view", params=image)
    assert r.status_code == 200
    img = Image.open(io.BytesIO(r.content))
    img.load()
    return img


# ---------------------------------------------------------------------------------------------

def test_object_info_has_comfyui_schemas(client):
    info = client.get("/object_info").json()
    assert info == client.get("/api/object_info").json()
    ks = info["KSampler"]
    assert ks["input"]["required"]["seed"] == ["INT", {"default": 0, "min": 0, "max": 2**64 - 1, "step": 1,
                                                        "control_after_generate": True}]
    assert ks["input_order"]["required"][:3] == ["model", "seed", "steps"]
    assert {"euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc", "lcm"} <= set(ks["input"]["required"]["sampler_name"][0])
    assert {"normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta"} == set(
        ks["input"]["required"]["scheduler"][0])
    assert (ks["category"], ks["output"], ks["output_name"], ks["output_node"]) == ("sampling", ["LATENT"], ["LATENT"], False)
    ckpt = info["CheckpointLoaderSimple"]
    assert ckpt["input"]["required"]["ckpt_name"][0] == ["tiny.safetensors"]
    assert (ckpt["display_name"], ckpt["output"]) == ("Load Checkpoint", ["MODEL", "CLIP", "VAE"])
    assert info["LoraLoader"]["input"]["required"]["lora_name"][0] == ["style.safetensors"]
    assert info["SaveImage"]["output_node"] and info["SaveImage"]["input"]["hidden"] == {
        "prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    assert info["EmptyLatentImage"]["input"]["required"]["width"] == ["INT", {"default": 512, "min": 16, "max": 16384, "step": 8}]
    assert all(isinstance(v["name"], str) for v in info.values())
    assert client.get("/object_info/KSampler").json() == {"KSampler": ks}
    assert client.get("/object_info/NoSuchNode").json() == {}


def test_validation_errors_have_comfyui_bodies(client):
    g = graph()
    g["10"] = {"class_type": "NoSuchNode", "inputs": {}, "_meta": {"title": "Mystery"}}
    r = client.post("/prompt", json={"prompt": g})
    assert r.status_code == 400
    assert r.json() == {"error": {"type": "missing_node_type", "message": "Node 'Mystery' not found. The custom node may not be installed.",
                                  "details": "Node ID '#10'", "extra_info": {"node_id": "10", "class_type": "NoSuchNode",
                                                                             "node_title": "Mystery"}}, "node_errors": {}}

    g = graph()
    del g["3"]["inputs"]["steps"]
    g["3"]["inputs"]["cfg"] = 1000
    body = client.post("/prompt", json={"prompt": g}).json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    errors = body["node_errors"]["3"]
    assert errors["class_type"] == "KSampler" and errors["dependent_outputs"] == ["9"]
    assert [(e["type"], e["details"]) for e in errors["errors"]] == [
        ("required_input_missing", "steps"), ("value_bigger_than_max", "cfg")]
    assert errors["errors"][1]["message"] == "Value 1000.0 bigger than max of 100.0"

    g = graph()
    g["8"]["inputs"]["vae"] = ["4", 1]  # a CLIP where a VAE goes
    body = client.post("/prompt", json={"prompt": g}).json()
    assert body["node_errors"]["8"]["errors"][0]["type"] == "return_type_mismatch"
    assert body["node_errors"]["8"]["errors"][0]["details"] == "vae, received_type(CLIP) mismatch input_type(VAE)"

    g = graph()
    g["4"]["inputs"]["ckpt_name"] = "nope.safetensors"
    body = client.post("/prompt", json={"prompt": g}).json()
    assert body["node_errors"]["4"]["errors"][0]["type"] == "value_not_in_list"
    assert body["node_errors"]["4"]["errors"][0]["details"] == "ckpt_name: 'nope.safetensors' not in ['tiny.safetensors']"

    g = graph()
    g["3"]["inputs"]["steps"] = "many"
    body = client.post("/prompt", json={"prompt": g}).json()
    assert body["node_errors"]["3"]["errors"][0]["type"] == "invalid_input_type"

    g = {k: v for k, v in graph().items() if k != "9"}
    r = client.post("/prompt", json={"prompt": g})
    assert (r.status_code, r.json()) == (400, {"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs",
                                                         "details": "", "extra_info": {}}, "node_errors": {}})
    r = client.post("/prompt", json={"client_id": "x"})
    assert (r.status_code, r.json()["error"]["type"]) == (400, "no_prompt")
    r = client.post("/prompt", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_prompt"
    assert client.get("/prompt").json() == {"exec_info": {"queue_remaining": 0}}  # still serving


def test_partly_valid_graph_runs_its_good_outputs(client):
    g = graph()
    g["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}}
    g["11"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 1]}}
    r = client.post("/prompt", content=json.dumps({"prompt": g}))  # no Content-Type at all
    assert r.status_code == 200
    body = r.json()
    assert list(body["node_errors"]) == ["11"] and body["node_errors"]["11"]["dependent_outputs"] == ["10"]
    entry = wait(client, body["prompt_id"])
    assert entry["status"]["status_str"] == "success" and list(entry["outputs"]) == ["9"]
    assert entry["prompt"][4] == ["9"]


def test_values_are_coerced_and_cached_by_value(client, setup):
    outputs = setup[1]
    g = graph(seed=101)
    g["3"]["inputs"]["steps"] = "3"  # coerced to 3, as ComfyUI does
    first = wait(client, queue(client, g, extra_data={"extra_pnginfo": {"workflow": {"nodes": [], "version": 0.4}}}))
    assert first["status"] == {"status_str": "success", "completed": True, "messages": first["status"]["messages"]}
    assert [m[0] for m in first["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    image = first["outputs"]["9"]["images"][0]
    assert image["subfolder"] == "" and image["type"] == "output"
    png = Image.open(outputs / "comfy" / "output" / image["filename"])
    assert json.loads(png.text["prompt"])["3"]["inputs"]["steps"] == 3
    assert json.loads(png.text["workflow"]) == {"nodes": [], "version": 0.4}
    assert first["prompt"][3]["extra_pnginfo"]["workflow"]["version"] == 0.4

    # The same graph again, node ids renumbered: everything comes from the cache.
    renamed = json.loads(json.dumps(graph(seed=101)).replace('"4"', '"40"'))
    again = wait(client, queue(client, renamed))
    assert sorted(messages(again)["execution_cached"]["nodes"]) == sorted(renamed)
    assert again["outputs"] == first["outputs"]
    # A new seed runs the sampler and what follows it only.
    third = wait(client, queue(client, graph(seed=102)))
    assert sorted(messages(third)["execution_cached"]["nodes"]) == ["4", "5", "6", "7"]
    number = lambda e: int(e["outputs"]["9"]["images"][0]["filename"].split("_")[1])  # noqa: E731
    assert number(third) == number(first) + 1
    assert np.abs(np.asarray(view(client, third["outputs"]["9"]["images"][0]), dtype=int)
                  - np.asarray(view(client, image), dtype=int)).max() > 0


def test_batch_noise_is_one_draw_of_the_batch(client):
    """Image k of a batch of 2 is slice k of one randn, so image 0 equals the batch-of-1 image
    (close: a batch computes a level apart here and there)."""
    single = wait(client, queue(client, graph(seed=77)))
    g = graph(seed=77)
    g["5"]["inputs"]["batch_size"] = 2
    pair = wait(client, queue(client, g))
    images = pair["outputs"]["9"]["images"]
    assert len(images) == 2
    a = np.asarray(view(client, single["outputs"]["9"]["images"][0]), dtype=int)
    b0, b1 = (np.asarray(view(client, i), dtype=int) for i in images)
    assert np.abs(a - b0).max() <= 2 and np.abs(b0 - b1).max() > 0


def test_lora_changes_only_the_graph_that_asks(client):
    txt2img = {"prompt": "a red cat", "negative_prompt": "bad hands", "seed": 5, "steps": 3, "width": 32,
               "height": 32, "sampler_name": "Euler", "cfg_scale": 7}
    before = client.post("/sdapi/v1/txt2img", json=txt2img).json()["images"][0]
    plain = wait(client, queue(client, graph(seed=9)))
    g = graph(seed=9)
    g["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "style.safetensors",
                                                      "strength_model": 10.0, "strength_clip": 10.0}}
    g["3"]["inputs"]["model"] = ["10", 0]
    g["6"]["inputs"]["clip"] = ["10", 1]
    with_lora = wait(client, queue(client, g))
    assert with_lora["status"]["status_str"] == "success"
    assert sorted(messages(with_lora)["execution_cached"]["nodes"]) == ["4", "5", "7"]
    a = np.asarray(view(client, plain["outputs"]["9"]["images"][0]), dtype=int)
    b = np.asarray(view(client, with_lora["outputs"]["9"]["images"][0]), dtype=int)
    assert (a != b).any()  # (the tiny VAE squashes most of the latents' difference)
    after = client.post("/sdapi/v1/txt2img", json=txt2img).json()["images"][0]
    assert after == before  # the loaded weights are as they were


def test_view_and_upload_refuse_traversal(client, setup):
    outputs = setup[1]
    assert client.get("/view", params={"filename": "../../etc/passwd"}).status_code == 400
    assert client.get("/view", params={"filename": "x.png", "subfolder": "../../.."}).status_code == 403
    assert client.get("/view", params={"filename": "x.png", "type": "secret"}).status_code == 400
    assert client.get("/view", params={"filename": "missing.png"}).status_code == 404

    buf = io.BytesIO()
    Image.new("RGBA", (64, 64), (200, 30, 30, 255)).save(buf, format="PNG")
    data = buf.getvalue()
    r = client.post("/upload/image", files={"image": ("../evil.png", data, "image/png")})
    assert r.status_code == 400
    r = client.post("/upload/image", files={"image": ("red.png", data, "image/png")},
                    data={"subfolder": "../../.."})
    assert r.status_code == 400
    assert not list(outputs.rglob("evil.png")) and not (outputs.parent / "red.png").exists()
    r = client.post("/api/upload/image", files={"image": ("red.png", data, "image/png")})
    assert r.json() == {"name": "red.png", "subfolder": "", "type": "input"}
    assert client.post("/upload/image", files={"image": ("red.png", data, "image/png")}).json()["name"] == "red.png"
    other = data[:-1] + b"\x00"
    assert client.post("/upload/image", files={"image": ("red.png", other, "image/png")}).json()["name"] == "red (1).png"
    big = client.post("/upload/image", files={"image": ("big.png", b"\x00" * (3 * 1024 * 1024), "image/png")})
    assert big.status_code == 413
    got = client.get("/view", params={"filename": "red.png", "type": "input"})
    assert got.status_code == 200 and got.content == data
    assert client.get("/object_info/LoadImage").json()["LoadImage"]["input"]["required"]["image"][0] == ["red (1).png", "red.png"]

    # img2img on the uploaded image: LoadImage -> VAEEncode -> KSampler(denoise 0.5)
    g = graph(seed=3, denoise=0.5)
    g["5"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}}
    g["11"] = {"class_type": "LoadImage", "inputs": {"image": "red.png [input]"}}
    entry = wait(client, queue(client, g))
    assert entry["status"]["status_str"] == "success", entry["status"]
    g["11"]["inputs"]["image"] = "nothere.png"
    body = client.post("/prompt", json={"prompt": g}).json()
    assert body["node_errors"]["11"]["errors"][0]["type"] == "custom_validation_failed"


def test_system_and_listings(client):
    stats = client.get("/system_stats").json()
    assert isinstance(stats["system"]["argv"], list) and stats["devices"][0]["type"] in ("cpu", "cuda")
    assert client.get("/api/embeddings").json() == []
    assert "checkpoints" in client.get("/models").json()
    assert client.get("/models/checkpoints").json() == ["tiny.safetensors"]
    assert client.get("/models/loras").json() == ["style.safetensors"]
    assert client.get("/models/nope").status_code == 404
    assert client.get("/features").json()["max_upload_size"] == 2 * 1024 * 1024
    jobs = client.get("/api/jobs").json()
    assert jobs["pagination"]["total"] == len(jobs["jobs"]) > 0
    assert all(isinstance(j["create_time"], int) and j["status"] in ("completed", "failed") for j in jobs["jobs"])


def test_queue_is_shared_with_the_web_ui(client):
    """A long /sdapi/v1 job holds the worker: a prompt waits behind it in GET /queue, can be
    deleted there, and the interrupt of the web UI stops the job."""
    import threading

    result = {}
    long_job = threading.Thread(target=lambda: result.update(r=client.post(
        "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1000, "width": 32, "height": 32, "sampler_name": "Euler"})))
    long_job.start()
    deadline = time.monotonic() + 30
    while client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    waiting = queue(client, graph(seed=55))
    kept = queue(client, graph(seed=56))
    q = client.get("/queue").json()
    assert [item[1] for item in q["queue_pending"]] == [waiting, kept] and q["queue_running"] == []
    assert len(q["queue_pending"][0]) == 5 and q["queue_pending"][0][4] == ["9"]
    assert client.get("/prompt").json() == {"exec_info": {"queue_remaining": 2}}
    client.post("/queue", content=json.dumps({"delete": [waiting]}))
    assert [item[1] for item in client.get("/queue").json()["queue_pending"]] == [kept]
    client.post("/sdapi/v1/interrupt")
    long_job.join(30)
    assert result["r"].status_code == 200
    assert wait(client, kept)["status"]["status_str"] == "success"
    assert client.get(f"/history/{waiting}").json() == {}
    client.post("/history", content=json.dumps({"delete": [kept]}))
    assert client.get(f"/history/{kept}").json() == {}


def test_more_nodes_run(client):
    """Two-pass sampling (KSamplerAdvanced, latent upscale), combined / zeroed conditioning,
    CLIP skip, batch nodes, image nodes and the inpainting encoders in one graph."""
    buf = io.BytesIO()
    rgba = Image.new("RGBA", (48, 40), (20, 200, 30, 255))
    rgba.putalpha(Image.new("L", (48, 40), 0).point(lambda v: 255).crop((0, 0, 48, 40)))
    rgba.save(buf, format="PNG")
    client.post("/upload/image", files={"image": ("green.png", buf.getvalue(), "image/png")})
    adv = {"model": ["4", 0], "add_noise": "enable", "noise_seed": 8, "steps": 4, "cfg": 5.0, "sampler_name": "dpmpp_2m",
           "scheduler": "karras", "positive": ["20", 0], "negative": ["21", 0], "latent_image": ["5", 0],
           "start_at_step": 0, "end_at_step": 2, "return_with_leftover_noise": "enable"}
    g = graph()
    g.update({
        "12": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["4", 1], "stop_at_clip_layer": -2}},
        "13": {"class_type": "CLIPTextEncode", "inputs": {"text": "(a dog:1.2)", "clip": ["12", 0]}},
        "20": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["13", 0]}},
        "21": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["7", 0]}},
        "22": {"class_type": "KSamplerAdvanced", "inputs": adv},
        "23": {"class_type": "KSamplerAdvanced", "inputs": {**adv, "latent_image": ["24", 0], "add_noise": "disable",
                                                            "start_at_step": 2, "end_at_step": 10000,
                                                            "return_with_leftover_noise": "disable"}},
        "24": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["22", 0], "upscale_method": "bislerp", "scale_by": 1.5}},
        "25": {"class_type": "VAEDecode", "inputs": {"samples": ["23", 0], "vae": ["4", 2]}},
        "26": {"class_type": "ImageInvert", "inputs": {"image": ["25", 0]}},
        "27": {"class_type": "PreviewImage", "inputs": {"images": ["26", 0]}},
        "30": {"class_type": "LoadImage", "inputs": {"image": "green.png"}},
        "31": {"class_type": "ImagePadForOutpaint", "inputs": {"image": ["30", 0], "left": 8, "top": 0, "right": 8,
                                                               "bottom": 8, "feathering": 10}},
        "32": {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["31", 0], "vae": ["4", 2], "mask": ["31", 1],
                                                               "grow_mask_by": 2}},
        "33": {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["32", 0], "amount": 2}},
        "34": {"class_type": "LatentFromBatch", "inputs": {"samples": ["33", 0], "batch_index": 1, "length": 1}},
        "35": {"class_type": "KSampler", "inputs": {**g["3"]["inputs"], "latent_image": ["34", 0], "sampler_name": "euler_ancestral"}},
        "36": {"class_type": "VAEDecode", "inputs": {"samples": ["35", 0], "vae": ["4", 2]}},
        "37": {"class_type": "ImageScaleToTotalPixels", "inputs": {"image": ["36", 0], "upscale_method": "lanczos",
                                                                   "megapixels": 0.01}},
        "38": {"class_type": "SaveImage", "inputs": {"images": ["37", 0], "filename_prefix": "sub/inpaint_%width%"}},
        "40": {"class_type": "InpaintModelConditioning", "inputs": {"positive": ["6", 0], "negative": ["7", 0], "vae": ["4", 2],
                                                                    "pixels": ["30", 0], "mask": ["41", 0], "noise_mask": True}},
        "41": {"class_type": "LoadImageMask", "inputs": {"image": "green.png", "channel": "alpha"}},
        "42": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["40", 2], "mask": ["41", 0]}},
        "43": {"class_type": "KSampler", "inputs": {**g["3"]["inputs"], "positive": ["40", 0], "negative": ["40", 1],
                                                    "latent_image": ["42", 0], "denoise": 0.6, "sampler_name": "uni_pc"}},
        "44": {"class_type": "VAEDecode", "inputs": {"samples": ["43", 0], "vae": ["4", 2]}},
        "45": {"class_type": "ImageScale", "inputs": {"image": ["44", 0], "upscale_method": "area", "width": 24,
                                                      "height": 0, "crop": "center"}},
        "46": {"class_type": "PreviewImage", "inputs": {"images": ["45", 0]}},
    })
    r = client.post("/prompt", json={"prompt": g})
    assert r.json()["node_errors"] == {}
    entry = wait(client, r.json()["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"][-1]
    assert set(entry["outputs"]) == {"9", "27", "38", "46"}
    preview = entry["outputs"]["27"]["images"][0]
    assert preview["type"] == "temp" and preview["filename"].startswith("ComfyUI_temp_")
    assert view(client, preview).size == (48, 48)  # 64 px -> latent 8 -> x1.5 = 12 -> tiny VAE x4
    saved = entry["outputs"]["38"]["images"][0]
    assert saved["subfolder"] == "sub" and saved["filename"].startswith("inpaint_")
    assert view(client, entry["outputs"]["46"]["images"][0]).size[0] == 24


def test_comfyui_models_folder_names(tmp_path):
    from sdlab.models_dir import ModelsDir

    for name in ("checkpoints", "loras", "embeddings", "vae"):
        (tmp_path / name).mkdir()
    save_native(tiny_bundle("sd1", seed=0), tmp_path / "checkpoints" / "a.safetensors")
    models = ModelsDir(tmp_path)
    assert [m.name for m in models.list_checkpoints()] == ["a"]
    assert models.folder("lora") == tmp_path / "loras" and models.folder("vae") == tmp_path / "vae"
    (tmp_path / "Stable-diffusion").mkdir()  # the web UI's name wins where both exist
    assert models.folder("checkpoint") == tmp_path / "Stable-diffusion"
