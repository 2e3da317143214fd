"""The trainer on tiny models and a tiny shapes data set (seconds each)."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from sdlab import device as devices
from sdlab.errors import SdlabError
from sdlab.training.config import SamplePrompt, load_config, parse_sample_prompt
from sdlab.training.shapes import make_shapes_dataset
from sdlab.training.losses import LossOptions, diffusion_loss, huber_threshold, min_snr_weight, pyramid_noise
from sdlab.training.trainer import Trainer, encoder_fingerprint, lr_lambda
from tests.tiny import rounded_through, save_native, tiny_bundle


def config(tmp: Path, data: Path, **over):
    """A tiny-run config; `over` are `--set` style overrides (strings)."""
    sets = [f"data.folder={str(data)!r}", "data.resolution=32", "data.enable_bucket=false",
            f"output_dir={str(tmp / 'out')!r}", "batch_size=2", "lr=1e-3", "mode='scratch'", "model.preset='tiny'"]
    sets += [f"{k}={v}" for k, v in over.items()]
    return load_config(None, sets)


def trainer(cfg) -> Trainer:
    return Trainer(cfg, progress_bar=False)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("sets, message", [
    (["mode='dreambooth'"], "mode must be one of"),
    (["mode='lora'"], "needs base_model"),
    (["lr=-1"], "lr must be positive"),
    (["lr_scheduler='step'"], "lr_scheduler must be one of"),
    (["learning_rate=1"], "unknown key 'learning_rate'"),
    (["lora.rnk=4"], "unknown key 'lora.rnk'"),
    (["mode='lora'", "base_model='x'", "lora.dropout=2"], "lora.dropout must be in"),
    (["mode='lora'", "base_model='x'", "lora.rank_dropout=1"], "lora.rank_dropout must be in"),
    (["mode='lora'", "base_model='x'", "save_model_as='ckpt'"], "a LoRA is saved as .safetensors"),
    (["save_model_as='pt'"], "save_model_as must be one of"),
    (["batch_size=0"], "batch_size must be at least 1"),
    (["vae_steps=5", "mode='finetune'", "base_model='x'"], "only applies to mode 'scratch'"),
    (["data.resolution=30"], "multiple of 8"),
    (["adaptive_noise_scale=0.05"], "adaptive_noise_scale adds to noise_offset: set noise_offset too"),
    (["steps"], "expected key=value"),
])
def test_config_errors(tmp_path, shapes, sets, message):
    with pytest.raises(SdlabError, match=message.replace("(", r"\(")):
        load_config(None, [f"data.folder={str(shapes)!r}", "mode='scratch'", *sets])


def test_config_from_toml_and_overrides(tmp_path, shapes):
    path = tmp_path / "c.toml"
    path.write_text(textwrap.dedent(f"""
        mode = "scratch"
        steps = 7
        [data]
        folder = "{shapes}"
        [lora]
        rank = 4
        [validation]
        prompts = ["a red circle on a blue background"]
    """))
    cfg = load_config(path, ["lr=2e-4", "lora.rank=8", "output_name=run1", "seed=3"])
    assert (cfg.steps, cfg.lr, cfg.lora.rank, cfg.output_name, cfg.data.seed) == (7, 2e-4, 8, "run1", 3)
    assert cfg.validation.prompts == ("a red circle on a blue background",)
    with pytest.raises(SdlabError, match="no such training config"):
        load_config(tmp_path / "missing.toml")


# ----------------------------------------------------------------------------- losses


def test_adamw_is_fused_where_available_and_makes_the_same_update():
    """The trainer's AdamW takes PyTorch's fused kernel (one pass over all parameters); its steps
    equal the per-tensor implementation's up to rounding."""
    from sdlab.training.trainer import adamw

    torch.manual_seed(0)
    weights = [torch.randn(16, 32), torch.randn(8)]
    ours, plain = [w.clone().requires_grad_() for w in weights], [w.clone().requires_grad_() for w in weights]
    opt, ref = adamw(ours, lr=1e-2, weight_decay=0.01), torch.optim.AdamW(plain, lr=1e-2, weight_decay=0.01)
    assert opt.param_groups[0]["fused"]  # this PyTorch has the CPU kernel
    for step in range(5):
        grads = [torch.randn(w.shape, generator=torch.Generator().manual_seed(step)) for w in weights]
        for params, optimizer in ((ours, opt), (plain, ref)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_optimizer_by_class_path_with_its_arguments(tmp_path, shapes, base_model):
    """kohya's --optimizer_type / --optimizer_args: any optimizer class by import path, given the
    learning rate of each group and the arguments; named so in ss_optimizer."""
    cfg = config(tmp_path, shapes, mode="'lora'", base_model=f"{str(base_model)!r}", steps=1, lr=0.5,
                 optimizer="'torch.optim.SGD'", optimizer_args="{ momentum = 0.9, nesterov = true }",
                 **{"lora.rank": 4, "lora.train_text_encoder": "true", "lora.text_encoder_lr": 0.25})
    t = trainer(cfg)
    opt = t.optimizer.optimizer if hasattr(t.optimizer, "optimizer") else t.optimizer  # accelerate's wrapper
    assert type(opt) is torch.optim.SGD
    assert [(g["lr"], g["momentum"], g["nesterov"]) for g in opt.param_groups] == [(0.5, 0.9, True), (0.25, 0.9, True)]
    ups = [p for n, p in t.lora.named_parameters() if n.endswith("lora_up.weight")]
    t.train_step(t._global_batches())
    assert any(p.abs().sum() > 0 for p in ups)
    assert t.lora_metadata()["ss_optimizer"] == "torch.optim.SGD(momentum=0.9,nesterov=True)"


@pytest.mark.parametrize("optimizer, message", [
    ("sgd", "optimizer must be one of adamw, adamw8bit or a class path"),
    ("nosuchpackage.Opt", "cannot import 'nosuchpackage'; install the package that provides it"),
    ("torch.optim.NoSuch", "'torch.optim' has no 'NoSuch'"),
    ("torch.nn.Linear", "is not a torch.optim.Optimizer class"),
    ("torch.optim.SGD", "unexpected keyword argument 'momentun'; check optimizer_args"),
])
def test_optimizer_errors(tmp_path, shapes, base_model, optimizer, message):
    with pytest.raises(SdlabError, match=message):
        trainer(config(tmp_path, shapes, mode="'lora'", base_model=f"{str(base_model)!r}", optimizer=repr(optimizer),
                       optimizer_args="{ momentun = 0.9 }"))


def test_validation_prompts_take_kohyas_options(tmp_path, shapes, base_model):
    """kohya's sample prompt lines: `--n --w --h --d --s --l --ss` per prompt (a --d seed replaces
    the seeds list), its sampler names; malformed lines fail when the config is read."""
    p = parse_sample_prompt("a red circle --n blurry, ugly --w 48 --h 32 --d 5 --s 2 --l 3.5 --ss dpmsolver++ --cn x.png")
    assert p == SamplePrompt("a red circle", "blurry, ugly", 48, 32, 5, 2, 3.5, "DPM++ 2M")
    assert parse_sample_prompt("plain") == SamplePrompt("plain")
    for line, message in [("x --w wide", "--w needs a int, got 'wide'"), ("x --q 1", "unknown option --q"),
                          ("x --ss nosuch", "unknown sampler 'nosuch'")]:
        with pytest.raises(SdlabError, match=message):
            config(tmp_path, shapes, **{"validation.prompts": repr([line])})

    t = trainer(config(tmp_path, shapes, mode="'lora'", base_model=f"{str(base_model)!r}", **{
        "lora.rank": 4, "validation.seeds": "[1, 2]",
        "validation.prompts": repr(["a red circle --w 48 --h 32 --d 5 --s 2 --ss euler_a", "a blue square --s 2"])}))
    images = sorted(t.validate())
    assert [im.name for im in images] == ["step000000-p0-s5.png", "step000000-p1-s1.png", "step000000-p1-s2.png"]
    from PIL import Image
    assert Image.open(images[0]).size == (48, 32) and Image.open(images[1]).size == (32, 32)


@pytest.mark.parametrize("name, warmup, extra", [
    ("constant", 0, {}), ("constant_with_warmup", 4, {}), ("linear", 4, {}), ("cosine", 4, {}), ("cosine", 0, {}),
    ("cosine_with_restarts", 3, {"num_cycles": 3}), ("polynomial", 2, {"power": 2.0}), ("polynomial", 0, {}),
])
def test_lr_schedules_are_diffusers(name, warmup, extra):
    """Every learning-rate schedule, step by step, against diffusers' `get_scheduler` (which kohya's
    scripts use): warm-up from 0, then the named decay; per parameter group."""
    from diffusers.optimization import get_scheduler

    def optimizer():
        return torch.optim.SGD([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)], "lr": 0.02}], lr=0.1)

    ours, theirs = optimizer(), optimizer()
    total = 20
    ours_schedule = torch.optim.lr_scheduler.LambdaLR(ours, lr_lambda(name, warmup, total, lr=0.1, **extra))
    theirs_schedule = get_scheduler(name, theirs, num_warmup_steps=warmup, num_training_steps=total, **extra)
    for _ in range(total):
        assert [g["lr"] for g in ours.param_groups] == pytest.approx([g["lr"] for g in theirs.param_groups],
                                                                      rel=1e-12, abs=1e-15)
        ours.step(), theirs.step(), ours_schedule.step(), theirs_schedule.step()


def test_min_snr_weight_by_hand():
    snr = torch.tensor([0.5, 5.0, 20.0])
    assert torch.allclose(min_snr_weight(snr, 5.0, "eps"), torch.tensor([1.0, 1.0, 0.25]))
    assert torch.allclose(min_snr_weight(snr, 5.0, "v"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_loss_is_diffusers_scripts(prediction):
    """The Min-SNR weighting of diffusers' train_text_to_image(_lora).py (`compute_snr`, then
    min(snr, gamma) / snr, or / (snr + 1) for v) on SD's noise schedule."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from sdlab.sampling.schedules import discrete_schedule

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    timesteps = torch.tensor([0, 10, 250, 500, 999])
    snr = compute_snr(scheduler, timesteps)
    weights = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0] / (snr + 1 if prediction == "v" else snr)
    g = torch.Generator().manual_seed(0)
    pred, x0, eps = (torch.randn(5, 4, 8, 8, generator=g) for _ in range(3))
    alphas = discrete_schedule().alphas_cumprod
    target = eps if prediction == "eps" else scheduler.get_velocity(x0, eps, timesteps)
    expected = torch.nn.functional.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * weights
    got = diffusion_loss(pred, x0, eps, timesteps, alphas, LossOptions(prediction, min_snr_gamma=5.0))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_zero_terminal_snr_noises_as_diffusers_and_weights_by_the_original_snr(tmp_path, shapes, caplog):
    """kohya's --zero_terminal_snr: the noising schedule is diffusers' `rescale_betas_zero_snr` one
    (no signal at all at t = 999), while the loss weightings read the SNR of the schedule before
    the rescale (kohya computes `all_snr` first), so min-SNR stays finite at t = 999."""
    from diffusers import DDPMScheduler

    from sdlab.sampling.schedules import discrete_schedule

    t = trainer(config(tmp_path, shapes, zero_terminal_snr="true", prediction="'v'"))
    assert t.bundle.family.zero_terminal_snr  # the model it saves is sampled on that schedule
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              rescale_betas_zero_snr=True).alphas_cumprod
    torch.testing.assert_close(t.alphas_cumprod, reference, rtol=2e-5, atol=1e-9)
    assert t.alphas_cumprod[-1] == 0
    original = discrete_schedule().alphas_cumprod
    torch.testing.assert_close(t.weighting_alphas_cumprod, original, rtol=0, atol=0)

    timesteps = torch.tensor([0, 500, 999])
    g = torch.Generator().manual_seed(0)
    pred, x0, eps = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    a = t.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    target = a.sqrt() * eps - (1 - a).sqrt() * x0  # at t = 999: -x0
    snr = original[timesteps] / (1 - original[timesteps])
    expected = ((pred - target) ** 2).mean(dim=(1, 2, 3)) * snr.clamp(max=5.0) / (snr + 1)
    got = diffusion_loss(pred, x0, eps, timesteps, t.alphas_cumprod, LossOptions("v", min_snr_gamma=5.0),
                         weighting_alphas_cumprod=t.weighting_alphas_cumprod)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert torch.isfinite(got).all() and got[-1] > 0
    with caplog.at_level(logging.WARNING, logger="sdlab"):
        trainer(config(tmp_path / "eps", shapes, zero_terminal_snr="true", prediction="'eps'"))
    assert "zero_terminal_snr is meant for v-prediction" in caplog.text


def test_eps_and_v_losses():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a, t = torch.tensor([0.9, 0.2]), torch.tensor([0, 1])
    v = a.sqrt().view(-1, 1, 1, 1) * eps - (1 - a).sqrt().view(-1, 1, 1, 1) * x0
    eps_loss, v_loss = LossOptions("eps"), LossOptions("v")
    assert diffusion_loss(eps, x0, eps, t, a, eps_loss).abs().max() == 0
    assert diffusion_loss(v, x0, eps, t, a, v_loss).abs().max() < 1e-12
    # a zero prediction costs the mean square of the target, per sample
    assert torch.allclose(diffusion_loss(torch.zeros_like(v), x0, eps, t, a, v_loss), v.pow(2).mean(dim=(1, 2, 3)))
    weighted = diffusion_loss(torch.zeros_like(eps), x0, eps, t, a, LossOptions("eps", min_snr_gamma=5.0))
    snr = a / (1 - a)
    assert torch.allclose(weighted, eps.pow(2).mean(dim=(1, 2, 3)) * snr.clamp(max=5) / snr)


def test_kohyas_loss_options_by_hand():
    """kohya's formulas (train_util.conditional_loss / get_huber_threshold_if_needed,
    custom_train_functions): for an error d and threshold c, huber 2c(sqrt(d^2 + c^2) - c)
    and smooth_l1 2(sqrt(d^2 + c^2) - c); the thresholds' schedules; the SNR scalings."""
    alphas = torch.tensor([0.99, 0.5, 0.01, 0.2])
    t = torch.tensor([0, 1, 2, 3])
    x0, d = torch.zeros(4, 1, 1, 1), torch.tensor([0.0, 0.5, 3.0, -2.0]).view(4, 1, 1, 1)
    pred, eps = d, torch.zeros(4, 1, 1, 1)  # pred - target = d
    sigma = ((1 - alphas) / alphas).sqrt()
    for schedule, c in [("constant", torch.full((4,), 0.1 * 2.0)),
                        ("exponential", torch.exp(math.log(0.1) * t / 1000) * 2.0),  # t out of 1000 steps
                        ("snr", (1 - 0.1) / (1 + sigma) ** 2 + 0.1)]:
        opts = LossOptions("eps", "huber", huber_c=0.1, huber_schedule=schedule, huber_scale=2.0)
        assert torch.allclose(huber_threshold(opts, t, alphas), c)
        root = torch.sqrt(d.flatten() ** 2 + c ** 2) - c
        assert torch.allclose(diffusion_loss(pred, x0, eps, t, alphas, opts), 2 * c * root)
        smooth = LossOptions("eps", "smooth_l1", huber_c=0.1, huber_schedule=schedule, huber_scale=2.0)
        assert torch.allclose(diffusion_loss(pred, x0, eps, t, alphas, smooth), 2 * root)
    assert torch.allclose(diffusion_loss(pred, x0, eps, t, alphas, LossOptions("eps", "l1")), d.flatten().abs())
    # pseudo-Huber: quadratic for small errors, linear (slope 2c) for large ones. The small error
    # is 0.01, not less: the loss is computed in float32 (as kohya does), where sqrt(d^2 + c^2) - c
    # cancels to a few ulps of c for smaller d. At d = 0.01, c = 0.1 the next term of the expansion,
    # d^2 / 4c^2 = 2.5e-3 relative, is what separates the loss from d^2.
    small, big = torch.tensor([[[[1e-2]]]]), torch.tensor([[[[1e3]]]])
    for err, expected, rel in [(small, 1e-4, 3e-3), (big, 2 * 0.1 * (1e3 - 0.1), 1e-6)]:
        got = diffusion_loss(err, torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([0]), torch.tensor([0.5]),
                             LossOptions("eps", "huber", huber_schedule="constant"))
        assert got.item() == pytest.approx(expected, rel=rel)

    plain = diffusion_loss(pred, x0, eps, t, alphas, LossOptions("eps"))
    snr = (alphas / (1 - alphas)).clamp(max=1000)
    scaled = diffusion_loss(pred, x0, eps, t, alphas, LossOptions("eps", scale_v_pred_loss_like_noise_pred=True))
    assert torch.allclose(scaled, plain * snr / (snr + 1))
    debiased = diffusion_loss(pred, x0, eps, t, alphas, LossOptions("eps", debiased_estimation_loss=True))
    assert torch.allclose(debiased, plain / snr.sqrt())
    v_plain = diffusion_loss(pred, x0, eps, t, alphas, LossOptions("v"))
    v_debiased = diffusion_loss(pred, x0, eps, t, alphas, LossOptions("v", debiased_estimation_loss=True))
    assert torch.allclose(v_debiased, v_plain / (snr + 1))


def test_masked_loss(tmp_path, shapes, base_model):
    """kohya's masked_loss: each element's loss weighted by the alpha mask, averaged down to the
    latents' size (area), the mean still over all elements; fully transparent images cost nothing."""
    g = torch.Generator().manual_seed(0)
    pred, x0, eps = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, :, 16:] = 1.0  # the right half of each image
    mask[1, :, :16, :] = 0.5
    t, alphas = torch.tensor([3, 700]), torch.linspace(0.99, 0.01, 1000)
    weights = torch.nn.functional.avg_pool2d(mask, 8)  # 32 px -> 4 latents
    expected = ((pred - eps) ** 2 * weights).mean(dim=(1, 2, 3))
    torch.testing.assert_close(diffusion_loss(pred, x0, eps, t, alphas, LossOptions("eps"), mask), expected)

    with pytest.raises(SdlabError, match="masked_loss needs data.alpha_mask = true"):
        config(tmp_path, shapes, masked_loss="true")
    clear = tmp_path / "clear"
    clear.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((32, 32, 4), dtype=np.uint8), "RGBA").save(clear / f"{i}.png")
        (clear / f"{i}.txt").write_text("nothing")
    t = trainer(config(tmp_path, clear, mode="'lora'", base_model=f"{str(base_model)!r}", masked_loss="true",
                       **{"data.alpha_mask": "true", "lora.rank": 4}))
    assert t.train_step(t._global_batches()) == 0.0


def test_noise_and_timestep_draws_follow_kohyas_options(tmp_path, shapes):
    """The per-step draws, for the whole global batch from the shared generator: timesteps in
    [min_timestep, max_timestep); with *_random_strength, one uniform strength per batch drawn
    before the offset / perturbation noise; options that are off draw nothing."""
    t = trainer(config(tmp_path, shapes, min_timestep=900, max_timestep=1000, noise_offset=0.1,
                       noise_offset_random_strength="true", ip_noise_gamma=0.2, ip_noise_gamma_random_strength="true"))
    shape = (64, 4, 8, 8)
    noise, steps, mixed = t._noise_and_timesteps(shape, torch.Generator().manual_seed(3))
    assert 900 <= steps.min() and steps.max() < 1000 and len(set(steps.tolist())) > 20
    g = torch.Generator().manual_seed(3)
    expected = torch.randn(shape, generator=g)
    expected = expected + 0.1 * torch.rand((), generator=g).item() * torch.randn(64, 4, 1, 1, generator=g)
    assert torch.equal(noise, expected)
    assert torch.equal(steps, torch.randint(900, 1000, (64,), generator=g))
    assert torch.equal(mixed, expected + 0.2 * torch.rand((), generator=g).item() * torch.randn(shape, generator=g))

    plain = trainer(config(tmp_path, shapes))
    noise, steps, mixed = plain._noise_and_timesteps(shape, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    assert torch.equal(noise, torch.randn(shape, generator=g)) and mixed is None
    assert torch.equal(steps, torch.randint(0, 1000, (64,), generator=g))
    with pytest.raises(SdlabError, match="need 0 <= min_timestep < max_timestep <= 1000"):
        config(tmp_path, shapes, min_timestep=500, max_timestep=500)


def test_adaptive_noise_scale_is_kohyas(tmp_path, shapes):
    """kohya's apply_noise_offset: each (image, channel) offset is noise_offset + adaptive_noise_scale
    * |mean of that latent channel|, clamped at 0 (for a negative scale), times one normal draw."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, 8, 8, generator=g) + torch.linspace(-2, 2, 24).view(6, 4, 1, 1)
    for scale in (0.5, -0.2):
        t = trainer(config(tmp_path, shapes, noise_offset=0.1, adaptive_noise_scale=scale))
        means = t._global_channel_means(latents, len(latents))
        torch.testing.assert_close(means, latents.mean(dim=(2, 3)))
        noise, _, _ = t._noise_and_timesteps(latents.shape, torch.Generator().manual_seed(3), means)
        g = torch.Generator().manual_seed(3)
        base = torch.randn(latents.shape, generator=g)
        offset = torch.clamp(0.1 + scale * torch.abs(latents.mean(dim=(2, 3), keepdim=True)), 0.0, None)
        torch.testing.assert_close(noise, base + offset * torch.randn(6, 4, 1, 1, generator=g), rtol=0, atol=1e-6)
        assert (offset == 0).any() == (scale < 0)


def test_pyramid_noise_is_seeded_unit_spread_and_has_coarse_layers():
    """kohya's multires noise: white noise plus upscaled coarser layers, rescaled to unit spread;
    drawn from the run's generator (the same draws on every rank and after --resume)."""
    base = torch.randn(8, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    a = pyramid_noise(base, 8, 0.8, torch.Generator().manual_seed(2))
    b = pyramid_noise(base, 8, 0.8, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, base)
    assert a.std().item() == pytest.approx(1.0, abs=1e-5)
    # Each 64x64 map's mean: about 1/64 spread for white noise; the coarse layers make it far larger.
    assert base.mean(dim=(2, 3)).std() < 0.03 and a.mean(dim=(2, 3)).std() > 0.15
    one = pyramid_noise(base, 1, 0.3, torch.Generator().manual_seed(2))  # the full-size layer only
    g = torch.Generator().manual_seed(2)
    torch.rand((), generator=g)
    expected = base + torch.randn(base.shape, generator=g)
    assert torch.allclose(one, expected / expected.std())


# ----------------------------------------------------------------------------- training


def test_deterministic_switch_is_set_while_training_and_restored(tmp_path, shapes):
    """`deterministic = true` turns on PyTorch's deterministic kernels for the run (exact resume
    on a GPU) and `close()` restores what the process had; on the CPU the result is the same."""
    assert not torch.are_deterministic_algorithms_enabled()
    kw = dict(steps=2, vae_steps=0, warmup_steps=0)
    plain = trainer(config(tmp_path / "a", shapes, **kw))
    plain.train()
    plain.close()
    det = trainer(config(tmp_path / "b", shapes, deterministic="true", **kw))
    assert torch.are_deterministic_algorithms_enabled()
    det.train()
    det.close()
    assert not torch.are_deterministic_algorithms_enabled()
    a, b = plain.bundle.state_dict(), det.bundle.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_scratch_training_loss_falls(tmp_path, shapes):
    t = trainer(config(tmp_path, shapes, steps=24, vae_steps=2, ema_decay=0.9, lr=2e-3, warmup_steps=0))
    before = {k: v.clone() for k, v in t.bundle.state_dict().items()}
    batches = t._global_batches()
    vae_losses = [t.train_step(batches) for _ in range(2)]
    t._finish_vae_phase(batches)
    losses = [t.train_step(batches) for _ in range(24)]
    assert all(map(torch.isfinite, torch.tensor(vae_losses + losses)))
    assert sum(losses[-6:]) < sum(losses[:6])
    after = t.bundle.state_dict()
    for prefix in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix


@pytest.mark.parametrize("flip, disk", [(False, True), (True, True), (True, False)])
def test_latent_cache_trains_the_same_steps_without_encoding_again(tmp_path, shapes, flip, disk, monkeypatch):
    """cache_latents_to_disk: the first diffusion step (after the VAE phase) encodes every image once
    into a folder named after that VAE's encoder; later steps read it and draw their latents from
    the cached posterior, so the run takes the same steps as one without the cache. cache_latents
    keeps the same entries in memory."""
    kw = dict(steps=3, vae_steps=1, batch_size=2, vae_batch_size=3, **{"data.flip_aug": str(flip).lower()})
    plain = trainer(config(tmp_path / "plain", shapes, **kw))
    plain.train()
    cache = tmp_path / "cache"
    option = {"data.cache_latents_to_disk": "true"} if disk else {"data.cache_latents": "true"}
    cached = trainer(config(tmp_path / "cached", shapes, **kw, **option, **{"data.latent_cache_dir": f"{str(cache)!r}"}))
    batches = cached._global_batches()
    cached.train_step(batches)  # the VAE phase reads pixels
    assert not cache.exists()
    cached._finish_vae_phase(batches)
    encoded = []
    encode = cached.bundle.vae.encode
    monkeypatch.setattr(cached.bundle.vae, "encode", lambda x: encoded.append(len(x)) or encode(x))
    cached.train_step(batches)
    if disk:
        folder = cache / encoder_fingerprint(cached.bundle.vae)
        assert cached.dataset.latent_cache_dir == folder and len(list(folder.glob("*.safetensors"))) == 8
    else:
        assert not cache.exists() and len(cached.dataset.latent_memory) == 8
    assert sum(encoded) == 8 * (2 if flip else 1) and max(encoded) == 3
    cached.train_step(batches)
    cached.train_step(batches)
    assert sum(encoded) == 8 * (2 if flip else 1)  # no encoding after the cache is filled
    a, b = plain.bundle.state_dict(), cached.bundle.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_encoder_fingerprint_follows_the_encoder_only(tmp_path, shapes):
    vae = trainer(config(tmp_path, shapes)).bundle.vae
    before = encoder_fingerprint(vae)
    with torch.no_grad():
        vae.decoder.conv_out.weight.add_(1)
        assert encoder_fingerprint(vae) == before
        vae.encoder.conv_in.weight.add_(1e-3)
    assert encoder_fingerprint(vae) != before


@pytest.mark.parametrize("prediction, options", [
    ("eps", {}), ("v", {"zero_terminal_snr": "true"}),
    # kohya's noise and loss options draw from the run's generators too
    ("eps", dict(multires_noise_iterations=6, ip_noise_gamma=0.1, loss_type="'huber'", debiased_estimation_loss="true")),
])
def test_resume_is_exact(tmp_path, shapes, prediction, options):
    kw = dict(steps=3, vae_steps=1, ema_decay=0.9, noise_offset=0.05, min_snr_gamma=5.0, lr_scheduler="'cosine'",
              warmup_steps=1, grad_accum=2, prediction=f"'{prediction}'", **options)
    straight = trainer(config(tmp_path / "a", shapes, **kw))
    straight.train()
    first = trainer(config(tmp_path / "b", shapes, **kw))
    assert first.train(max_steps=2) is None  # stops with a saved state
    resumed = trainer(config(tmp_path / "b", shapes, **kw))
    resumed.train(resume=True)
    assert resumed.progress.step == straight.progress.step == 4
    a, b = straight.bundle.state_dict(), resumed.bundle.state_dict()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-6
    for k in straight.ema:
        torch.testing.assert_close(straight.ema[k], resumed.ema[k], atol=1e-6, rtol=0)
    saved = tmp_path / "b" / "out" / "model.safetensors"
    with safe_open(saved, "pt") as f:
        assert json.loads(f.metadata()["sdlab.config"])["family"] == "sd1"


def test_resume_with_other_settings_says_which(tmp_path, shapes, base_model):
    """A state saved by a run of another shape (here the LoRA rank) cannot be resumed: one line naming
    the settings that differ. Running longer (`steps`) is allowed."""
    kw = dict(mode="'lora'", base_model=f"{str(base_model)!r}", steps=3, **{"lora.rank": 4})
    assert trainer(config(tmp_path, shapes, **kw)).train(max_steps=1) is None  # leaves a state
    with pytest.raises(SdlabError, match=r"saved by a run set up differently \(lora.rank: 4 -> 8\).*another output_dir"):
        trainer(config(tmp_path, shapes, **{**kw, "lora.rank": 8})).train(resume=True)
    longer = trainer(config(tmp_path, shapes, **{**kw, "steps": 4}))
    longer.train(resume=True)
    assert longer.progress.step == 4


def test_interrupted_save_keeps_the_previous_state(tmp_path, shapes, monkeypatch):
    t = trainer(config(tmp_path, shapes, steps=4))
    batches = t._global_batches()
    t.train_step(batches)
    good = t.save_state()
    t.train_step(batches)

    def half_write(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(KeyboardInterrupt):
        t.save_state()
    monkeypatch.undo()
    files = sorted(p.name for p in t.cfg.state_dir.iterdir())
    assert files == [good.name]  # no partial file, no temp file
    fresh = trainer(config(tmp_path, shapes, steps=4))
    fresh.resume()
    assert fresh.progress.step == 1


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("family, clip_skip", [("sd1", 1), ("sd1", 2), ("sd2", 1), ("sd2-v", 2), ("sdxl", 1)])
def test_training_loss_is_diffusers_on_the_layer_sampling_reads(tmp_path, shapes, family, clip_skip):
    """One micro-batch's loss as diffusers' training scripts compute it, on a single-file model:
    SD 2.x conditions on the penultimate text encoder layer + final norm (diffusers' folders hold
    the layers up to it), CLIP skip goes one layer further back as kohya's `--clip_skip`, the noise
    comes from DDPMScheduler.add_noise, the v target from get_velocity. SDXL as
    `train_text_to_image_lora_sdxl.py`: both encoders' penultimate states side by side, the pooled
    projection of the second and the size numbers as `added_cond_kwargs`."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from tests.tiny import diffusers_folder

    bundle, folder = diffusers_folder(tmp_path, family, seed=3)
    single = save_native(bundle, tmp_path / f"{family}.safetensors")
    # A random model's outputs say nothing of its prediction type (loader.looks_like_v_prediction): name it.
    t = trainer(config(tmp_path, shapes, mode="'lora'", base_model=f"{str(single)!r}", clip_skip=clip_skip,
                       prediction=repr(bundle.prediction), **{"lora.rank": 4}))
    module = t.acc.unwrap_model(t.module)
    tokens = t._tokens(["a red circle on a blue background", "a green square"])
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    timesteps = torch.tensor([17, 901])
    sdxl = family == "sdxl"
    size_ids = torch.tensor([[48, 40, 8, 0, 32, 32], [32, 64, 0, 16, 32, 32]]) if sdxl else None
    with torch.no_grad():
        loss = module(latents, tokens, noise, timesteps, t.alphas_cumprod, size_ids)

        if sdxl:
            encoders = [CLIPTextModel.from_pretrained(folder / "text_encoder"),
                        CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")]
            outs = [te.eval()(ids[:, 0], output_hidden_states=True) for te, ids in zip(encoders, tokens)]
            context = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
            added = {"text_embeds": outs[1].text_embeds, "time_ids": size_ids}
        else:
            text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
            hidden = text_encoder(tokens[0][:, 0], output_hidden_states=True).hidden_states[-clip_skip]
            context = getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)  # transformers 4 and 5
            added = None
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = scheduler.get_velocity(latents, noise, timesteps) if bundle.prediction == "v" else noise
        unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
        expected = torch.nn.functional.mse_loss(unet(noisy, timesteps, context, added_cond_kwargs=added).sample, target)
    assert torch.allclose(module.conditioning(tokens)[0], context, atol=1e-5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_long_captions_are_read_in_chunks_as_prompts_are_at_sampling(tmp_path, shapes, family, caplog):
    """max_token_length = 150: a 100-token caption is two 77-token chunks, encoded as the pipeline
    encodes that text as a prompt (context and pooled output), batched with a short one. Every
    caption gets both chunks (an empty one after a short caption, as kohya pads), so its
    conditioning does not depend on its batch. At 75 a long caption is cut, with a warning."""
    from sdlab.pipeline import text_runners
    from sdlab.text.conditioning import encode_all

    single = save_native(tiny_bundle(family), tmp_path / f"{family}.safetensors")
    long = ", ".join(f"tag{i} word{i}" for i in range(20))  # commas near the chunk end, as tag captions have
    captions = [long, "a red circle"]
    t = trainer(config(tmp_path, shapes, mode="'lora'", base_model=f"{str(single)!r}", max_token_length=150))
    tokens = t._tokens(captions)
    assert [tuple(ids.shape) for ids in tokens] == [(2, 2, 77)] * len(t.bundle.text_encoders)
    context, pooled = t.acc.unwrap_model(t.module).conditioning(tokens)
    runners = text_runners(t.bundle)
    for i, text in enumerate(captions):
        expected = encode_all(runners, [r.chunks(text) for r in runners], clip_skip=1)
        n = expected.context.shape[1]
        assert n == (154 if text == long else 77)  # the short caption's second chunk is an empty one, as padded prompts
        assert torch.allclose(context[i, :n], expected.context[0], atol=1e-5)
        assert torch.allclose(pooled[i], expected.pooled[0], atol=1e-5)

    alone = t.acc.unwrap_model(t.module).conditioning(t._tokens(["a red circle"]))
    assert torch.allclose(alone[0][0], context[1], atol=1e-6) and torch.allclose(alone[1][0], pooled[1], atol=1e-6)

    short = trainer(config(tmp_path, shapes, mode="'lora'", base_model=f"{str(single)!r}"))
    with caplog.at_level("WARNING"):
        assert short._tokens(captions)[0].shape == (2, 1, 77)
    assert "captions longer than max_token_length = 75 tokens are cut (1 in this batch)" in caplog.text


def test_lora_file_format_and_base_unchanged(tmp_path, shapes, base_model):
    cfg = config(tmp_path, shapes, mode="'lora'", base_model=f"{str(base_model)!r}", steps=2, **{
        "lora.rank": 4, "lora.alpha": 2, "lora.conv_rank": 2, "lora.train_text_encoder": "true", "save_dtype": "'fp32'",
        "lora.rank_dropout": 0.25})
    t = trainer(cfg)
    base = {k: v.clone() for k, v in t.bundle.state_dict().items()}
    path = t.train()
    assert all(torch.equal(base[k], v) for k, v in t.bundle.state_dict().items())
    with safe_open(path, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha")
        up = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight")
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
                 "lora_unet_mid_block_attentions_0_proj_in", "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_2",
                 "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_up_blocks_0_upsamplers_0_conv",
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_1_mlp_fc2"):
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys, name
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert alpha.item() == 2.0 and up.shape == (32, 4) and up.abs().sum() > 0
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_steps"] == "2" and meta["ss_resolution"] == "(32, 32)" and meta["ss_zero_terminal_snr"] == "False"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0", "rank_dropout": "0.25"}


def test_non_square_resolution_trains_samples_and_is_recorded(tmp_path, shapes, base_model):
    """kohya's resolution = [width, height]: without buckets every batch is that size, the
    validation images default to it, and the metadata says so as kohya writes it."""
    cfg = config(tmp_path, shapes, mode="'lora'", base_model=f"{str(base_model)!r}", steps=1, **{
        "data.resolution": "[64, 32]", "lora.rank": 2, "validation.prompts": "['a red circle']"})
    t = trainer(cfg)
    assert t.dataset[0]["pixels"].shape[-2:] == (32, 64)
    path = t.train()
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_resolution"] == "(64, 32)" and meta["modelspec.resolution"] == "64x32"
    # kohya's flat data-set keys, which the web UIs show for a LoRA
    assert (meta["ss_enable_bucket"], meta["ss_flip_aug"], meta["ss_color_aug"], meta["ss_total_batch_size"],
            meta["ss_min_bucket_reso"]) == ("False", "False", "False", "2", "256")
    samples = list((tmp_path / "out" / "samples").glob("*.png"))
    assert samples and all(Image.open(p).size == (64, 32) for p in samples)


def test_lora_starts_from_network_weights(tmp_path, shapes, base_model, caplog):
    """kohya's --network_weights: a second run starts from the first run's saved LoRA (weights and
    alphas); a file of another rank or for another model is refused with what to change."""
    lora = {"lora.rank": 4, "lora.alpha": 2, "lora.train_text_encoder": "true"}
    first = trainer(config(tmp_path / "a", shapes, mode="'lora'", base_model=f"{str(base_model)!r}", steps=2, lr=5e-2,
                           save_dtype="'fp32'", **lora))
    saved = first.train()
    with caplog.at_level("WARNING"):  # the file has no LoCon modules: those start from zero
        second = trainer(config(tmp_path / "b", shapes, mode="'lora'", base_model=f"{str(base_model)!r}",
                                **{**lora, "lora.alpha": 8, "lora.conv_rank": 2, "lora.network_weights": repr(str(saved))}))
    assert "of this run's modules are not in it and start from zero" in caplog.text
    for name, m in first.lora.loras.items():
        ours = second.lora.loras[name]
        assert torch.equal(ours.lora_down.weight, m.lora_down.weight) and torch.equal(ours.lora_up.weight, m.lora_up.weight)
        assert ours.alpha.item() == 2 and ours.scale == 0.5  # the file's alpha, not this run's 8
    assert any(m.lora_up.weight.abs().sum() > 0 for m in second.lora.loras.values())

    with pytest.raises(SdlabError, match="the file's LoRA has rank 4, this run's 8; set lora.rank = 4"):
        trainer(config(tmp_path / "c", shapes, mode="'lora'", base_model=f"{str(base_model)!r}",
                       **{**lora, "lora.rank": 8, "lora.network_weights": repr(str(saved))}))
    sdxl = save_native(tiny_bundle("sdxl"), tmp_path / "sdxl.safetensors")
    with pytest.raises(SdlabError, match="this model's layer needs .*: a LoRA for another model"):
        trainer(config(tmp_path / "d", shapes, mode="'lora'", base_model=f"{str(sdxl)!r}",
                       **{**lora, "lora.train_text_encoder": "false", "lora.network_weights": repr(str(saved))}))
    unet_only = tmp_path / "unet-only.safetensors"
    save_file({k: v for k, v in load_file(saved).items() if k.startswith("lora_unet_")}, unet_only)
    with pytest.raises(SdlabError, match="none of its modules is one of this run's LoRA modules"):
        trainer(config(tmp_path / "e", shapes, mode="'lora'", base_model=f"{str(base_model)!r}",
                       **{**lora, "lora.train_unet": "false", "lora.network_weights": repr(str(unet_only))}))


def test_network_weights_from_a_diffusers_peft_file(tmp_path, shapes):
    """A LoRA that diffusers saved (PEFT keys `unet.*.lora_A.weight`, alphas in its adapter metadata)
    starts a run with the same updates as the kohya file it came from."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from tests.tiny import diffusers_folder

    _, folder = diffusers_folder(tmp_path, "sd1")
    lora = {"lora.rank": 4, "lora.alpha": 2, "lora.train_text_encoder": "true"}
    first = trainer(config(tmp_path / "a", shapes, mode="'lora'", base_model=f"{str(folder)!r}", steps=2, lr=5e-2,
                           save_dtype="'fp32'", **lora))
    kohya = first.train()
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.load_lora_weights(str(kohya), adapter_name="trained")
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "peft", unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="trained"),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="trained"),
        unet_lora_adapter_metadata=pipe.unet.peft_config["trained"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["trained"].to_dict())
    peft_file = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    with safe_open(peft_file, "pt") as f:
        assert any(k.startswith("unet.") and k.endswith(".lora_A.weight") for k in f.keys())
    second = trainer(config(tmp_path / "b", shapes, mode="'lora'", base_model=f"{str(folder)!r}",
                            **{**lora, "lora.network_weights": repr(str(peft_file))}))
    assert second.lora.loras.keys() == first.lora.loras.keys()
    for name, m in first.lora.loras.items():
        torch.testing.assert_close(second.lora.loras[name].merged_weight_delta(), m.merged_weight_delta(),
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["lora", "finetune"])
def test_gradient_checkpointing_covers_the_text_encoders(tmp_path, shapes, base_model, mode, monkeypatch):
    """With gradient_checkpointing, trained text encoders recompute their layers in backward too
    (kohya's --gradient_checkpointing): the same loss and the same update as without."""
    import sdlab.models.clip as clip

    recomputed = []
    plain_checkpoint = clip.checkpoint
    monkeypatch.setattr(clip, "checkpoint", lambda *a, **k: recomputed.append(1) or plain_checkpoint(*a, **k))
    sets = dict(mode=repr(mode), base_model=f"{str(base_model)!r}", steps=1, lr=5e-2, train_text_encoder="true",
                **{"lora.rank": 4, "lora.train_text_encoder": "true"})
    runs = {}
    for on in (False, True):
        recomputed.clear()
        t = trainer(config(tmp_path / str(on), shapes, gradient_checkpointing=str(on).lower(), **sets))
        loss = t.train_step(t._global_batches())
        runs[on] = (loss, [p.detach().clone() for p in t.trained], len(recomputed))
    assert runs[True][2] == 2 and runs[False][2] == 0  # the tiny text encoder's 2 layers
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6)
    for a, b in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_regularization_images_weight_the_loss(tmp_path, shapes, base_model):
    """DreamBooth's prior preservation: class images in the batches, each sample's loss weighted
    (prior_loss_weight for them), and kohya's counts in the metadata."""
    make_shapes_dataset(tmp_path / "reg" / "2_shape", 3, size=32, seed=7)
    t = trainer(config(tmp_path, shapes, mode="'lora'", base_model=f"{str(base_model)!r}", steps=2,
                       **{"lora.rank": 4, "data.reg_folder": repr(str(tmp_path / "reg")), "data.prior_loss_weight": 0.5}))
    meta = t.lora_metadata()
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"], meta["ss_prior_loss_weight"]) == ("8", "8", "0.5")
    # kohya's per-folder metadata (what the web UIs show as a LoRA's training tags): training images only
    assert json.loads(meta["ss_dataset_dirs"]) == {shapes.name: {"n_repeats": 1, "img_count": 8}}
    tags = json.loads(meta["ss_tag_frequency"])
    captions = [p.read_text().strip() for p in sorted(shapes.glob("*.txt"))]
    assert list(tags) == [shapes.name] and sum(tags[shapes.name].values()) == len(captions)
    assert tags[shapes.name][captions[0]] == captions.count(captions[0])
    assert json.loads(meta["ss_bucket_info"]) == {"buckets": {"0": {"resolution": [32, 32], "count": 16}}}
    module = t.acc.unwrap_model(t.module)
    tokens = t._tokens(["a red circle", "a blue square"])
    g = torch.Generator().manual_seed(0)
    latents, noise, steps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g), torch.tensor([5, 600])
    with torch.no_grad():
        weighted = module(latents, tokens, noise, steps, t.alphas_cumprod, loss_weights=torch.tensor([0.5, 0.0]))
        first = module(latents[:1], [ids[:1] for ids in tokens], noise[:1], steps[:1], t.alphas_cumprod)
    assert weighted.item() == pytest.approx(first.item() * 0.5 / 2, rel=1e-5)  # the mean over the batch of 2
    assert math.isfinite(t.train_step(t._global_batches()))


def test_epochs_set_the_steps_and_save_every_n_epochs(tmp_path, shapes, base_model):
    """kohya's max_train_epochs / save_every_n_epochs / sample_every_n_epochs: 8 images, batches of
    2, 2 accumulated: one epoch is 2 optimizer steps; 3 epochs are 6 steps, saved as kohya names them
    after epoch 2 (and at the end as the plain name), validation images after epoch 2 and at the end."""
    t = trainer(config(tmp_path, shapes, mode="'lora'", base_model=f"{str(base_model)!r}", epochs=3, steps=1,
                       grad_accum=2, save_every_n_epochs=2, **{"lora.rank": 4, "validation.every_n_epochs": 2,
                                                               "validation.prompts": "['a red circle']",
                                                               "validation.steps": 1}))
    assert t.diffusion_steps == t.total_steps == 6
    t.train()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-000002.safetensors", "model.safetensors"]
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step000004-p0-s0.png", "step000006-p0-s0.png"]
    assert t.lora_metadata()["ss_max_train_steps"] == "6" and t.lora_metadata()["ss_epoch"] == "3"


@pytest.mark.parametrize("save_as", ["ckpt", "diffusers"])
def test_save_model_as_ckpt_or_diffusers_folder(tmp_path, shapes, save_as):
    """kohya's save_model_as: the trained model as a .ckpt (a pickle of tensors only) or a diffusers
    folder; each loads back to the trained weights, and saving again replaces it whole."""
    from sdlab.checkpoints.loader import load_bundle

    t = trainer(config(tmp_path, shapes, steps=2, save_model_as=f"'{save_as}'", save_dtype="'fp32'"))
    path = t.train()
    assert path == tmp_path / "out" / ("model.ckpt" if save_as == "ckpt" else "model")
    assert t.save_model() == path
    trained, back = t.bundle.state_dict(), load_bundle(path, device="cpu")
    assert back.config.unet == t.bundle.config.unet
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0, msg=k)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")) == []  # no temp folders


def test_train_command_flags_and_sets(tmp_path, shapes, base_model, capsys):
    """`sdlab train` with no config file: flags and --set make the whole config."""
    from sdlab.cli import build_parser

    args = build_parser().parse_args([
        "train", "--mode", "lora", "--base-model", str(base_model), "--data", str(shapes), "--epochs", "1",
        "--batch-size", "4", "--output-dir", str(tmp_path / "o"), "--output-name", "x",
        "--set", "lora.rank=4", "--set", "data.resolution=32", "--set", "data.enable_bucket=false"])
    args.func(args)
    assert f"wrote {tmp_path / 'o' / 'x.safetensors'}" in capsys.readouterr().out
    with safe_open(tmp_path / "o" / "x.safetensors", "pt") as f:
        meta = f.metadata()
    assert (meta["ss_max_train_steps"], meta["ss_network_dim"], meta["ss_batch_size_per_device"]) == ("2", "4", "4")


def test_lora_loads_in_diffusers_like_merging(tmp_path, shapes, base_model):
    diffusers = pytest.importorskip("diffusers")
    from sdlab.checkpoints.diffusers_folder import write_diffusers_folder
    from sdlab.checkpoints.loader import load_bundle

    cfg = config(tmp_path, shapes, mode="'lora'", base_model=f"{str(base_model)!r}", steps=2, lr=5e-2,
                 save_dtype="'fp32'", **{"lora.rank": 4, "lora.alpha": 2})
    t = trainer(cfg)
    path = t.train()
    bundle = load_bundle(base_model, device="cpu", dtype=torch.float32)
    write_diffusers_folder(bundle.state_dict(), bundle.config, tmp_path / "pipe")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None)
    g = torch.Generator().manual_seed(0)
    x, ctx, ts = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 64, generator=g), torch.tensor([500.0])
    with torch.no_grad():
        plain = pipe.unet(x, ts, ctx).sample
        pipe.load_lora_weights(str(path))
        theirs = pipe.unet(x, ts, ctx).sample
        t.lora.merge()
        ours = t.bundle.unet(x, ts, ctx)
    assert (theirs - plain).abs().max() > 1e-3  # the LoRA does something...
    assert (theirs - ours).abs().max() < 1e-4  # ...and the same thing in both


def test_sdxl_lora_in_kohyas_sdxl_names_loads_in_diffusers_and_sdlab(tmp_path, shapes):
    """An SDXL LoRA with LoCon, UNet only (kohya's --network_train_unet_only), trained on a single file:
    kohya's SDXL names (the original UNet's module paths), SDXL metadata, and the same UNet
    outputs merged here, through diffusers' `load_lora_weights` and through sdlab's LoRA loader."""
    from diffusers import StableDiffusionXLPipeline

    from sdlab.checkpoints.loader import load_bundle
    from sdlab.lora import apply_loras, load_lora
    from tests.tiny import diffusers_folder

    bundle, folder = diffusers_folder(tmp_path, "sdxl")
    single = save_native(bundle, tmp_path / "sdxl.safetensors")
    cfg = config(tmp_path, shapes, mode="'lora'", base_model=f"{str(single)!r}", steps=2, lr=5e-2, save_dtype="'fp32'",
                 **{"lora.rank": 4, "lora.alpha": 2, "lora.conv_rank": 2, "lora.conv_alpha": 2})
    t = trainer(cfg)
    path = t.train()
    with safe_open(path, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_output_blocks_0_0_in_layers_2.lora_up.weight" in keys  # LoCon on a ResBlock conv
    assert {k.split("_")[2] for k in keys} == {"input", "middle", "output"}  # the UNet only
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    x, ctx, y = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 128, generator=g), torch.randn(1, 64 + 6 * 256, generator=g)
    ts = torch.tensor([500.0])
    # diffusers embeds the six size numbers itself: hand both UNets the same y.
    pipe.unet.add_embedding.linear_1.register_forward_pre_hook(lambda m, args: (y,))
    added = {"text_embeds": y[:, :64], "time_ids": torch.zeros(1, 6)}
    ours_loaded = load_bundle(single, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        plain = pipe.unet(x, ts, ctx, added_cond_kwargs=added).sample
        pipe.load_lora_weights(str(path))
        theirs = pipe.unet(x, ts, ctx, added_cond_kwargs=added).sample
        t.lora.merge()
        merged = t.bundle.unet(x, ts, ctx, y)
        with apply_loras(ours_loaded, [(load_lora(path), 1.0, 1.0)]) as applied:
            assert not applied.unmatched
            loaded = ours_loaded.unet(x, ts, ctx, y)
    assert (theirs - plain).abs().max() > 1e-3  # the LoRA does something...
    assert (theirs - merged).abs().max() < 1e-4  # ...and the same thing in all three
    assert (loaded - merged).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_text_encoder_lora_on_openclip_loads_in_diffusers_and_sdlab(tmp_path, shapes, family):
    """A LoRA on the UNet and the text encoders of SD 2.x (OpenCLIP-H) and SDXL (CLIP-L and bigG), with
    OpenCLIP's fused q, k, v trained as kohya's separate q_proj / k_proj / v_proj: each encoder's
    conditioning (the states the UNet reads, and SDXL's pooled projection) merged here equals
    diffusers' after `load_lora_weights` and sdlab's LoRA loader's. Only the layers the
    conditioning depends on get LoRA: SD 2.x reads the penultimate layer (its diffusers folder
    stops there), SDXL's CLIP-L too, while bigG's pooled output needs its last."""
    import diffusers

    from sdlab.checkpoints.loader import load_bundle
    from sdlab.lora import apply_loras, load_lora
    from tests.tiny import diffusers_folder

    bundle, folder = diffusers_folder(tmp_path, family)
    single = save_native(bundle, tmp_path / f"{family}.safetensors")
    cfg = config(tmp_path, shapes, mode="'lora'", base_model=f"{str(single)!r}", steps=3, lr=5e-2, save_dtype="'fp32'",
                 **{"lora.rank": 4, "lora.alpha": 4, "lora.train_text_encoder": "true"})
    t = trainer(cfg)
    path = t.train()
    with safe_open(path, "pt") as f:
        keys = {k.removesuffix(".lora_up.weight") for k in f.keys() if k.endswith(".lora_up.weight")}
    prefixes = ["lora_te_"] if family == "sd2" else ["lora_te1_", "lora_te2_"]
    layers = {p: {int(k.split("_layers_")[1].split("_")[0]) for k in keys if k.startswith(p)} for p in prefixes}
    assert layers == ({"lora_te_": {0, 1}} if family == "sd2" else {"lora_te1_": {0}, "lora_te2_": {0, 1, 2}})
    for x in "qkv":
        name = f"{prefixes[-1]}text_model_encoder_layers_0_self_attn_{x}_proj"
        assert name in keys and t.lora.loras[name].lora_up.weight.abs().sum() > 0  # trained through the fused rows

    pipeline = diffusers.StableDiffusionPipeline if family == "sd2" else diffusers.StableDiffusionXLPipeline
    pipe = pipeline.from_pretrained(folder, **({"safety_checker": None} if family == "sd2" else {}))
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    ids = [tok(["a red circle on a blue background"]) for tok in t.bundle.tokenizers]
    skip = 2  # the family's layer: penultimate (+ final norm for SD 2.x, whose folder holds the layers up to it)

    def theirs() -> list[Tensor]:
        outs = [te(i, output_hidden_states=True) for te, i in zip(encoders, ids)]
        if family == "sd2":
            return [outs[0].last_hidden_state]
        return [outs[0].hidden_states[-2], outs[1].hidden_states[-2], outs[1].text_embeds]

    def ours(text_encoders) -> list[Tensor]:
        outs = [te(i, skip=skip, final_norm=family == "sd2") for te, i in zip(text_encoders, ids)]
        return [o.hidden for o in outs] + ([outs[-1].pooled] if family == "sdxl" else [])

    loaded = load_bundle(single, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        before = theirs()
        pipe.load_lora_weights(str(path))
        after = theirs()
        t.lora.merge()
        merged = ours(t.bundle.text_encoders)
        with apply_loras(loaded, [(load_lora(path), 1.0, 1.0)]) as applied:
            assert not applied.unmatched
            via_loader = ours(loaded.text_encoders)
    for b, a, m, v in zip(before, after, merged, via_loader):
        assert (a - b).abs().max() > 1e-3  # the LoRA changes every output...
        assert (a - m).abs().max() < 1e-4  # ...the same way in all three
        assert (v - m).abs().max() < 1e-5


def test_unsupported_models_are_refused_at_the_start(tmp_path, shapes):
    for family, message in [("sd1-inpaint", "training inpainting models is not supported; train its base model"),
                            ("sdxl-refiner", "training the SDXL refiner is not supported")]:
        single = save_native(tiny_bundle(family), tmp_path / f"{family}.safetensors")
        with pytest.raises(SdlabError, match=message):
            trainer(config(tmp_path, shapes, mode="'lora'", base_model=repr(str(single))))
    with pytest.raises(SdlabError, match="model.family must be one of sd1, sd2, sd2-v in scratch mode, got 'sdxl'"):
        trainer(config(tmp_path, shapes, **{"model.family": "'sdxl'"}))


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one mixed-precision setting per process: start and leave this test's own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_lora_mixed_precision_keeps_the_frozen_base_in_that_dtype(tmp_path, shapes, base_model, fresh_accelerate,
                                                                  monkeypatch, caplog):
    """As diffusers' and kohya's LoRA scripts: the frozen UNet and text encoder in bf16, the LoRA in fp32,
    the VAE as loaded. The step's loss is autocast's with the fp32 base to bf16 rounding (autocast casts
    the matrix products' weights to the same values; the norms and embeddings see rounded weights).
    On a CPU without bf16 hardware the run says it will be slow."""
    cfg = config(tmp_path, shapes, mode="'lora'", base_model=f"{str(base_model)!r}", steps=2, mixed_precision="'bf16'",
                 **{"lora.rank": 4, "lora.alpha": 4, "lora.train_text_encoder": "true",
                    "validation.prompts": "['a red circle']", "validation.steps": 2})
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="sdlab.training.trainer"):
        m.setattr(devices, "cpu_flags", lambda cpuinfo=None: frozenset({"avx2"}))
        t = trainer(cfg)
    assert 'bf16 runs emulated, many times slower than fp32; set mixed_precision = "no"' in caplog.text
    b = t.bundle
    assert {p.dtype for net in (b.unet, *b.text_encoders) for p in net.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in b.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in t.lora.parameters()} == {torch.float32}
    loss = t.train_step(t._global_batches())

    reference = trainer(cfg)  # the same run with the base left in fp32: autocast casts per op
    for net in (reference.bundle.unet, *reference.bundle.text_encoders):
        net.float()
    reference_loss = reference.train_step(reference._global_batches())
    assert loss == pytest.approx(reference_loss, rel=2e-3)  # a bf16 rounding step is 2 ** -9 = 2e-3
    ups = [p for n, p in t.lora.named_parameters() if n.endswith("lora_up.weight")]
    assert all(p.dtype == torch.float32 for p in ups) and any(p.abs().sum() > 0 for p in ups)  # trained off zero
    with safe_open(t.train(), "pt") as f:  # the rest of the run, and the saved LoRA
        assert len(f.keys()) == 3 * len(t.lora.loras)
    assert len(t.validate()) == 1  # sampling with the bf16 base and the fp32 LoRA (a failure gives none)


def test_trained_lora_tag_matches_diffusers_images(tmp_path, shapes):
    """A LoRA (UNet with LoCon + text encoder) from our trainer, used as `<lora:trained:1>` in our pipeline,
    gives diffusers' images (`load_lora_weights` + `fuse_lora`) to 1/255."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from sdlab.checkpoints.loader import load_bundle
    from sdlab.models_dir import ModelsDir
    from sdlab.pipeline import GenerationRequest, Pipeline
    from tests.tiny import as_float_array, diffusers_folder, euler_karras

    _, folder = diffusers_folder(tmp_path, "sd1")
    root = tmp_path / "models"
    cfg = config(tmp_path, shapes, mode="'lora'", base_model=f"{str(folder)!r}", steps=3, lr=5e-2,
                 output_dir=f"{str(root / 'Lora')!r}", output_name="'trained'", save_dtype="'fp32'",
                 **{"lora.rank": 4, "lora.alpha": 4, "lora.conv_rank": 4, "lora.conv_alpha": 4,
                    "lora.train_text_encoder": "true"})
    lora = trainer(cfg).train()
    assert lora == root / "Lora" / "trained.safetensors"

    prompt, size = "a red circle on a blue background", 64
    theirs = euler_karras(StableDiffusionPipeline.from_pretrained(folder, safety_checker=None))
    theirs.load_lora_weights(str(lora))
    theirs.fuse_lora(lora_scale=1.0)
    expected = theirs(prompt, num_inference_steps=3, guidance_scale=7.0, height=size, width=size,
                      generator=torch.Generator("cpu").manual_seed(9), output_type="np").images

    pipe = Pipeline(load_bundle(folder, device="cpu"), models=ModelsDir(root))
    params = dict(steps=3, sampler="Euler", schedule="karras", cfg_scale=7.0, seed=9, width=size, height=size)
    plain = pipe.generate(GenerationRequest(prompt, **params))
    ours = pipe.generate(GenerationRequest(prompt + " <lora:trained:1>", **params))
    # A tiny random model's VAE flattens everything (a new prompt changes no pixel), so the LoRA
    # moves the image by about 1/255 here; test_lora_loads_in_diffusers_like_merging checks the
    # UNet outputs to 1e-4. What this adds: the file goes through both loaders, LoCon included.
    assert not np.array_equal(np.asarray(ours.images[0]), np.asarray(plain.images[0]))
    assert np.abs(as_float_array(ours.images) - expected).max() <= 1 / 255


# ----------------------------------------------------------------------------- many processes

_DDP_SCRIPT = """
import json, sys
from sdlab.training.config import SamplePrompt, load_config, parse_sample_prompt
from sdlab.training.trainer import Trainer, lr_lambda
cfg = load_config(None, sys.argv[2:])
t = Trainer(cfg, progress_bar=False)
batches = t._global_batches()
losses = [t.train_step(batches) for _ in range(2)]
if t.acc.is_main_process:
    json.dump({"losses": losses, "world": t.world}, open(sys.argv[1], "w"))
t.close()
"""


def _free_port() -> int:
    # A fixed port collides with other test runs on a shared machine.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_two_processes_match_one(tmp_path: Path, sets: list[str], one_process, timeout: float = 300):
    """Two gloo processes with batch 1 each (`sets`, as `--set` arguments, for `_DDP_SCRIPT`) give
    the losses of one process with batch 2 (`one_process()`, a Trainer built here, meanwhile: a
    third interpreter costs seconds) over two steps. Returns the one-process Trainer."""
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    two_procs = subprocess.Popen([*torchrun, str(script), str(tmp_path / "two.json"), *sets], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        one = one_process()
        batches = one._global_batches()
        one_losses = [one.train_step(batches) for _ in range(2)]
        _, err = two_procs.communicate(timeout=timeout)
    finally:
        two_procs.kill()
    assert two_procs.returncode == 0, err[-4000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world"] == 2 and one.world == 1
    assert two["losses"] == pytest.approx(one_losses, rel=1e-4)
    return one


@pytest.mark.parametrize("model", ["scratch", "sdxl-finetune-text-encoders", "sdxl-lora-text-encoders",
                                   "sdxl-embedding"])
def test_two_processes_match_one(tmp_path, shapes, model):
    """2 gloo processes with batch 1 each == 1 process with batch 2 (same global batches and noise).
    Fine-tuned SDXL text encoders have parameters no gradient reaches (CLIP-L's last layer and final
    norm): DDP must be told, or its second step fails."""
    common = {"lr": "1e-3", "steps": 2}
    if model == "scratch":  # adaptive noise reads every rank's latents; multires noise rescales the global batch
        common.update(noise_offset=0.1, adaptive_noise_scale=0.5, multires_noise_iterations=3)
    else:
        single = save_native(tiny_bundle("sdxl"), tmp_path / "sdxl.safetensors")
        common.update(base_model=repr(str(single)))
        if model == "sdxl-finetune-text-encoders":
            common.update(mode="'finetune'", train_text_encoder="true")
        elif model == "sdxl-embedding":  # textual inversion: both encoders' vectors
            common.update(mode="'embedding'", **{"embedding.token_string": "'sksobj'", "embedding.init_word": "'shape'",
                                                 "embedding.num_vectors": 2})
        else:
            common.update(mode="'lora'", **{"lora.rank": 4, "lora.train_text_encoder": "true"})
    sets = [f"data.folder={str(shapes)!r}", "data.resolution=32", "data.enable_bucket=false", "mode='scratch'",
            "model.preset='tiny'", "batch_size=1", f"output_dir={str(tmp_path / 'two')!r}"]
    sets += [f"{k}={v}" for k, v in common.items()]
    assert_two_processes_match_one(tmp_path, sets,
                                   lambda: trainer(config(tmp_path / "one", shapes, batch_size=2, **common)), timeout=120)


def test_fp8_base_trains_as_a_base_rounded_to_fp8(tmp_path, shapes, fresh_accelerate):
    """kohya's fp8_base: the frozen UNet's and text encoder's matrices stay in fp8 and are upcast to
    bf16 as each layer runs, so a LoRA trains exactly as on a bf16 base whose matrices were rounded
    to fp8 (the same losses and LoRA weights, bit for bit), with one byte per matrix weight at rest."""
    bundle = tiny_bundle("sd1", seed=0)
    base = save_native(bundle, tmp_path / "base.safetensors")
    rounded = save_native(rounded_through(bundle, torch.float8_e4m3fn), tmp_path / "rounded.safetensors")
    runs = {}
    for name, model, fp8 in (("fp8", base, "true"), ("rounded", rounded, "false")):
        cfg = config(tmp_path / name, shapes, mode="'lora'", base_model=f"{str(model)!r}", steps=2,
                     mixed_precision="'bf16'", fp8_base=fp8, save_dtype="'fp32'", gradient_checkpointing="true",
                     **{"lora.rank": 4, "lora.alpha": 4, "lora.train_text_encoder": "true"})
        t = trainer(cfg)
        losses = [t.train_step(t._global_batches()) for _ in range(2)]
        runs[name] = (t, losses, {k: v.clone() for k, v in t.lora.state_dict().items()})
    t, losses, lora = runs["fp8"]
    assert t.bundle.unet.input_blocks[1][1].proj_in.weight.dtype == torch.float8_e4m3fn
    assert t.bundle.text_encoders[0].text_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.float8_e4m3fn
    assert losses == runs["rounded"][1]
    assert all(torch.equal(v, runs["rounded"][2][k]) for k, v in lora.items())
    with safe_open(t.train(), "pt") as f:
        assert f.metadata()["ss_fp8_base"] == "True"
    with pytest.raises(SdlabError, match="fp8_base"):
        config(tmp_path, shapes, mode="'lora'", base_model=f"{str(base)!r}", fp8_base="true")
