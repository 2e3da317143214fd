"""The checkpoint merger: the web UI's arithmetic on every key of tiny random checkpoints, its key
rules (only "model" keys present in A and B, position_ids skipped, B-only keys dropped), inpainting
models, fp16, a baked-in VAE, discarded weights, metadata; the result loads in sdlab; `sdlab merge`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdlab.checkpoints.loader import file_sha256, load_bundle
from sdlab.cli import main
from sdlab.errors import SdlabError
from sdlab.merge import MergeInput, MergeOptions, legacy_hash, merge_checkpoints
from tests.tiny import tiny_bundle

POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def write(path: Path, sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
          metadata: dict[str, str] | None = None, drop: str | None = None) -> Path:
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items() if k != drop}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=metadata)
    return path


def variant(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Another model of the same shapes: `base` moved by seeded noise, as a fine-tune would. Plus
    the buffers released files carry that sdlab's own state dict has not: position_ids (which
    differ per file here, and must not be merged) and an fp32 schedule buffer without "model"."""
    gen = torch.Generator().manual_seed(seed)
    sd = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    sd[POSITION_IDS] = torch.arange(77)[None] + seed
    sd["alphas_cumprod"] = torch.linspace(1, 0, 10) + seed
    return sd


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    base = tiny_bundle("sd1").state_dict()
    a, b, c = variant(base, 0), variant(base, 1), variant(base, 2)
    inpaint = dict(variant(base, 3))  # an inpainting UNet takes 9 input channels: latent, mask, masked latent
    inpaint[CONV_IN] = torch.cat([inpaint[CONV_IN], 0.05 * torch.randn(32, 5, 3, 3)], dim=1)
    return {
        "a": write(d / "a.safetensors", a, metadata={"author": "a", "sd_merge_models": json.dumps(
            {"f00d": {"name": "older.safetensors", "legacy_hash": "12345678", "sd_merge_recipe": None}})}),
        "b": write(d / "b.safetensors", b, metadata={"author": "b"}),
        "c": write(d / "c.safetensors", c, drop="first_stage_model.decoder.conv_out.bias"),
        "a16": write(d / "a16.safetensors", a, dtype=torch.float16),
        "b16": write(d / "b16.safetensors", b, dtype=torch.float16),
        "inpaint": write(d / "inpaint.safetensors", inpaint),
        "sd2": write(d / "sd2.safetensors", tiny_bundle("sd2").state_dict()),
    }


def merged(files, tmp_path, a, b=None, c=None, name="out.safetensors", **options):
    result = merge_checkpoints(MergeInput(files[a]), MergeInput(files[b]) if b else None,
                               MergeInput(files[c]) if c else None, tmp_path / name, MergeOptions(**options))
    return result, load_file(str(result.path))


def test_weighted_sum_is_the_web_uis_arithmetic_on_every_key(files, tmp_path):
    result, out = merged(files, tmp_path, "a", "b", multiplier=0.3)
    a, b = load_file(str(files["a"])), load_file(str(files["b"]))
    assert set(out) == set(a)
    for k in a:
        if "model" in k and k != POSITION_IDS:
            assert torch.equal(out[k], (1 - 0.3) * a[k] + 0.3 * b[k]), k
        else:  # not merged: A's, untouched
            assert torch.equal(out[k], a[k]), k
    assert (result.merged, result.kept) == (len(a) - 2, 2) and not result.is_inpainting


def test_add_difference_on_every_key_and_a_key_c_lacks(files, tmp_path):
    _, out = merged(files, tmp_path, "a", "b", "c", interp_method="Add difference", multiplier=0.7)
    a, b, c = (load_file(str(files[x])) for x in "abc")
    for k in a:
        if "model" not in k or k == POSITION_IDS:
            assert torch.equal(out[k], a[k])
        elif k not in c:  # the web UI sets B - C to zeros there: A stays
            assert k == "first_stage_model.decoder.conv_out.bias" and torch.equal(out[k], a[k])
        else:
            assert torch.equal(out[k], a[k] + 0.7 * (b[k] - c[k])), k


# Keeps only the few tensors a test looks at (discarding is planned before anything is computed).
ONLY_A_FEW = (r"^(?!model\.diffusion_model\.input_blocks\.0\.|alphas_cumprod"
              r"|cond_stage_model\.transformer\.text_model\.embeddings)")


def test_dtypes_follow_the_inputs_and_fp16_casts_what_the_web_ui_casts(files, tmp_path):
    _, out = merged(files, tmp_path, "a16", "b16", multiplier=0.5, discard_weights=ONLY_A_FEW)
    a, b = load_file(str(files["a16"])), load_file(str(files["b16"]))
    assert set(out) == {k for k in a if k.startswith(("model.diffusion_model.input_blocks.0.", "alphas_cumprod",
                                                      "cond_stage_model.transformer.text_model.embeddings"))}
    # fp16 files stay fp16; the sum is computed in fp32 and rounded once
    assert out[CONV_IN].dtype == torch.float16
    assert torch.equal(out[CONV_IN], (0.5 * a[CONV_IN].float() + 0.5 * b[CONV_IN].float()).half())
    _, mixed = merged(files, tmp_path, "a", "b16", name="mixed.safetensors", discard_weights=ONLY_A_FEW)
    assert mixed[CONV_IN].dtype == torch.float32  # fp32 + fp16 promote to fp32
    _, half = merged(files, tmp_path, "a", "b", name="half.safetensors", save_as_half=True,
                     discard_weights=ONLY_A_FEW)
    assert half[CONV_IN].dtype == torch.float16 and half["alphas_cumprod"].dtype == torch.float32
    assert half[POSITION_IDS].dtype == torch.int64
    _, only_a = merged(files, tmp_path, "a", name="only-a.safetensors", interp_method="No interpolation",
                       save_as_half=True, discard_weights=ONLY_A_FEW)
    assert only_a["alphas_cumprod"].dtype == torch.float16  # "No interpolation" halves every fp32 tensor
    assert torch.equal(only_a[CONV_IN], load_file(str(files["a"]))[CONV_IN].half())


def test_an_inpainting_model_must_be_a_and_merges_its_first_four_channels(files, tmp_path):
    result, out = merged(files, tmp_path, "inpaint", "b", "c", name=".", interp_method="Add difference",
                         multiplier=1.0)
    assert result.is_inpainting and result.path.name == "inpaint + 1.0(b - c).inpainting.safetensors"
    a, b, c = (load_file(str(files[x])) for x in ("inpaint", "b", "c"))
    assert out[CONV_IN].shape == (32, 9, 3, 3)
    assert torch.equal(out[CONV_IN][:, :4], a[CONV_IN][:, :4] + 1.0 * (b[CONV_IN] - c[CONV_IN]))
    assert torch.equal(out[CONV_IN][:, 4:], a[CONV_IN][:, 4:])
    assert json.loads(result.metadata["sd_merge_recipe"])["is_inpainting"] is True
    assert load_bundle(result.path, device="cpu").family.name == "sd1-inpaint"
    with pytest.raises(SdlabError, match="A must be the inpainting model"):
        merged(files, tmp_path, "b", "inpaint", name="wrong.safetensors")
    assert not (tmp_path / "wrong.safetensors").exists()


def test_models_of_two_families_are_refused_in_one_line(files, tmp_path):
    with pytest.raises(SdlabError) as e:
        merged(files, tmp_path, "a", "sd2")
    assert str(e.value) == ("A is Stable Diffusion 1.x, B is Stable Diffusion 2.x (512, eps): models of different "
                            "families cannot be merged; pick models of one family")
    with pytest.raises(SdlabError, match="Add difference needs a third model"):
        merged(files, tmp_path, "a", "b", interp_method="Add difference")
    with pytest.raises(SdlabError, match="is one of the models being merged"):
        merge_checkpoints(MergeInput(files["a"]), MergeInput(files["b"]), None, files["a"])


def test_metadata_as_the_web_ui_writes_it(files, tmp_path):
    result, _ = merged(files, tmp_path, "a", "b", multiplier=0.25, metadata={"note": "mine"})
    with safe_open(str(result.path), "pt") as f:
        meta = f.metadata()
    assert meta["author"] == "b" and meta["note"] == "mine" and meta["format"] == "pt"  # A's, then B's, then the user's
    recipe = json.loads(meta["sd_merge_recipe"])
    sha_a, sha_b = file_sha256(files["a"]), file_sha256(files["b"])
    assert recipe == {"type": "webui", "primary_model_hash": sha_a, "secondary_model_hash": sha_b,
                      "tertiary_model_hash": None, "interp_method": "Weighted sum", "multiplier": 0.25,
                      "save_as_half": False, "custom_name": "", "config_source": 0, "bake_in_vae": "None",
                      "discard_weights": "", "is_inpainting": False, "is_instruct_pix2pix": False}
    models = json.loads(meta["sd_merge_models"])
    assert models[sha_a] == {"name": "a.safetensors", "legacy_hash": legacy_hash(files["a"]), "sd_merge_recipe": None}
    assert models[sha_b]["name"] == "b.safetensors" and models["f00d"]["name"] == "older.safetensors"
    result, _ = merged(files, tmp_path, "a", "b", name="bare.safetensors", save_metadata=False,
                       discard_weights=ONLY_A_FEW)
    with safe_open(str(result.path), "pt") as f:
        assert not f.metadata()


def test_bake_in_vae_and_discard_weights(files, tmp_path):
    vae = {k.removeprefix("first_stage_model."): v for k, v in tiny_bundle("sd1", seed=9).state_dict().items()
           if k.startswith("first_stage_model.")}
    save_file(vae, str(tmp_path / "vae.safetensors"))
    _, out = merged(files, tmp_path, "a", "b", bake_in_vae=tmp_path / "vae.safetensors", discard_weights=r"^cond_stage")
    assert all(torch.equal(out["first_stage_model." + k], v) for k, v in vae.items())
    assert not any(k.startswith("cond_stage_model.") for k in out) and CONV_IN in out


def test_the_merged_file_loads_in_sdlab(files, tmp_path):
    result, _ = merged(files, tmp_path, "a", "b", multiplier=0.5)
    bundle = load_bundle(result.path, device="cpu", dtype=torch.float32)
    a, b = load_file(str(files["a"])), load_file(str(files["b"]))
    assert bundle.family.name == "sd1"
    assert torch.equal(bundle.unet.state_dict()["input_blocks.0.0.weight"], 0.5 * a[CONV_IN] + 0.5 * b[CONV_IN])


def test_the_merged_file_loads_in_diffusers_from_single_file(tmp_path):
    """diffusers reads the merged single file as the web UI's (its config from a folder of the same
    tiny shapes, offline)."""
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline

    from tests.tiny import diffusers_folder, save_native

    ref, folder = diffusers_folder(tmp_path, "sd1", seed=0)
    save_native(ref, tmp_path / "a.safetensors")
    save_native(tiny_bundle("sd1", seed=1), tmp_path / "b.safetensors")
    result = merge_checkpoints(MergeInput(tmp_path / "a.safetensors"), MergeInput(tmp_path / "b.safetensors"), None,
                               tmp_path / "m.safetensors", MergeOptions(multiplier=0.5))
    pipe = StableDiffusionPipeline.from_single_file(str(result.path), config=str(folder), local_files_only=True,
                                                    safety_checker=None)
    assert torch.equal(pipe.unet.conv_in.weight, load_file(str(result.path))[CONV_IN])


def test_cli_merge(files, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main(["merge", str(files["a"]), str(files["b"]), "-m", "0.5", "--fp16", "-o", str(out),
                 "--discard", ONLY_A_FEW]) == 0
    assert "wrote" in capsys.readouterr().out and load_file(str(out))[CONV_IN].dtype == torch.float16
    for argv, message in ((["merge", str(files["a"]), str(files["sd2"]), "-o", str(tmp_path / "x.safetensors")],
                           "models of different families cannot be merged"),
                          (["merge", str(files["b"]), str(files["inpaint"]), "-o", str(tmp_path / "x.safetensors")],
                           "A must be the inpainting model"),
                          (["merge", str(files["a"]), "nothing-here", "--models-dir", str(tmp_path)],
                           "checkpoint 'nothing-here' not found"),
                          (["merge", str(files["a"]), str(files["b"]), "-o", str(tmp_path / "x.ckpt")],
                           "must be a .safetensors file")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "x.safetensors").exists()
