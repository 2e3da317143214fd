"""Checkpoint loading: single files, diffusers folders both ways, EMA, detection, and
bad input. Parity is against diffusers/transformers loading the same weights."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdlab.checkpoints.diffusers_folder import write_diffusers_folder
from sdlab.checkpoints.loader import EMA_PREFIX, load_bundle, save_checkpoint
from sdlab.cli import main as cli_main
from sdlab.errors import SdlabError
from sdlab.families import UNET_PREFIX, VAE_PREFIX, detect_family, model_config

from ..tiny import save_native, tiny_bundle

FAMILIES = ["sd1", "sd1-inpaint", "sd2", "sd2-v", "sd2-inpaint"]


def _inputs(bundle, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = bundle.config.unet
    x = torch.randn(2, u.in_channels, 16, 16, generator=g)
    t = torch.tensor([10.0, 700.0])
    ctx = torch.randn(2, 77, u.context_dim, generator=g)
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    tokens = bundle.tokenizers[0](["a red circle, on a blue background", ""])
    return x, t, ctx, img, tokens


def _outputs(bundle, seed=0):
    x, t, ctx, img, tokens = _inputs(bundle, seed)
    with torch.no_grad():
        te = bundle.text_encoders[0](tokens, skip=bundle.family.clip_skip)
        return {"unet": bundle.unet(x, t, ctx), "vae_mean": bundle.vae.encode(img).mean,
                "vae_dec": bundle.vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))),
                "text": te.hidden}


def _assert_close(a: dict, b: dict, atol=1e-4):
    for k in a:
        diff = (a[k].float() - b[k].float()).abs().max().item()
        assert diff < atol, f"{k}: max abs diff {diff}"


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip_and_detection(tmp_path, family):
    ref = tiny_bundle(family, seed=1)
    path = save_native(ref, tmp_path / "model.safetensors")
    loaded = load_bundle(path, device="cpu", prediction="v" if family == "sd2-v" else None)
    assert loaded.family.name == family
    assert loaded.config.unet == ref.config.unet
    assert loaded.config.vae == ref.config.vae
    assert loaded.config.text_encoders == ref.config.text_encoders
    _assert_close(_outputs(ref), _outputs(loaded), atol=1e-6)


def test_sdlab_metadata_is_exact(tmp_path):
    ref = tiny_bundle("sd2-v")
    save_checkpoint(ref, tmp_path / "m.safetensors")
    loaded = load_bundle(tmp_path / "m.safetensors", device="cpu")
    assert loaded.family.name == "sd2-v" and loaded.prediction == "v"


def test_fp16_file_casts_once(tmp_path):
    ref = tiny_bundle("sd1")
    path = save_native(ref, tmp_path / "half.safetensors", dtype=torch.float16)
    loaded = load_bundle(path, device="cpu", dtype=torch.float32)
    assert loaded.dtype == torch.float32
    assert next(loaded.vae.parameters()).dtype == torch.float32
    bf = load_bundle(path, device="cpu", dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16


def test_cast_load_is_the_file_cast_once(tmp_path):
    """fp32 file, bf16 model on the CPU: each weight is the file's cast once (read through a
    mapping of its own, see io._read_safetensors), and the VAE loads in fp32, as it runs there,
    instead of being rounded through bf16."""
    ref = tiny_bundle("sd1")
    path = save_native(ref, tmp_path / "m.safetensors")
    got = load_bundle(path, device="cpu", dtype=torch.bfloat16).state_dict()
    for k, v in ref.state_dict().items():
        want = v if k.startswith(VAE_PREFIX) or not v.is_floating_point() else v.to(torch.bfloat16)
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k


def test_ema_weights_preferred(tmp_path):
    ref = tiny_bundle("sd1")
    sd = ref.state_dict()
    ema = tiny_bundle("sd1", seed=7).state_dict()
    for k, v in ema.items():
        if k.startswith(UNET_PREFIX):
            sd[EMA_PREFIX + k[len("model."):].replace(".", "")] = v
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    torch.save({"state_dict": sd, "global_step": 1000}, tmp_path / "full.ckpt")
    with_ema = load_bundle(tmp_path / "full.ckpt", device="cpu")
    assert with_ema.has_ema and with_ema.used_ema
    key = "input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(with_ema.unet.state_dict()[key], ema[UNET_PREFIX + key])
    raw = load_bundle(tmp_path / "full.ckpt", device="cpu", use_ema=False)
    assert torch.equal(raw.unet.state_dict()[key], sd[UNET_PREFIX + key])


def test_damaged_position_ids_are_ignored(tmp_path):
    ref = tiny_bundle("sd1")
    sd = ref.state_dict()
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.rand(1, 77) * 76  # floats, damaged
    from sdlab.checkpoints.io import save_safetensors

    save_safetensors(sd, tmp_path / "m.safetensors")
    loaded = load_bundle(tmp_path / "m.safetensors", device="cpu")
    _assert_close(_outputs(ref), _outputs(loaded), atol=1e-6)


# ---------------------------------------------------------------- diffusers


def _diffusers_pipeline(folder: Path):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    index = json.loads((folder / "model_index.json").read_text())
    cls = StableDiffusionInpaintPipeline if "Inpaint" in index["_class_name"] else StableDiffusionPipeline
    return cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def _diffusers_outputs(pipe, bundle, seed=0):
    x, t, ctx, img, tokens = _inputs(bundle, seed)
    # Our tokenizer pads SD2 with 0 ("!"); give diffusers the same ids.
    with torch.no_grad():
        te = pipe.text_encoder(tokens)[0]  # last hidden state (diffusers' SD2 folder ends at the penultimate layer)
        return {"unet": pipe.unet(x, t, ctx).sample, "vae_mean": pipe.vae.encode(img).latent_dist.mean,
                "vae_dec": pipe.vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))).sample,
                "text": te}


@pytest.mark.parametrize("family", FAMILIES)
def test_written_diffusers_folder_matches_diffusers(tmp_path, family):
    """`sdlab convert --to diffusers` output, loaded by diffusers, computes what we compute."""
    ref = tiny_bundle(family, seed=2)
    out = tmp_path / "folder"
    write_diffusers_folder(ref.state_dict(), ref.config, out)
    pipe = _diffusers_pipeline(out)
    _assert_close(_outputs(ref), _diffusers_outputs(pipe, ref))
    # ... and reading the folder back gives the same networks.
    back = load_bundle(out, device="cpu")
    assert back.family.name == family
    _assert_close(_outputs(ref), _outputs(back), atol=1e-6)


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_folder_saved_by_diffusers_loads(tmp_path, family):
    """A folder written by diffusers' own save_pretrained loads in sdlab with equal outputs."""
    ref = tiny_bundle(family, seed=3)
    write_diffusers_folder(ref.state_dict(), ref.config, tmp_path / "ours")
    pipe = _diffusers_pipeline(tmp_path / "ours")
    pipe.save_pretrained(tmp_path / "theirs")
    loaded = load_bundle(tmp_path / "theirs", device="cpu")
    assert loaded.family.name == family
    _assert_close(_diffusers_outputs(pipe, ref), _outputs(loaded))


def test_folder_cast_load_is_the_folder_cast_once(tmp_path):
    """A folder loaded in bf16 holds exactly its fp32 weights cast once, though each native tensor
    is made (renamed, q/k/v fused, projection transposed, SD 2.x's identity layer added) only as
    the loader reads it, cast as it is read; the same from a text encoder in two shards."""
    from safetensors.torch import load_file, save_file

    ref = tiny_bundle("sd2", seed=5)
    write_diffusers_folder(ref.state_dict(), ref.config, tmp_path / "folder")
    want = load_bundle(tmp_path / "folder", device="cpu").state_dict()
    te = tmp_path / "folder" / "text_encoder"
    weights = load_file(te / "model.safetensors")
    keys = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({k: weights[k] for k in part}, te / name)
    (te / "model.safetensors").unlink()
    (te / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: name for name, part in shards.items() for k in part}}))
    got = load_bundle(tmp_path / "folder", device="cpu", dtype=torch.bfloat16).state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        v = v if k.startswith(VAE_PREFIX) or not v.is_floating_point() else v.to(torch.bfloat16)
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_convert_cli_round_trip(tmp_path):
    ref = tiny_bundle("sd2", seed=4)
    src = save_native(ref, tmp_path / "a.safetensors")
    assert cli_main(["convert", str(src), str(tmp_path / "folder"), "--prediction", "eps"]) == 0
    assert cli_main(["convert", str(tmp_path / "folder"), str(tmp_path / "b.safetensors")]) == 0
    back = load_bundle(tmp_path / "b.safetensors", device="cpu")
    _assert_close(_outputs(ref), _outputs(back), atol=1e-6)
    assert cli_main(["convert", str(tmp_path / "b.safetensors"), str(tmp_path / "c.ckpt")]) == 0
    ckpt = load_bundle(tmp_path / "c.ckpt", device="cpu")
    assert ckpt.config == back.config
    _assert_close(_outputs(ref), _outputs(ckpt), atol=1e-6)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_v_pred_and_ztsnr_markers(tmp_path, family, capsys):
    """The marker keys ComfyUI and the web UIs read (NoobAI-XL v-pred carries both): `v_pred` makes a
    model v-prediction, `ztsnr` samples it on the zero-terminal-SNR schedule. sdlab writes them
    back, and a diffusers folder carries the latter as the scheduler's `rescale_betas_zero_snr`."""
    from safetensors import safe_open

    from sdlab.checkpoints.io import save_safetensors

    ref = tiny_bundle(family, seed=1)
    marked = tmp_path / "marked.safetensors"
    save_safetensors({**ref.state_dict(), "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, marked)
    loaded = load_bundle(marked, device="cpu")
    assert loaded.prediction == "v" and loaded.family.zero_terminal_snr
    assert loaded.family.name == {"sd1": "sd1", "sd2": "sd2-v"}[family]
    _assert_close(_outputs(ref), _outputs(loaded), atol=1e-6)
    plain = load_bundle(save_native(ref, tmp_path / "plain.safetensors"), device="cpu")
    assert plain.prediction == "eps" and not plain.family.zero_terminal_snr

    save_checkpoint(loaded, tmp_path / "ours.safetensors")
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert {"v_pred", "ztsnr"} <= set(f.keys())
    again = load_bundle(tmp_path / "ours.safetensors", device="cpu")
    assert again.prediction == "v" and again.family.zero_terminal_snr
    assert cli_main(["info", str(marked)]) == 0
    assert "v, zero terminal SNR" in capsys.readouterr().out

    write_diffusers_folder(loaded.state_dict(), loaded.config, tmp_path / "folder")
    sched = json.loads((tmp_path / "folder" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["rescale_betas_zero_snr"] is True and sched["prediction_type"] == "v_prediction"
    folder = load_bundle(tmp_path / "folder", device="cpu")
    assert folder.prediction == "v" and folder.family.zero_terminal_snr


# ---------------------------------------------------------------- detection


def test_detection_markers():
    shapes = {k: tuple(v.shape) for k, v in tiny_bundle("sd1").state_dict().items()}
    assert detect_family(shapes).name == "sd1"
    with pytest.raises(SdlabError, match="LoRA"):
        detect_family({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)})
    with pytest.raises(SdlabError, match="diffusers"):
        detect_family({"conv_in.weight": (32, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (32, 32, 3, 3)})
    with pytest.raises(SdlabError, match="not a Stable Diffusion"):
        detect_family({"foo.weight": (3, 3)})


def test_families_are_distinguishable():
    """Every family entry is told apart by detection (prediction settled by its own rule)."""
    seen = {}
    for fam in ("sd1", "sd1-inpaint", "sd2", "sd2-inpaint"):
        shapes = {k: tuple(v.shape) for k, v in tiny_bundle(fam).state_dict().items()}
        seen[fam] = model_config(shapes).family.name
    assert seen == {f: f for f in seen}


# ---------------------------------------------------------------- bad input


class _WritesAFile:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdlab", *args], capture_output=True, text=True, timeout=120)


def test_bad_files_give_one_line_errors(tmp_path, capsys):
    good = save_native(tiny_bundle("sd1"), tmp_path / "good.safetensors")
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.ckpt").write_text("this is not a checkpoint\n")
    target = tmp_path / "pwned.txt"
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": _WritesAFile(str(target))}, f)
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "unknown.pt")

    cases = {"truncated.safetensors": "truncated", "notes.ckpt": "not a readable", "evil.ckpt": "run code",
             "unknown.pt": "not a Stable Diffusion", "missing.safetensors": "no such file"}
    for i, (name, words) in enumerate(cases.items()):
        # The first through `python -m sdlab` (the entry point's own handling); the others through
        # the same main() in this process, seconds faster each.
        if i == 0:
            r = _cli("info", str(tmp_path / name))
            code, err = r.returncode, r.stderr
        else:
            code, err = cli_main(["info", str(tmp_path / name)]), capsys.readouterr().err
        assert code != 0, name
        assert "Traceback" not in err, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and words in lines[0], (name, err)
    assert not target.exists(), "unpickling ran code"


def test_torch_zip_pickle_with_code_is_refused(tmp_path):
    target = tmp_path / "pwned2.txt"
    torch.save({"state_dict": _WritesAFile(str(target))}, tmp_path / "evil2.ckpt")
    with pytest.raises(SdlabError, match="run code"):
        load_bundle(tmp_path / "evil2.ckpt", device="cpu")
    assert not target.exists()


def test_info_cli(tmp_path, capsys):
    path = save_native(tiny_bundle("sd2-inpaint"), tmp_path / "inp.safetensors")
    assert cli_main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sd2-inpaint" in out and "EMA weights" in out and "model hash" in out
