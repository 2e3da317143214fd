"""SD3 / SD3.5 training on a tiny random SD3 model that diffusers writes (`tests.test_sd3`): the
rectified-flow objective against kohya's formula and diffusers' functions, the LoRA in kohya's and
diffusers' layouts loading in sdlab and in diffusers, the text-encoder cache, exact resume, and the
options refused before any step."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdlab.checkpoints.io import save_safetensors
from sdlab.checkpoints.loader import load_bundle
from sdlab.errors import SdlabError
from sdlab.lora import LoraUse, apply_loras, load_lora
from sdlab.model import model_for
from sdlab.pipeline import text_runners
from sdlab.text.conditioning import prompt_schedule
from sdlab.training.config import load_config
from sdlab.training.flow import draw_timesteps, FlowObjective, loss_weighting, timestep_density
from sdlab.training.sd3_lora import to_kohya
from sdlab.training.trainer import Trainer
from tests.tiny import rounded_through, save_native

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's ops are microseconds each: on one thread they skip the threads' hand-offs
    (3-4x faster on a busy 2-core machine). Restored afterwards (and set again for each test: the
    CLI sets its own count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> Path:
    from tests.test_sd3 import tiny_sd3_folder

    return tiny_sd3_folder(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


def config_sets(tmp: Path, data: Path, base: Path, **over) -> list[str]:
    """A tiny SD3 LoRA run (rank 4, alpha 2, 32 px) as `--set` arguments; `over` are more of them."""
    sets = [f"data.folder={str(data)!r}", "data.resolution=32", "data.enable_bucket=false", "data.cache_latents=true",
            f"output_dir={str(tmp / 'out')!r}", "batch_size=2", "lr=1e-3", "mode='lora'",
            f"base_model={str(base)!r}", "steps=4", "lora.rank=4", "lora.alpha=2", "save_dtype='fp32'"]
    return sets + [f"{k}={v}" for k, v in over.items()]


def config(tmp: Path, data: Path, base: Path, **over):
    return load_config(None, config_sets(tmp, data, base, **over))


def trainer(cfg) -> Trainer:
    return Trainer(cfg, progress_bar=False)


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one mixed-precision setting per process: start and leave this test's own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


# ----------------------------------------------------------------------------- the objective


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode", "sigma_sqrt", "cosmap"])
def test_timestep_draws_and_weights_are_diffusers_and_kohyas(scheme):
    """u from diffusers' own compute_density_for_timestep_sampling (same generator), shifted and
    made integer as kohya's get_noisy_model_input_and_timesteps does; the weights are diffusers'
    compute_loss_weighting_for_sd3."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    objective = FlowObjective(scheme, logit_mean=0.3, logit_std=1.4, mode_scale=1.1, training_shift=3.0,
                              min_timestep=10, max_timestep=900)
    ours = draw_timesteps(objective, 64, torch.Generator().manual_seed(5))
    u = compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.3, logit_std=1.4, mode_scale=1.1,
                                              generator=torch.Generator().manual_seed(5))
    u = 3.0 * u / (1 + 2.0 * u)
    assert torch.equal(ours, (u * 890 + 10).long())
    assert torch.equal(timestep_density(scheme, 8, torch.Generator().manual_seed(1), 0.3, 1.4, 1.1),
                       compute_density_for_timestep_sampling(scheme, 8, 0.3, 1.4, 1.1,
                                                             generator=torch.Generator().manual_seed(1)))
    sigmas = (ours.float() / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(loss_weighting(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas),
                               rtol=0, atol=0)
    assert loss_weighting(scheme, torch.zeros(1)).isfinite().all()  # kohya's timestep 0: weight 0, not inf


def _capture(t: Trainer) -> dict:
    """The MMDiT's input, timestep and output, and the latents and noise of the next step."""
    seen: dict = {}

    def inputs(module, args):
        seen["latents"], seen["noise"], seen["t"] = args[0], args[2], args[3]

    def net(module, args, out):
        seen["noisy"], seen["net_t"], seen["context"], seen["y"], seen["pred"] = *args, out

    def texts(captions):
        seen["captions"] = captions
        return flow_texts(captions)

    flow_texts, t._flow_texts = t._flow_texts, texts
    t.module.register_forward_pre_hook(inputs)
    t.bundle.unet.register_forward_hook(net)
    return seen


@pytest.mark.parametrize("scheme, shift, precondition", [
    ("uniform", 1.0, "true"),  # kohya's defaults
    ("logit_normal", 3.0, "true"),
    ("mode", 1.0, "false"),  # diffusers' other setting: the velocity against noise - latents
    ("cosmap", 2.0, "false"),
])
def test_step_loss_is_kohyas_formula_by_hand(tmp_path, shapes, sd3, scheme, shift, precondition):
    """One step's loss, computed by hand from the same latents, noise, sigma and prediction: kohya's
    `model_pred * -sigma + noisy` against the latents, weighted by the scheme; with
    precondition_outputs = false diffusers' `model_pred` against `noise - latents`. The noise is
    mixed in as kohya mixes it, at the timesteps diffusers' density and kohya's shift give."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    cfg = config(tmp_path, shapes, sd3, weighting_scheme=repr(scheme), training_shift=shift,
                 precondition_outputs=precondition, seed=3)
    t = trainer(cfg)
    seen = _capture(t)
    loss = t.train_step(t._global_batches())
    latents, noise, pred, noisy = seen["latents"], seen["noise"], seen["pred"], seen["noisy"]
    timesteps = seen["t"]
    sigmas = (timesteps.float() / 1000).view(-1, 1, 1, 1)
    assert torch.equal(noisy, sigmas * noise + (1.0 - sigmas) * latents)
    assert torch.equal(seen["net_t"], timesteps.float())
    # The draws: posterior sample, noise, then u from diffusers' density, shifted (kohya).
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 1)
    torch.randn(latents.shape, generator=g)
    assert torch.equal(torch.randn(latents.shape, generator=g), noise)
    u = compute_density_for_timestep_sampling(scheme, 2, 0.0, 1.0, 1.29, generator=g)
    assert torch.equal(timesteps, ((u * shift) / (1 + (shift - 1) * u) * 1000).long())

    # The conditioning is what sampling gives the MMDiT for the same caption.
    model, runners = model_for(t.bundle), text_runners(t.bundle)
    for i, caption in enumerate(seen["captions"]):
        (schedule,) = prompt_schedule(runners, [caption], 1, 1, combine="sd3")
        cond = model.conditioning(schedule.entries[0][1], 1)
        assert torch.equal(seen["context"][i:i + 1], cond.context)
        # (the pooled projection of a batch of two rounds apart from one of a single caption)
        torch.testing.assert_close(seen["y"][i:i + 1], cond.y, rtol=0, atol=1e-6)

    weighting = compute_loss_weighting_for_sd3(scheme, sigmas)
    if precondition == "true":  # kohya's sd3_train_network.get_noise_pred_and_target
        by_hand = (weighting * (pred * -sigmas + noisy - latents) ** 2).mean()
    else:  # diffusers' train_dreambooth_lora_sd3.py with --precondition_outputs 0
        by_hand = torch.mean((weighting.float() * (pred.float() - (noise - latents).float()) ** 2).reshape(2, -1), 1).mean()
    assert loss == pytest.approx(by_hand.item(), rel=1e-6)


def test_thirty_lora_steps_lower_the_loss_on_a_fixed_batch(tmp_path, shapes, sd3):
    cfg = config(tmp_path, shapes, sd3, steps=30, lr=3e-3, weighting_scheme="'logit_normal'",
                 cache_text_encoder_outputs="true")
    t = trainer(cfg)
    g = torch.Generator().manual_seed(0)
    batch = t._local(list(range(4)))[0]
    latents = t._latents(batch, g, 4, slice(0, 4))
    noise, steps = torch.randn(latents.shape, generator=g), torch.tensor([200, 400, 600, 800])
    texts = t._flow_texts(batch["caption"])

    def fixed_loss() -> float:
        with torch.no_grad():
            return t.module(latents, texts, noise, steps).item()

    before = fixed_loss()
    t.train()
    after = fixed_loss()
    assert after < 0.9 * before, (before, after)


# ----------------------------------------------------------------------------- the LoRA files


def test_lora_in_kohyas_and_diffusers_layouts_loads_in_sdlab_and_diffusers(tmp_path, shapes, sd3):
    """A trained LoRA (MMDiT + CLIP-L + CLIP-G, every factor perturbed so no part hides) saved both
    ways: each loads in sdlab's loader and gives the MMDiT the trainer's output; diffusers'
    StableDiffusion3Pipeline.load_lora_weights reads the PEFT one (split q / k / v, the last
    block's adaLN halves swapped) with the transformer's output and the CLIPs' within 1e-4 of ours.
    diffusers -> kohya fuses q, k and v back to the same rank."""
    from diffusers import StableDiffusion3Pipeline

    t = trainer(config(tmp_path, shapes, sd3, steps=1, **{"lora.train_text_encoder": "true"}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in t.lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    kohya = t.save_model("-kohya")
    t.cfg = dataclasses.replace(t.cfg, lora_format="diffusers")
    peft = t.save_model("-diffusers")

    with safe_open(kohya, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc2.lora_up.weight" in keys
    assert meta["ss_network_module"] == "networks.lora_sd3" and meta["ss_weighting_scheme"] == "uniform"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-medium/lora"
    with safe_open(peft, "pt") as f:
        pkeys = set(f.keys())
    assert {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
            "transformer.transformer_blocks.1.norm1_context.linear.lora_B.weight",
            "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.lora_B.weight"} <= pkeys
    assert not any(k.endswith(".alpha") for k in pkeys)

    x = torch.randn(1, 16, 16, 16, generator=g)
    ctx, y, ts = torch.randn(1, 20, 64, generator=g), torch.randn(1, 48, generator=g), torch.tensor([500.0])
    ids = torch.randint(0, 49408, (1, 77), generator=g)
    t.lora.eval()
    with torch.no_grad():
        ours = t.bundle.unet.eval()(x, ts, ctx, y)
        ours_clips = [te(ids, skip=2, final_norm=False).hidden for te in t.bundle.text_encoders[:2]]
        base = load_bundle(sd3, device="cpu", dtype=torch.float32)
        assert (base.unet(x, ts, ctx, y) - ours).abs().max() > 0.05  # the LoRA changes the output
        for path in (kohya, peft):
            with apply_loras(base, [LoraUse(load_lora(path), 1.0, 1.0)]) as applied:
                assert not applied.unmatched
                torch.testing.assert_close(base.unet(x, ts, ctx, y), ours, atol=1e-5, rtol=0)
                for te, theirs in zip(base.text_encoders[:2], ours_clips):
                    torch.testing.assert_close(te(ids, skip=2, final_norm=False).hidden, theirs, atol=1e-5, rtol=0)

        pipe = StableDiffusion3Pipeline.from_pretrained(sd3, vae=None, text_encoder_3=None, tokenizer_3=None)
        pipe.load_lora_weights(str(peft))
        out = pipe.transformer(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=ts).sample
        assert (out - ours).abs().max() < 1e-4
        for te, theirs in zip((pipe.text_encoder, pipe.text_encoder_2), ours_clips):
            assert (te(ids, output_hidden_states=True).hidden_states[-2] - theirs).abs().max() < 1e-4

    back, left_out = to_kohya(load_lora(peft), t.bundle.unet.cfg)
    assert not left_out
    with safe_open(kohya, "pt") as f:
        for name in (k.removesuffix(".lora_down.weight") for k in keys if k.endswith(".lora_down.weight")):
            scale = f.get_tensor(f"{name}.alpha").item() / 4
            assert torch.equal(back[f"{name}.lora_down.weight"], f.get_tensor(f"{name}.lora_down.weight"))
            torch.testing.assert_close(back[f"{name}.lora_up.weight"], f.get_tensor(f"{name}.lora_up.weight") * scale,
                                       atol=0, rtol=0)
            assert back[f"{name}.alpha"].item() == 4


def test_peft_qkv_with_their_own_factors_fuse_to_kohyas_split_qkv_layout(tmp_path, sd3):
    """q, k and v LoRAs with separate lora_A (as diffusers trains them) fuse into kohya's split_qkv
    layout: down (3r, D), up block-diagonal; the same update as the three (k's left out: zero)."""
    bundle = load_bundle(sd3, device="cpu", dtype=torch.float32)
    d, r, g = bundle.config.unet.hidden_size, 2, torch.Generator().manual_seed(1)
    ab = {x: (torch.randn(r, d, generator=g), torch.randn(d, r, generator=g)) for x in ("q", "v")}
    path = tmp_path / "peft.safetensors"
    save_safetensors({f"transformer.transformer_blocks.0.attn.to_{x}.lora_{n}.weight": w
                      for x, (a, b) in ab.items() for n, w in zip("AB", (a, b))}, path)
    fused, _ = to_kohya(load_lora(path), bundle.unet.cfg)
    name = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    down, up = fused[f"{name}.lora_down.weight"], fused[f"{name}.lora_up.weight"]
    assert down.shape == (2 * r, d) and fused[f"{name}.alpha"].item() == 2 * r
    expected = torch.cat([ab["q"][1] @ ab["q"][0], torch.zeros(d, d), ab["v"][1] @ ab["v"][0]])
    torch.testing.assert_close(up @ down, expected)


def test_cli_writes_the_diffusers_layout_and_a_run_starts_from_it(tmp_path, shapes, sd3):
    """`sdlab train --lora-format diffusers`; kohya's network_weights given that file starts the LoRA
    where it ended (q, k and v fused back)."""
    from sdlab.cli import main

    assert main(["train", "--mode", "lora", "--base-model", str(sd3), "--data", str(shapes), "--steps", "1",
                 "--output-dir", str(tmp_path), "--lora-format", "diffusers", "--set", "data.resolution=32",
                 "--set", "data.enable_bucket=false", "--set", "lora.rank=2", "--set", "save_dtype='fp32'"]) in (0, None)
    peft = tmp_path / "model.safetensors"
    with safe_open(peft, "pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())
        assert json.loads(f.metadata()["ss_network_args"]) == {}
    again = trainer(config(tmp_path / "b", shapes, sd3, **{"lora.rank": 2, "lora.network_weights": repr(str(peft))}))
    fused, _ = to_kohya(load_lora(peft), again.bundle.unet.cfg)
    assert fused.keys() == again.lora.kohya_state_dict().keys()
    for name, m in again.lora.loras.items():
        assert torch.equal(m.lora_down.weight, fused[f"{name}.lora_down.weight"]) and m.scale == 1
        assert torch.equal(m.lora_up.weight, fused[f"{name}.lora_up.weight"])
    assert any(m.lora_up.weight.abs().sum() > 0 for m in again.lora.loras.values())  # trained off zero


# ----------------------------------------------------------------------------- cache, resume, fine-tune


def test_text_encoder_cache_trains_the_same_steps_and_frees_t5(tmp_path, shapes, sd3, monkeypatch):
    runs = {}
    for name, extra in (("live", {}), ("disk", {"cache_text_encoder_outputs_to_disk": "true"})):
        t = trainer(config(tmp_path / name, shapes, sd3, **extra,
                           **{"validation.prompts": "['a red circle']", "validation.steps": 2}))
        runs[name] = (t.train_step(t._global_batches()), len(t.bundle.text_encoders))
        assert len(t.validate()) == 1  # sampling works on the model with T5 and after T5 left
    assert runs["live"][1] == 3 and runs["disk"][1] == 2  # T5 left
    assert runs["disk"][0] == pytest.approx(runs["live"][0], rel=1e-5)
    files = list((shapes / ".te_cache").glob("*/*.safetensors"))
    assert len(files) == len({p.read_text() for p in shapes.glob("*.txt")})

    # A later run reads the files and encodes nothing.
    monkeypatch.setattr("sdlab.training.trainer.encode_text", lambda *a, **k: pytest.fail("encoded again"))
    t = trainer(config(tmp_path / "again", shapes, sd3, cache_text_encoder_outputs_to_disk="true"))
    assert t.train_step(t._global_batches()) == pytest.approx(runs["live"][0], rel=1e-5)
    monkeypatch.undo()
    with pytest.raises(SdlabError, match="caption_dropout_rate changes the captions"):
        trainer(config(tmp_path, shapes, sd3, cache_text_encoder_outputs="true", **{"data.caption_dropout_rate": 0.1}))


def test_resume_is_exact(tmp_path, shapes, sd3):
    kw = dict(steps=2, weighting_scheme="'logit_normal'", training_shift=3.0, grad_accum=2, lr_scheduler="'cosine'",
              cache_text_encoder_outputs="true", **{"lora.train_text_encoder": "true", "lora.dropout": 0.1})
    straight = trainer(config(tmp_path / "a", shapes, sd3, **kw))
    assert straight.text_cache.encoders == (2,)  # CLIP-L and CLIP-G train: only T5 is cached
    straight.train()
    first = trainer(config(tmp_path / "b", shapes, sd3, **kw))
    assert first.train(max_steps=1) is None  # stops with a saved state
    resumed = trainer(config(tmp_path / "b", shapes, sd3, **kw))
    resumed.train(resume=True)
    assert resumed.progress.step == straight.progress.step == 2
    a, b = straight.lora.state_dict(), resumed.lora.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_with_gradient_checkpointing_saves_an_sd3_file(tmp_path, shapes, sd3):
    """A full fine-tune of the MMDiT: gradient checkpointing through its blocks gives the same step;
    the saved single file loads as SD3 with the changed weights (without T5, which the text cache
    freed, as kohya's SD3 files go)."""
    steps = {}
    for ckpt in ("false", "true"):
        t = trainer(config(tmp_path / ckpt, shapes, sd3, mode="'finetune'", steps=1, gradient_checkpointing=ckpt,
                           cache_text_encoder_outputs="true"))
        before = t.bundle.unet.joint_blocks[0].x_block.attn.qkv.weight.detach().clone()
        steps[ckpt] = t.train_step(t._global_batches())
    assert steps["true"] == steps["false"]
    path = t.train()
    back = load_bundle(path, device="cpu", dtype=torch.float32)
    assert back.family.name == "sd3" and len(back.text_encoders) == 2
    assert not torch.equal(back.unet.joint_blocks[0].x_block.attn.qkv.weight, before)


def test_fp8_base_trains_as_a_base_rounded_to_fp8(tmp_path, shapes, sd3, fresh_accelerate):
    """kohya's fp8_base on SD3: the frozen MMDiT's and CLIPs' matrices stay in fp8 and are upcast to
    bf16 layer by layer, so the steps are those of a bf16 base whose matrices were rounded to fp8."""
    bundle = load_bundle(sd3, device="cpu", dtype=torch.float32)
    rounded = save_native(rounded_through(bundle, torch.float8_e4m3fn), tmp_path / "rounded.safetensors")
    runs = {}
    for name, model, fp8 in (("fp8", sd3, "true"), ("rounded", rounded, "false")):
        t = trainer(config(tmp_path / name, shapes, model, mixed_precision="'bf16'", fp8_base=fp8,
                           gradient_checkpointing="true", cache_text_encoder_outputs="true"))
        runs[name] = [t.train_step(t._global_batches())]
        if name == "fp8":
            assert t.bundle.unet.joint_blocks[0].x_block.mlp.fc1.weight.dtype == torch.float8_e4m3fn
    assert runs["fp8"] == runs["rounded"] and all(math.isfinite(v) for v in runs["fp8"])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("base, sets, message", [
    ("sd1", {"lora.network_module": "'networks.lora_sd3'"}, "networks.lora_sd3' is kohya's SD3 LoRA, but the base "
                                                            "model is Stable Diffusion 1.x"),
    ("sd1", {"weighting_scheme": "'logit_normal'"}, "weighting_scheme = 'logit_normal' is an SD3 / SD3.5 option"),
    ("sd1", {"lora_format": "'diffusers'"}, "lora_format = 'diffusers' is an SD3 / SD3.5 option"),
    ("sd3", {"min_snr_gamma": 5}, "min_snr_gamma = 5.0 is an option of the DDPM-trained UNets"),
    ("sd3", {"noise_offset": 0.05}, "noise_offset = 0.05 is an option of the DDPM-trained UNets"),
    ("sd3", {"lora.network_module": "'lycoris.kohya'"}, "'lycoris.kohya' is not supported on Stable Diffusion 3"),
    ("sd3", {"mode": "'embedding'", "embedding.token_string": "'sks'"}, "textual inversion) is not supported"),
    ("sd3", {"loss_type": "'huber'"}, "huber_schedule 'snr' needs a DDPM noise schedule"),
])
def test_options_of_the_other_family_are_refused_before_any_step(tmp_path, shapes, sd3, base_model, base, sets,
                                                                 message):
    model = sd3 if base == "sd3" else base_model  # (conftest's tiny SD 1.x file)
    with pytest.raises(SdlabError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        trainer(config(tmp_path, shapes, model, **sets))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- many processes


def test_two_processes_match_one(tmp_path, shapes, sd3):
    """2 gloo processes with batch 1 each == 1 process with batch 2 on SD3: the same global batches,
    noise and logit-normal timesteps, the text-encoder cache filled per process, and DDP over a
    LoRA on the MMDiT (and on CLIP-L / CLIP-G, whose cached T5 part no gradient reaches)."""
    from tests.training.test_trainer import assert_two_processes_match_one

    common = {"steps": 2, "weighting_scheme": "'logit_normal'", "training_shift": 3.0,
              "cache_text_encoder_outputs": "true", "lora.train_text_encoder": "true"}
    assert_two_processes_match_one(tmp_path, config_sets(tmp_path / "two", shapes, sd3, batch_size=1, **common),
                                   lambda: trainer(config(tmp_path / "one", shapes, sd3, batch_size=2, **common)))
