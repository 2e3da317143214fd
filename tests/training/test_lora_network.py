"""The training LoRA's forward hook: `base(x) + up(down(x)) * alpha / rank`, the gradients of
the input and both LoRA weights included, however the update is accumulated."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdlab.training.lora_network import LoRAModule


def _plain(base: nn.Linear, lora: LoRAModule, x: torch.Tensor) -> torch.Tensor:
    return base(x) + lora.lora_up(lora.lora_down(x)) * lora.scale


def _run(fn, x: torch.Tensor, lora: LoRAModule, transpose_out: bool):
    for p in lora.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    out = fn(x)
    # Attention hands its gradient back in a transposed layout: a non-contiguous gradient.
    used = out.transpose(-1, -2).contiguous().transpose(-1, -2) if transpose_out else out
    used.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return out.detach(), x.grad, lora.lora_down.weight.grad, lora.lora_up.weight.grad


@pytest.mark.parametrize("bias", [True, False])  # with a bias, F.linear returns a view of its matmul
@pytest.mark.parametrize("shape", [(2, 7, 12), (1, 9, 12), (5, 12)])
@pytest.mark.parametrize("transpose_out", [False, True])
def test_lora_hook_equals_base_plus_scaled_update(bias, shape, transpose_out):
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=bias).requires_grad_(False)
    lora = LoRAModule(base, rank=4, alpha=2.0)
    nn.init.normal_(lora.lora_up.weight)  # not the zero init: the update must show
    x = torch.randn(shape)
    handle = base.register_forward_hook(lora.hook)
    ours = _run(base, x, lora, transpose_out)
    handle.remove()
    theirs = _run(lambda t: _plain(base, lora, t), x, lora, transpose_out)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_rank_and_module_dropout_are_kohyas(kind):
    """kohya's LoRAModule.forward while training: the update is skipped when torch.rand(1) <
    module_dropout; the rank activations are multiplied by rand((B, rank)) > rank_dropout (whole
    ranks of a sample) and the update scaled by 1 / (1 - rank_dropout). In eval neither acts."""
    torch.manual_seed(0)
    base = (nn.Linear(12, 10) if kind == "linear" else nn.Conv2d(6, 5, 3, padding=1)).requires_grad_(False)
    lora = LoRAModule(base, rank=4, alpha=2.0, rank_dropout=0.5, module_dropout=0.3)
    nn.init.normal_(lora.lora_up.weight)
    x = torch.randn(3, 7, 12) if kind == "linear" else torch.randn(3, 6, 8, 8)

    def kohya(x):  # networks/lora.py, in training
        org = base(x)
        if torch.rand(1) < 0.3:
            return org
        lx = lora.lora_down(x)
        mask = torch.rand((lx.size(0), 4)) > 0.5
        mask = mask.unsqueeze(1) if lx.dim() == 3 else mask.unsqueeze(-1).unsqueeze(-1)
        return org + lora.lora_up(lx * mask) * lora.multiplier * (lora.scale * (1.0 / (1.0 - 0.5)))

    skipped = []
    for seed in range(8):
        torch.manual_seed(seed)
        expected = kohya(x)
        handle = base.register_forward_hook(lora.hook)
        torch.manual_seed(seed)
        ours = base(x)
        handle.remove()
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
        skipped.append(torch.equal(ours, base(x)))
    assert any(skipped) and not all(skipped)
    lora.eval()
    expected = base(x) + lora.lora_up(lora.lora_down(x)) * lora.scale
    handle = base.register_forward_hook(lora.hook)
    torch.testing.assert_close(base(x), expected, rtol=1e-5, atol=1e-6)
    handle.remove()


def test_lora_hook_under_autocast_matches_the_unfused_update():
    """Under bf16 autocast the update is accumulated in bf16 into the base output, as the
    separate ops would compute it (to bf16 rounding); LoRA weight gradients stay fp32."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10).requires_grad_(False)
    lora = LoRAModule(base, rank=4, alpha=4.0)
    nn.init.normal_(lora.lora_up.weight)
    x = torch.randn(2, 7, 12)
    handle = base.register_forward_hook(lora.hook)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _run(base, x, lora, transpose_out=False)
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = _run(lambda t: base(t) + (lora.lora_up(lora.lora_down(t)) * lora.scale).to(torch.bfloat16), x, lora, False)
    assert ours[0].dtype == torch.bfloat16 and ours[2].dtype == ours[3].dtype == torch.float32
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_lora_gradients_are_the_same_with_gradient_checkpointing():
    """The in-place update must survive the UNet's checkpointed blocks being run again in backward."""
    from sdlab.training.lora_network import LoRANetwork
    from tests.models.test_unet import TINY, inputs, random_unet

    cfg = TINY["sd2-style"]
    model = random_unet(cfg).train().requires_grad_(False)
    torch.manual_seed(0)
    lora = LoRANetwork(model, None, rank=4, alpha=4, conv_rank=2, conv_alpha=2)
    for m in lora.loras.values():
        nn.init.normal_(m.lora_up.weight, std=0.1)
    lora.apply()
    x, t, context = inputs(cfg)
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        lora.zero_grad()
        model(x, t, context).square().mean().backward()
        grads.append([p.grad.clone() for p in lora.parameters() if p.requires_grad])
    assert len(grads[0]) == 2 * len(lora.loras) and all(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("conv_path", ["as configured", "every conv as a matmul", "every input gradient as a flipped conv"])
def test_lora_training_gradients_match_diffusers_and_peft(monkeypatch, conv_path):
    """One LoRA training step's loss and LoRA gradients on an SD 1.x-style UNet equal diffusers'
    UNet2DConditionModel with the same LoRA through PEFT (as its train_text_to_image_lora.py),
    through every frozen-base shortcut the training forward takes: the convolutions that keep
    nothing, the transformer's projections as one product, the norms computed again for the
    LoRA, the lean feed-forward. The tiny sizes would not reach the thresholds of the matmul and
    flipped-weight convolutions, so two runs lower them to cover those paths too."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    from sdlab.models import layers
    from sdlab.training.lora_network import LoRANetwork
    from tests.models.test_unet import TINY, diffusers_twin, inputs, random_unet

    if conv_path == "every conv as a matmul":
        monkeypatch.setattr(layers, "_MATMUL_MIN_REDUCTION", 1)
        monkeypatch.setattr(layers, "_MATMUL_MAX_POSITIONS", 10**9)
    elif conv_path == "every input gradient as a flipped conv":
        monkeypatch.setattr(layers, "_FLIP_MIN_POSITIONS", 1)
    model = random_unet(TINY["sd1-style"]).train().requires_grad_(False)
    reference = diffusers_twin(model).train().requires_grad_(False)
    torch.manual_seed(0)
    lora = LoRANetwork(model, None, rank=4, alpha=4, only=r"attn[12]_to_(q|k|v|out_0)$")
    reference.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    pairs = []
    for name, module in reference.named_modules():
        if hasattr(module, "lora_A"):
            ours = lora.loras["lora_unet_" + name.replace(".", "_")]
            nn.init.normal_(ours.lora_up.weight, std=0.1)
            module.lora_A["default"].weight.data.copy_(ours.lora_down.weight)
            module.lora_B["default"].weight.data.copy_(ours.lora_up.weight)
            pairs.append((ours, module))
    assert len(pairs) == len(lora.loras) > 0
    lora.apply()
    x, t, context = inputs(model.cfg)
    x = x.requires_grad_(False)
    target = torch.randn_like(x)
    loss = F.mse_loss(model(x, t, context), target)
    loss.backward()
    reference_loss = F.mse_loss(reference(x, t, context).sample, target)
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    for ours, theirs in pairs:
        assert ours.lora_down.weight.grad.abs().sum() > 0
        torch.testing.assert_close(ours.lora_down.weight.grad, theirs.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.lora_up.weight.grad, theirs.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
