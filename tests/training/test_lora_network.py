"""The training LoRA's forward hook: `base(x) + up(down(x)) * alpha / rank`, the gradients of
the input and both LoRA weights included, however the update is accumulated."""

from __future__ import annotations

import pytest
import torch
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
