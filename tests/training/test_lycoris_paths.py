"""LyCORIS and kohya's LoCon on the paths `test_lycoris.py` leaves out: SDXL (the UNet and both
text encoders), exact resume, several processes, `conv_dim` / `conv_alpha` on kohya's own
`networks.lora`, and the dropouts. The oracles are the `lycoris-lora` package (its modules and
its `create_network_from_weights`, on diffusers' UNet and transformers' text encoders) and kohya's
`networks/lora.py` forward, written out below."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import Tensor, nn

from sdlab.training.config import load_config
from sdlab.training.lora_network import LoRAModule, LoRANetwork, unet_kohya_names
from sdlab.training.trainer import Trainer
from tests.tiny import save_native, tiny_bundle

lycoris = pytest.importorskip("lycoris")


def _config(tmp_path: Path, shapes: Path, base_model: Path, *sets: str):
    return load_config(None, [f"data.folder={str(shapes)!r}", "data.resolution=32", "data.enable_bucket=false",
                              f"output_dir={str(tmp_path / 'out')!r}", "batch_size=2", "lr=3e-2", "mode='lora'",
                              f"base_model={str(base_model)!r}", "steps=1", "lora.rank=2", "lora.alpha=1",
                              "save_dtype='fp32'", *sets])


def _train(cfg) -> tuple[Trainer, Path]:
    t = Trainer(cfg, progress_bar=False)
    try:
        path = t.train()
    finally:
        t.close()
    return t, path


def _lycoris_without_timestep_embedding_class(monkeypatch) -> None:
    """lycoris-lora 4.1.3 lists diffusers' TimestepEmbedding class (for Anima) beside the names
    time_embedding.linear_1/2, so building its network on a diffusers UNet fails on the duplicate;
    without the class, the same modules under the same names (as test_lycoris.py does)."""
    from lycoris.kohya import LycorisNetworkKohya

    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_MODULE",
                        [m for m in LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE if m != "TimestepEmbedding"])


def _with_text_model_level(te: nn.Module) -> nn.Module:
    """transformers 5's CLIPTextModel dropped the `text_model.` level that kohya's names (and its
    CLIPTextModelWithProjection) have: put it back around the same modules for LyCORIS's lookup."""
    return te if hasattr(te, "text_model") else nn.ModuleDict({"text_model": te})


# ----------------------------------------------------------------------------- dropouts


def _kohya_lora_forward(base: nn.Module, x: Tensor, m: LoRAModule, dropout: float, rank_dropout: float,
                        module_dropout: float) -> Tensor:
    """kohya's `networks/lora.py` LoRAModule.forward in training, line for line (sd-scripts 02298e3):
    module dropout after the base forward, then plain dropout on the rank activations, then whole
    ranks of a sample dropped and the rest scaled by 1 / (1 - rank_dropout)."""
    org = base(x)
    if module_dropout and torch.rand(1) < module_dropout:
        return org
    lx = m.lora_down(x)
    if dropout:
        lx = torch.nn.functional.dropout(lx, p=dropout)
    scale = m.scale
    if rank_dropout:
        mask = torch.rand((lx.size(0), m.rank), device=lx.device) > rank_dropout
        mask = mask.unsqueeze(1) if lx.dim() == 3 else mask[..., None, None] if lx.dim() == 4 else mask
        lx = lx * mask
        scale = m.scale * (1.0 / (1.0 - rank_dropout))
    return org + m.lora_up(lx) * m.multiplier * scale


def _random_factors(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_networks_lora_dropouts_are_kohyas(kind):
    """`networks.lora` with dropout, rank_dropout and module_dropout: in training, each forward is
    kohya's (the same random draws in the same order, so the same output); in eval none applies."""
    torch.manual_seed(3)
    base = nn.Linear(24, 20) if kind == "linear" else nn.Conv2d(8, 12, 3, padding=1)
    x = torch.randn(3, 5, 24) if kind == "linear" else torch.randn(3, 8, 6, 6)
    drops = dict(dropout=0.3, rank_dropout=0.25, module_dropout=0.2)
    m = LoRAModule(base, 4, 2.0, **drops)
    _random_factors(m, 1)
    handle = base.register_forward_hook(m.hook)
    try:
        m.train()
        kept = 0
        for seed in range(12):  # some calls drop the whole module, most do not
            torch.manual_seed(seed)
            with torch.no_grad():
                ours = base(x)
            handle.remove()
            torch.manual_seed(seed)
            with torch.no_grad():
                theirs = _kohya_lora_forward(base, x, m, **drops)
                plain = base(x)
            handle = base.register_forward_hook(m.hook)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
            kept += not torch.equal(theirs, plain)
        assert 0 < kept < 12
        m.eval()
        with torch.no_grad():
            ours = base(x)
        handle.remove()
        with torch.no_grad():
            assert torch.allclose(ours, base(x) + m.lora_up(m.lora_down(x)) * m.scale, rtol=0, atol=1e-6)
    finally:
        handle.remove()


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_lycoris_dropouts_are_lycoris(algo):
    """`lycoris.kohya` with network_args dropout, rank_dropout and module_dropout, wired by
    LoRANetwork: in training each forward equals LyCORIS's own module's (its default, non-bypass
    mode) from the same random state. There, rank_dropout zeroes whole output rows of the weight
    update, unscaled, and plain dropout does nothing, for LoCon as for LoHa and LoKr."""
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    te = tiny_bundle("sd1").text_encoders[0]
    drops = dict(dropout=0.3, rank_dropout=0.25, module_dropout=0.2)
    net = LoRANetwork(None, [te], 4, 2.0, algo=algo, lycoris=True, **drops)
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    ours = net.loras[name]
    layer = te.text_model.encoder.layers[0].mlp.fc1
    _random_factors(ours, 1)
    cls = {"locon": LoConModule, "loha": LohaModule, "lokr": LokrModule}[algo]
    theirs = cls(name, layer, 1.0, 4, 2.0, **drops)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, layer.in_features)
    net.apply()
    net.train()
    theirs.train()
    outs = []
    try:
        for seed in range(12):
            torch.manual_seed(seed)
            with torch.no_grad():
                mine = layer(x)
            net.remove()
            theirs.apply_to()
            torch.manual_seed(seed)
            with torch.no_grad():
                lyco = layer(x)
            theirs.restore()
            net.apply()
            torch.testing.assert_close(mine, lyco, rtol=0, atol=1e-5)
            outs.append(mine)
    finally:
        net.remove()
    assert len({o.sum().item() for o in outs}) > 2  # the draws differ from call to call


def test_lycoris_dropout_is_recorded_and_warned(tmp_path, shapes, base_model, caplog):
    """`network_args = ["algo=locon", "dropout=0.1", ...]`: the run warns that LyCORIS trains without
    plain dropout, and writes every argument into `ss_network_args` for LyCORIS's loader to read."""
    cfg = _config(tmp_path, shapes, base_model, "lora.network_module='lycoris.kohya'",
                  "lora.network_args=['algo=locon', 'dropout=0.1', 'rank_dropout=0.2', 'module_dropout=0.1']")
    with caplog.at_level(logging.WARNING):
        t, path = _train(cfg)
    assert "LyCORIS's modules train without plain dropout" in caplog.text
    assert all(isinstance(m.dropout, nn.Identity) and m.rank_dropout == 0.2 for m in t.lora.loras.values())
    with safe_open(str(path), "pt") as f:
        args = json.loads(f.metadata()["ss_network_args"])
    assert args == {"algo": "locon", "conv_dim": "2", "conv_alpha": "1.0", "dropout": "0.1", "rank_dropout": "0.2",
                    "module_dropout": "0.1"}


# ----------------------------------------------------------------------------- SDXL


def _diffusers_unet_names(unet) -> dict[str, str]:
    """kohya's SDXL module names (the original UNet's paths) -> its SD 1.x / diffusers ones, which
    LyCORIS gives the modules of diffusers' UNet: what kohya's SDXL scripts convert between."""
    paths = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    original, diffusers = unet_kohya_names(unet, paths, "original"), unet_kohya_names(unet, paths, "diffusers")
    return {original[p]: diffusers[p] for p in paths}


@pytest.mark.parametrize("sets", [
    # (the LoHa's modules are the SD 1.x test's; SDXL differs in names and layers, which LoKr covers)
    pytest.param(["lora.network_args=['algo=loha', 'conv_dim=2', 'conv_alpha=1']"], marks=pytest.mark.slow),
    ["lora.algo='lokr'", "lora.factor=4"],
])
def test_sdxl_lycoris_loads_in_lycoris_and_sdlab(tmp_path, shapes, sets, monkeypatch):
    """A LoHa and a LoKr on SDXL's UNet and both text encoders: kohya's SDXL names (`lora_unet_input_blocks_...`,
    `lora_te1_`, `lora_te2_`) with LyCORIS's factors and SDXL metadata. LyCORIS's own loader
    (`create_network_from_weights` on diffusers' UNet, transformers' CLIP-L and bigG) and sdlab's loader
    give the same UNet output, text states and pooled projection within 1e-5."""
    from diffusers import UNet2DConditionModel
    from lycoris.kohya import create_network_from_weights
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdlab.checkpoints.loader import load_bundle
    from sdlab.lora import LoraUse, apply_loras, load_lora
    from tests.tiny import diffusers_folder

    _lycoris_without_timestep_embedding_class(monkeypatch)
    bundle, folder = diffusers_folder(tmp_path, "sdxl")
    single = save_native(bundle, tmp_path / "sdxl.safetensors")
    cfg = _config(tmp_path, shapes, single, "lora.network_module='lycoris.kohya'", "lora.train_text_encoder=true",
                  *sets)
    t, path = _train(cfg)
    algo = cfg.lora.algo
    factor = "hada_w1_a" if algo == "loha" else "lokr_w1"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    names = {k.rsplit(".", 1)[0] for k in keys}
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == algo
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    for name in ("lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k",
                 "lora_unet_middle_block_1_proj_in", "lora_unet_output_blocks_1_2_conv",
                 "lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te2_text_model_encoder_layers_2_self_attn_v_proj"):
        assert name in names and f"{name}.{factor}" in keys, name
    assert {n.split("_")[1] for n in names} == {"unet", "te1", "te2"}

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    te1 = _with_text_model_level(CLIPTextModel.from_pretrained(folder / "text_encoder"))
    te2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
    rename = _diffusers_unet_names(t.bundle.unet)
    tensors = {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            module, rest = k.split(".", 1)
            tensors[f"{rename.get(module, module)}.{rest}"] = f.get_tensor(k)
    network, _ = create_network_from_weights(1.0, None, None, [te1, te2], unet, weights_sd=tensors)
    assert len(network.unet_loras) + len(network.text_encoder_loras) == len(names)  # every module read

    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 128, generator=g)
    y, ts = torch.randn(2, 64 + 6 * 256, generator=g), torch.tensor([10.0, 700.0])
    # diffusers embeds the six size numbers itself: hand both UNets the same y.
    unet.add_embedding.linear_1.register_forward_pre_hook(lambda m, args: (y,))
    added = {"text_embeds": y[:, :64], "time_ids": torch.zeros(2, 6)}
    ids = [tok(["a red circle on a blue background", ""]) for tok in t.bundle.tokenizers]
    loaded = load_bundle(single, device="cpu", dtype=torch.float32)

    def theirs() -> list[Tensor]:
        out1, out2 = te1.text_model(ids[0]), te2(ids[1])
        return [unet(x, ts, ctx, added_cond_kwargs=added).sample, out1.last_hidden_state, out2.last_hidden_state,
                out2.text_embeds]

    with torch.no_grad():
        base = theirs()
        with apply_loras(loaded, [LoraUse(load_lora(path), 1.0, 1.0)]) as applied:
            assert not applied.unmatched
            outs = [loaded.text_encoders[i](ids[i]) for i in range(2)]
            ours = [loaded.unet(x, ts, ctx, y), outs[0].hidden, outs[1].hidden, outs[1].pooled]
        network.apply_to([te1, te2], unet, True, True)
        lyco = theirs()
    for what, b, o, ly in zip(("unet", "clip-l", "bigG", "pooled"), base, ours, lyco):
        diff, effect = (o - ly).abs().max().item(), (ly - b).abs().max().item()
        print(f"SDXL {algo} {what}: sdlab vs LyCORIS {diff:.2e}; the network's effect {effect:.2e}")
        assert effect > 1e-3, what  # the trained network changes every output...
        assert diff < 1e-5, what  # ...and the same way in both loaders


# ----------------------------------------------------------------------------- resume, processes


@pytest.mark.parametrize("steps, sets", [
    # the dropouts draw from the global generator, which the state carries
    (2, ["lora.network_args=['algo=loha', 'rank_dropout=0.25', 'module_dropout=0.2']"]),
    (3, ["lora.algo='lokr'", "lora.factor=4", "grad_accum=2", "ema_decay=0.9"]),
])
def test_lycoris_resume_is_exact(tmp_path, shapes, base_model, steps, sets):
    """N steps straight equal 1 step, a saved state and `--resume` for the rest, bit for bit: the
    factors of every LoHa / LoKr module (UNet and text encoder), the EMA and the file written."""
    common = ["lora.network_module='lycoris.kohya'", "lora.train_text_encoder=true", f"steps={steps}", "lr=1e-2",
              "lr_scheduler='cosine'", "warmup_steps=1", *sets]
    straight, straight_file = _train(_config(tmp_path / "a", shapes, base_model, *common))
    first = Trainer(_config(tmp_path / "b", shapes, base_model, *common), progress_bar=False)
    assert first.train(max_steps=1) is None  # stops with a saved state
    first.close()
    resumed = Trainer(_config(tmp_path / "b", shapes, base_model, *common), progress_bar=False)
    try:
        resumed_file = resumed.train(resume=True)
    finally:
        resumed.close()
    assert resumed.progress.step == straight.progress.step == steps
    a, b = straight.lora.state_dict(), resumed.lora.state_dict()
    assert a.keys() == b.keys() and any("lora_te_" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    if straight.ema is not None:
        assert all(torch.equal(straight.ema[k], resumed.ema[k]) for k in straight.ema)
    with safe_open(str(straight_file), "pt") as f, safe_open(str(resumed_file), "pt") as g:
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())


@pytest.mark.slow  # two interpreters and a third run: ~10 s
def test_lycoris_two_processes_match_one(tmp_path, shapes):
    """2 gloo processes with batch 1 each == 1 process with batch 2: a LoHa on SDXL's UNet and both
    text encoders (the harness of test_trainer.py's test_two_processes_match_one)."""
    from tests.training.test_trainer import assert_two_processes_match_one

    single = save_native(tiny_bundle("sdxl"), tmp_path / "sdxl.safetensors")
    sets = [f"data.folder={str(shapes)!r}", "data.resolution=32", "data.enable_bucket=false", "mode='lora'",
            f"base_model={str(single)!r}", "lr=1e-2", "steps=2", "lora.rank=4", "lora.train_text_encoder=true",
            "lora.network_module='lycoris.kohya'", "lora.network_args=['algo=loha', 'conv_dim=2', 'conv_alpha=1']"]
    one = assert_two_processes_match_one(
        tmp_path, [*sets, "batch_size=1", f"output_dir={str(tmp_path / 'two')!r}"],
        lambda: Trainer(load_config(None, [*sets, "batch_size=2", f"output_dir={str(tmp_path / 'one')!r}"]),
                        progress_bar=False))
    assert any(n.startswith("lora_te2_") for n in one.lora.loras)


# ----------------------------------------------------------------------------- LoCon


@pytest.mark.parametrize("module", ["networks.lora", "lycoris.kohya"])
def test_locon_conv_dim_and_alpha_load_in_lycoris_and_sdlab(tmp_path, shapes, base_model, module, monkeypatch):
    """LoCon by `network_args = ["conv_dim=2", "conv_alpha=0.5"]` (rank 4, alpha 2), on kohya's
    `networks.lora` (the ResBlocks' and resamplers' 3x3 convolutions) and on LyCORIS's `algo=locon`
    (also the input and output convolutions): the convolutions get rank 2 and alpha 0.5 (scale 0.25),
    the rest rank 4 and alpha 2, as the file and `ss_network_args` say; LyCORIS's loader (on diffusers'
    UNet) and sdlab's give the same UNet output within 1e-5."""
    from diffusers import UNet2DConditionModel
    from lycoris.kohya import create_network_from_weights
    from transformers import CLIPTextModel

    from sdlab.checkpoints.diffusers_folder import write_diffusers_folder
    from sdlab.checkpoints.loader import load_bundle
    from sdlab.lora import LoraUse, apply_loras, load_lora

    _lycoris_without_timestep_embedding_class(monkeypatch)
    algo = ["lora.network_args=['algo=locon', 'conv_dim=2', 'conv_alpha=0.5']"] if module == "lycoris.kohya" else [
        "lora.network_args=['conv_dim=2', 'conv_alpha=0.5']"]
    cfg = _config(tmp_path, shapes, base_model, f"lora.network_module={module!r}", "lora.rank=4", "lora.alpha=2",
                  *algo)
    assert (cfg.lora.conv_rank, cfg.lora.conv_alpha) == (2, 0.5)
    t, path = _train(cfg)
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    args = json.loads(meta["ss_network_args"])
    assert (args["conv_dim"], args["conv_alpha"], meta["ss_network_module"]) == ("2", "0.5", module)
    conv3 = {k.removesuffix(".lora_down.weight") for k, v in tensors.items()
             if k.endswith(".lora_down.weight") and v.ndim == 4 and v.shape[-1] == 3}
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in conv3
    assert ("lora_unet_conv_in" in conv3) == (module == "lycoris.kohya")  # LyCORIS's preset "full" only
    for name in {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")}:
        rank, alpha = (2, 0.5) if name in conv3 else (4, 2.0)
        assert tensors[f"{name}.lora_down.weight"].shape[0] == rank and tensors[f"{name}.alpha"].item() == alpha, name
        assert t.lora.loras[name].scale == alpha / rank

    folder = tmp_path / "diffusers"
    ref = tiny_bundle("sd1", seed=0)  # the base_model fixture's weights
    write_diffusers_folder(ref.state_dict(), ref.config, folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    te = _with_text_model_level(CLIPTextModel.from_pretrained(folder / "text_encoder"))
    network, _ = create_network_from_weights(1.0, str(path), None, te, unet)
    assert len(network.unet_loras) == len({k.split(".")[0] for k in tensors})
    loaded = load_bundle(base_model, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x, ctx, ts = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        plain = unet(x, ts, ctx).sample
        with apply_loras(loaded, [LoraUse(load_lora(path), 1.0, 1.0)]) as applied:
            assert not applied.unmatched
            ours = loaded.unet(x, ts, ctx)
        network.apply_to(te, unet, False, True)
        theirs = unet(x, ts, ctx).sample
    diff, effect = (ours - theirs).abs().max().item(), (theirs - plain).abs().max().item()
    print(f"LoCon on {module}: sdlab vs LyCORIS {diff:.2e}; the network's effect {effect:.2e}")
    assert effect > 1e-3 and diff < 1e-5
