"""kohya's block-wise LoRA (ranks, alphas and learning-rate weights per UNet block) and LoRA+,
checked against kohya's formulas written out here (`networks/lora.py`)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdlab.errors import SdlabError
from sdlab.lora import apply_loras, load_lora
from sdlab.models.unet import PRESETS, UNet
from sdlab.training.lora_blocks import block_count, block_index, block_ranks, lr_weights
from sdlab.training.lora_network import _unet_targets, unet_kohya_names
from tests.training.test_trainer import config, trainer

_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def _kohya_block_index(lora_name: str, sdxl: bool) -> int:
    """kohya's `get_block_index`, on its LoRA names."""
    if not sdxl:
        m = _RE_UPDOWN.search(lora_name)
        if m:
            kind, i, part, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            idx = 3 * i + (2 if part in ("upsamplers", "downsamplers") else j)
            return 1 + idx if kind == "down" else 12 + 1 + idx
        return 12 if "mid_block_" in lora_name else -1
    name = lora_name[len("lora_unet_"):]
    for start, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(start):
            return first + int(name.split("_")[2])
    return -1


@pytest.mark.parametrize("preset, sdxl", [("sd15", False), ("sd21", False), ("sdxl", True)])
def test_block_numbers_are_kohyas(preset, sdxl):
    """Every layer kohya puts LoRA on (LoCon included) gets the block number kohya's
    `get_block_index` reads off its kohya name (diffusers spelling for SD 1.x / 2.x, the original
    one for SDXL)."""
    with torch.device("meta"):
        unet = UNet(PRESETS[preset])
    paths = [p for p, _, _ in _unet_targets(unet, conv=True)]
    names = unet_kohya_names(unet, paths, "original" if sdxl else "diffusers")
    got = {names[p]: block_index(p, sdxl) for p in paths}
    want = {names[p]: _kohya_block_index(names[p], sdxl) for p in paths}
    assert got == want
    assert set(got.values()) <= set(range(block_count(sdxl)))
    assert block_count(sdxl) == (23 if sdxl else 25)


def _kohya_curve(name: str, base: float, n: int) -> list[float]:
    if name == "cosine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + base for i in reversed(range(n))]
    if name == "sine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + base for i in range(n)]
    if name == "linear":
        return [i / (n - 1) + base for i in range(n)]
    if name == "reverse_linear":
        return [i / (n - 1) + base for i in reversed(range(n))]
    return [0.0 + base] * n


@pytest.mark.parametrize("sdxl", [False, True])
@pytest.mark.parametrize("curve", ["cosine", "sine", "linear", "reverse_linear", "zeros+0.25"])
def test_learning_rate_weights_are_kohyas(sdxl, curve):
    side, middle = (9, 3) if sdxl else (12, 1)
    name, _, base = curve.partition("+")
    want_down = _kohya_curve(name, float(base or 0), side)
    want = want_down + [0.5] * middle + [1.0] * side
    if sdxl:
        want = [1.0] + want + [1.0]
    got = lr_weights(sdxl, curve, [0.5] * middle, None)
    assert got == pytest.approx(want)
    # Lists: too short is filled with 1, empty items and values not above the threshold are 0.
    got = lr_weights(sdxl, "0.5,,0.05", None, [2.0], zero_threshold=0.1)
    first = 1 if sdxl else 0
    assert got[first:first + side] == [0.5, 0.0, 0.0] + [1.0] * (side - 3)
    assert got[first + side + middle:][:side] == [2.0] + [1.0] * (side - 1)
    assert lr_weights(sdxl, None, None, None) is None


def test_block_ranks_follow_kohyas_rules():
    dims = list(range(25))
    ranks = block_ranks(False, 8, 4.0, 2, 1.0, dims, None, None, None,
                        lr_weights(False, "zeros+1", None, [0.0] + [1.0] * 11))
    assert ranks.rank("input_blocks.4.1.proj_in", conv3=False) == (4, 4.0)  # block_dims, the default alpha
    assert ranks.rank("input_blocks.4.0.in_layers.2", conv3=True) == (2, 1.0)  # conv_dim for every block
    assert ranks.rank("output_blocks.0.1.proj_out", conv3=False) == (0, 4.0)  # lr weight 0: no LoRA
    assert ranks.rank("middle_block.1.proj_in", conv3=False) == (12, 4.0)
    assert ranks.rank("time_embed.0", conv3=False)[0] == 0
    assert block_ranks(False, 8, 4.0, 0, 1.0, None, None, None, None, None) is None
    with pytest.raises(SdlabError, match="25 blocks"):
        block_ranks(False, 8, 4.0, 0, 1.0, [4] * 23, None, None, None, None)
    with pytest.raises(SdlabError, match="need lora.block_dims"):
        block_ranks(False, 8, 4.0, 0, 1.0, None, [1.0] * 25, None, None, None)
    with pytest.raises(SdlabError, match="sine, linear"):
        lr_weights(False, "quadratic", None, None)


def test_block_wise_lora_trains_loads_in_diffusers_and_takes_loraplus(tmp_path, shapes, base_model):
    """A tiny SD 1.x LoRA with kohya's block_dims, block_alphas, down/up learning-rate weights and
    LoRA+: each block's modules have its rank and alpha (none where the weight is 0), the optimizer
    has each block's learning rate (lora_up at lr x ratio), the metadata records the arguments as
    kohya writes them, and the file applied by sdlab's loader and by diffusers' `load_lora_weights`
    gives what the trained network merged gives."""
    diffusers = pytest.importorskip("diffusers")
    from sdlab.checkpoints.diffusers_folder import write_diffusers_folder
    from sdlab.checkpoints.loader import load_bundle

    # The tiny UNet: input blocks 1 and 3 and output blocks 0-3 have attention; 12 is the middle.
    dims = [0] * 25
    dims[1], dims[3], dims[12], dims[13], dims[14] = 2, 3, 4, 1, 2
    alphas = [float(d) for d in range(25)]
    cfg = config(tmp_path, shapes, mode="'lora'", base_model=f"{str(base_model)!r}", steps=2, lr=5e-2,
                 save_dtype="'fp32'", **{"lora.block_dims": f"'{','.join(map(str, dims))}'",
                                         "lora.block_alphas": str(alphas),
                                         "lora.down_lr_weight": "'1,1,1,0'", "lora.up_lr_weight": "[0.5, 0.25]",
                                         "lora.loraplus_lr_ratio": 4})
    t = trainer(cfg)
    path = t.train()
    with safe_open(path, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        ranks = {k.removesuffix(".lora_down.weight"): f.get_tensor(k).shape[0] for k in keys if k.endswith("lora_down.weight")}
        alpha = {k.removesuffix(".alpha"): f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    by_block = {}
    for name, r in ranks.items():
        block = _kohya_block_index(name, sdxl=False)
        by_block.setdefault(block, set()).add(r)
        assert alpha[name] == alphas[block]
    assert by_block == {1: {2}, 12: {4}, 13: {1}, 14: {2}}  # block 3's learning-rate weight is 0
    lrs = sorted({round(g["initial_lr"], 6) for g in t.optimizer.param_groups})
    assert lrs == sorted({5e-2, 5e-2 * 4, 5e-2 * 0.5, 5e-2 * 0.5 * 4, 5e-2 * 0.25, 5e-2 * 0.25 * 4})
    args = json.loads(meta["ss_network_args"])
    assert args["block_dims"] == ",".join(map(str, dims)) and args["down_lr_weight"] == "1.0,1.0,1.0,0.0"
    assert args["up_lr_weight"] == "0.5,0.25" and float(args["loraplus_lr_ratio"]) == 4

    # sdlab's LoRA loader (kohya's alpha / rank per module, as the web UIs apply it) gives the merge.
    bundle = load_bundle(base_model, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x, ctx, ts = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 64, generator=g), torch.tensor([500.0])
    with torch.no_grad():
        with apply_loras(bundle, [(load_lora(path), 1.0, 1.0)]) as applied:
            assert not applied.unmatched
            loaded = bundle.unet(x, ts, ctx)
        # diffusers 0.42 applies one alpha to every UNet module of a kohya file (its alpha_pattern
        # misses them); the same deltas with every alpha 1 and up x alpha show the ranks load right.
        tensors = load_file(path)
        for name in ranks:
            tensors[f"{name}.lora_up.weight"] = tensors[f"{name}.lora_up.weight"] * tensors[f"{name}.alpha"]
            tensors[f"{name}.alpha"] = torch.tensor(1.0)
        save_file(tensors, tmp_path / "alpha1.safetensors")
        write_diffusers_folder(bundle.state_dict(), bundle.config, tmp_path / "pipe")
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None)
        plain = pipe.unet(x, ts, ctx).sample
        pipe.load_lora_weights(str(tmp_path / "alpha1.safetensors"))
        theirs = pipe.unet(x, ts, ctx).sample
        t.lora.merge()
        ours = t.bundle.unet(x, ts, ctx)
    assert (theirs - plain).abs().max() > 1e-3
    assert (theirs - ours).abs().max() < 1e-4
    assert (loaded - ours).abs().max() < 1e-5


@pytest.mark.parametrize("sets, message", [
    ({"lora.block_dims": "[4, 4]"}, "25 blocks"),
    ({"lora.block_dims": "'4,x'"}, "list of numbers"),
    ({"lora.down_lr_weight": "'steps'"}, "cosine, sine"),
    ({"lora.loraplus_lr_ratio": 0}, "must be positive"),
    ({"lora.block_dims": "[-1]"}, "0 or more"),
])
def test_block_wise_config_errors(tmp_path, shapes, base_model, sets, message):
    with pytest.raises(SdlabError, match=message):
        trainer(config(tmp_path, shapes, mode="'lora'", base_model=f"{str(base_model)!r}", steps=1, **sets)).train()
