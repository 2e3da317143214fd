"""`sdlab generate --from`: a PNG made again from its infotext, byte for byte on the same
machine, including what the web UIs' keys do not record (sdlab's own `sdlab ...` keys)."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.checkpoints.loader import load_bundle
from sdlab.cli import build_parser
from sdlab.device import default_dtype, dtype_name
from sdlab.errors import SdlabError
from sdlab.generate_cli import Replay, _warn_if_emulated, replay_settings, request_fields_from_infotext
from sdlab.infotext import parse_infotext
from sdlab.pipeline import GenerationRequest, Pipeline

from .tiny import save_native, tiny_bundle

PROMPT = "a red circle on a blue background"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sdlab", *args], capture_output=True, text=True, timeout=300)


def _generate(*args) -> None:
    """The CLI's own code path in this process (no interpreter start-up per image)."""
    parsed = build_parser().parse_args(["generate", *args])
    parsed.func(parsed)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_from_replays_a_non_default_dtype_byte_for_byte(tmp_path):
    """The issue's case: an image made in a dtype other than the machine's default (fp32 on an
    AMX / AVX512-BF16 CPU, bf16 on an AVX2 one) replays in it, in a fresh process, to the same
    PNG; `--dtype` still overrides, and then the pixels do differ (so the key is what made the
    replay exact)."""
    machine = default_dtype(torch.device("cpu"))
    made_in = "bf16" if machine == torch.float32 else "fp32"
    original, replay, overridden = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    r = _cli("generate", PROMPT, "--device", "cpu", "--dtype", made_in, "-W", "32", "-H", "32", "--steps", "3",
             "--seed", "3", "-o", str(original))
    assert r.returncode == 0, r.stderr
    info = parse_infotext(Image.open(original).info["parameters"])
    assert info["sdlab dtype"] == made_in and "sdlab weights" not in info

    r = _cli("generate", "--from", str(original), "--device", "cpu", "-o", str(replay))
    assert r.returncode == 0, r.stderr
    assert replay.read_bytes() == original.read_bytes()

    r = _cli("generate", "--from", str(original), "--device", "cpu", "--dtype", dtype_name(machine),
             "-o", str(overridden))
    assert r.returncode == 0, r.stderr
    assert parse_infotext(Image.open(overridden).info["parameters"])["sdlab dtype"] == dtype_name(machine)
    assert np.abs(_pixels(overridden) - _pixels(original)).max() > 0


def test_from_replays_narrow_weights_and_a_batch_image(tmp_path):
    """fp32 compute with bf16-stored weights (no machine's default), the second image of a batch
    of 2: the replay runs that batch again and keeps that image, byte for byte; the keys say so.
    Without the weights' rounding the pixels differ."""
    out = tmp_path / "batch"
    _generate(PROMPT, "--device", "cpu", "--dtype", "fp32", "--weight-dtype", "bf16", "--batch", "2",
              "-W", "32", "-H", "32", "--steps", "3", "--seed", "20", "--sampler", "DPM++ 2M", "-o", str(out))
    second = out / "00001-21.png"
    text = Image.open(second).info["parameters"]
    assert replay_settings(text) == Replay(dtype=torch.float32, weight_dtype=torch.bfloat16, batch_size=2,
                                           batch_pos=1)
    assert "sdlab batch pos: 1" in text and "Seed: 21" in text

    _generate("--from", str(second), "--device", "cpu", "-o", str(tmp_path / "replay.png"))
    assert (tmp_path / "replay.png").read_bytes() == second.read_bytes()

    # A flag overrides the PNG: weights kept in fp32 give other pixels, and one image, seed 21.
    _generate("--from", str(second), "--device", "cpu", "--weight-dtype", "fp32", "-o", str(tmp_path / "wide"))
    [wide] = (tmp_path / "wide").glob("*.png")
    assert wide.name.endswith("-21.png")
    assert replay_settings(Image.open(wide).info["parameters"]).weight_dtype is None
    assert np.abs(_pixels(wide) - _pixels(second)).max() > 0


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    return save_native(tiny_bundle("sd1"), path)


def test_replay_keys_round_trip(tiny_file):
    """Each of sdlab's own keys is written when it changes the pixels, and reads back into what
    made them: precision, forced prediction type, eta, batch position, zero-terminal-SNR off."""
    bundle = load_bundle(tiny_file, device="cpu", dtype=torch.float32, weight_dtype=torch.float16, prediction="v")
    pipe = Pipeline(bundle)
    res = pipe.generate(GenerationRequest(PROMPT, steps=2, seed=8, width=32, height=32, batch_size=2,
                                          sampler="Euler a", eta=0.5))
    text = res.infotexts[1]
    assert replay_settings(text) == Replay(dtype=torch.float32, weight_dtype=torch.float16, prediction="v",
                                           batch_size=2, batch_pos=1)
    fields = request_fields_from_infotext(text)
    assert fields["eta"] == 0.5 and fields["seed"] == 9

    # Nothing forced, one image, default eta: only the dtype, which every image records.
    plain = Pipeline(load_bundle(tiny_file, device="cpu", dtype=torch.float32))
    text = plain.generate(GenerationRequest(PROMPT, steps=1, seed=8, width=32, height=32)).infotexts[0]
    assert [k for k in parse_infotext(text) if k.startswith("sdlab")] == ["sdlab dtype"]
    assert "Eta" not in text and replay_settings(text) == Replay(dtype=torch.float32)

    # A model marked for zero terminal SNR, turned off: the web UI's key cannot say "off".
    plain.bundle.config = replace(plain.bundle.config,
                                  family=replace(plain.bundle.family, zero_terminal_snr=True))
    req = GenerationRequest(PROMPT, steps=1, seed=8, width=32, height=32, zero_terminal_snr=False)
    text = plain.infotext(req, "Euler", "automatic", 8, 8)
    assert "sdlab zero terminal SNR: off" in text and "Noise Schedule" not in text
    assert request_fields_from_infotext(text)["zero_terminal_snr"] is False

    # The VAE's dtype only where it is not the one the compute dtype gives: on a GPU, after an
    # fp16 VAE overflowed and went on in bf16 (pretended here on the CPU).
    plain.bundle.vae.to(torch.bfloat16)
    text = plain.infotext(GenerationRequest(PROMPT, width=32, height=32), "Euler", "automatic", 8, 8)
    assert replay_settings(text).vae_dtype == torch.bfloat16


def test_sdxl_conditioning_round_trips():
    """SDXL's size, crop and aesthetic conditioning, which the web UIs never change, are recorded
    when a request changes them, in the CLI's own notation, and read back as the request had them."""
    pipe = Pipeline(tiny_bundle("sdxl"))
    req = GenerationRequest(PROMPT, width=64, height=32, original_size=(512, 768), target_size=(32, 64),
                            crop_top_left=(16, 8), aesthetic_score=7.5)
    text = pipe.infotext(req, "Euler", "automatic", 1, 1)
    assert "sdlab original size: 768x512" in text and "sdlab crop: 8x16" in text
    assert "sdlab target size" not in text  # the image's own size: the default
    fields = request_fields_from_infotext(text)
    assert fields["original_size"] == (512, 768) and fields["crop_top_left"] == (16, 8)
    assert fields["aesthetic_score"] == 7.5 and "target_size" not in fields


@pytest.mark.parametrize("cpu_defaults", ["avx2", "amx"], indirect=True)
def test_replay_in_an_emulated_dtype_says_how_to_run_faster(cpu_defaults, caplog):
    """A bf16 PNG replayed on a CPU without bf16 hardware runs in bf16 (its pixels need it), and
    the user is told why and how to run fast instead; where bf16 is native nothing is said."""
    args = build_parser().parse_args(["generate", "--from", "made-on-amx.png", "--device", "cpu"])
    with caplog.at_level(logging.WARNING, logger="sdlab.generate_cli"):
        _warn_if_emulated(args, torch.bfloat16)
    emulated = cpu_defaults.dtype == torch.float32  # the AVX2 kind
    assert ("made-on-amx.png was made in bf16" in caplog.text and "--dtype fp32" in caplog.text) == emulated
    assert bool(caplog.records) == emulated


@pytest.mark.parametrize("key, value", [("sdlab dtype", "fp64"), ("sdlab weights", "int4"),
                                        ("sdlab prediction", "flow"), ("sdlab batch pos", "2")])
def test_bad_replay_key_is_one_line(key, value):
    text = f"{PROMPT}\nSteps: 4, Seed: 1, Size: 64x64, sdlab batch size: 2, {key}: {value}"
    with pytest.raises(SdlabError) as e:
        replay_settings(text)
    assert "\n" not in str(e.value) and "sdlab" in str(e.value)
