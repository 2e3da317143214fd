"""A real `sdlab serve` process on loopback: many clients at once, and clients that hang up."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from tests.tiny import save_native, tiny_bundle  # noqa: E402

from .live import free_port  # noqa: E402

CLIENTS, REQUESTS_PER_CLIENT = 8, 3
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "Stable-diffusion").mkdir()
    save_native(tiny_bundle("sd1"), root / "Stable-diffusion" / "tiny.safetensors")
    port = free_port()
    log = open(root / "server.log", "w+")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdlab", "serve", "--models-dir", str(root), "--port", str(port),
         "--model", "tiny.safetensors", "--max-steps", "5000", "--outputs-dir", str(tmp_path_factory.mktemp("outputs")),
         # One torch thread: on a busy 2-core machine, two threads of a tiny model spend most of
         # their time waiting for each other.
         "--threads", "1"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"sdlab serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(f"{base}/sdapi/v1/sd-models", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("sdlab serve did not answer within 60 s")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def body(client: int, n: int) -> dict:
    return {"prompt": f"shape {client}", "seed": 1000 + client * 10 + n, "width": 32, "height": 32, "steps": 3,
            "sampler_name": "Euler a" if n % 2 else "DPM++ 2M"}


def pixels(response: httpx.Response) -> tuple[bytes, list[int]]:
    assert response.status_code == 200, response.text
    data = response.json()
    img = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
    return np.asarray(img.convert("RGB")).tobytes(), json.loads(data["info"])["all_seeds"]


def test_server_binds_to_loopback_by_default(server):
    assert server.startswith("http://127.0.0.1:")
    r = httpx.get(f"{server}/sdapi/v1/progress")
    assert r.status_code == 200 and "x-process-time" in r.headers


def test_8_clients_x_3_requests_all_answered_each_equal_to_the_request_alone(server):
    jobs = [(c, n) for c in range(CLIENTS) for n in range(REQUESTS_PER_CLIENT)]
    t_alone = time.perf_counter()
    with httpx.Client(base_url=server, timeout=300) as http:
        alone = {job: pixels(http.post("/sdapi/v1/txt2img", json=body(*job))) for job in jobs}
    t_alone = time.perf_counter() - t_alone

    results: dict[tuple[int, int], tuple[bytes, list[int]]] = {}
    errors: list[str] = []
    start = threading.Barrier(CLIENTS)

    def client(c: int) -> None:
        with httpx.Client(base_url=server, timeout=300) as http:
            start.wait()
            for n in range(REQUESTS_PER_CLIENT):
                try:
                    results[(c, n)] = pixels(http.post("/sdapi/v1/txt2img", json=body(c, n)))
                except Exception as e:  # collected, so one failure does not hide the others
                    errors.append(f"client {c} request {n}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    elapsed = time.perf_counter() - t0
    assert not errors, errors
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT == 24
    for job in jobs:
        assert results[job][1] == [body(*job)["seed"]], job
        assert results[job][0] == alone[job][0], f"request {job} differs from the same request run alone"
    print(f"\n24 txt2img requests from 8 clients at once: {elapsed:.2f} s "
          f"(the same 24 one after another: {t_alone:.2f} s)")


def test_a_client_that_hangs_up_does_not_leave_the_worker_busy(server):
    long = {"prompt": "long", "seed": 1, "width": 32, "height": 32, "steps": 5000}
    outcome: list[BaseException] = []

    def impatient_client() -> None:
        with httpx.Client(base_url=server, timeout=httpx.Timeout(60, read=1.5)) as http:
            try:
                http.post("/sdapi/v1/txt2img", json=long)
            except httpx.ReadTimeout as e:  # gives up and closes the connection
                outcome.append(e)

    thread = threading.Thread(target=impatient_client)
    thread.start()
    deadline = time.monotonic() + 30
    while True:  # the long job is under way...
        state = httpx.get(f"{server}/sdapi/v1/progress").json()["state"]
        if state["job"] == "txt2img" and state["sampling_step"] >= 1:
            break
        assert time.monotonic() < deadline, "the long job never started"
        time.sleep(0.02)
    thread.join(30)
    assert outcome, "the client was meant to time out"
    hung_up = time.monotonic()
    while time.monotonic() - hung_up < 10:  # ...and stops soon after its client hangs up (it would run far longer)
        state = httpx.get(f"{server}/sdapi/v1/progress").json()["state"]
        if not state["job"]:
            break
        time.sleep(0.05)
    assert not state["job"], f"the worker is still running the abandoned job: {state}"
    r = httpx.post(f"{server}/sdapi/v1/txt2img", json=body(0, 0), timeout=60)
    assert r.status_code == 200 and json.loads(r.json()["info"])["steps_done"] == 3


def test_a_client_that_hangs_up_still_gets_the_images_it_asked_to_save(server):
    """With save_images the images have somewhere to go besides the client: the job runs on after
    its client hangs up, and writes them to the outputs folder (found through cmd-flags)."""
    outputs = Path(httpx.get(f"{server}/sdapi/v1/cmd-flags").json()["outputs_dir"])
    kept = {"prompt": "kept", "seed": 77, "width": 32, "height": 32, "steps": 400, "save_images": True}
    with httpx.Client(base_url=server, timeout=httpx.Timeout(60, read=1.0)) as http:
        with pytest.raises(httpx.ReadTimeout):  # gives up and closes the connection
            http.post("/sdapi/v1/txt2img", json=kept)
    assert httpx.get(f"{server}/sdapi/v1/progress").json()["state"]["job"] == "txt2img"  # still running
    deadline = time.monotonic() + 120
    while httpx.get(f"{server}/sdapi/v1/progress").json()["state"]["job"]:
        assert time.monotonic() < deadline, "the job never finished"
        time.sleep(0.1)
    saved = list(outputs.glob("txt2img-images/*/*-77.png"))
    assert len(saved) == 1 and "Steps: 400" in Image.open(saved[0]).info["parameters"]
