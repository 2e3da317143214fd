"""Textual-inversion training (`mode = "embedding"`) on tiny models: only the new vectors train,
the loss falls, resume is exact, and the file is the web UI's embedding, read back by sdlab and by
diffusers' `load_textual_inversion` with the same conditioning."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sdlab.checkpoints.diffusers_folder import write_diffusers_folder
from sdlab.embeddings import EmbeddingLibrary, load_embedding
from sdlab.errors import SdlabError
from sdlab.pipeline import text_runners
from sdlab.text.conditioning import encode_all
from sdlab.text.prompt import EMBEDDING_TOKEN
from sdlab.training.config import load_config
from sdlab.training.textual_inversion import caption_with_token, initial_vectors, save_embedding
from sdlab.training.trainer import Trainer
from tests.tiny import save_native, tiny_bundle

TOKEN = "sksobj"
PROMPT = f"a photo of {TOKEN} on a table, red circle"  # no emphasis: diffusers reads brackets literally


def embedding_config(tmp, data, base, **over):
    sets = [f"data.folder={str(data)!r}", "data.resolution=32", "data.enable_bucket=false",
            f"output_dir={str(tmp / 'out')!r}", "batch_size=2", "mode='embedding'", f"base_model={str(base)!r}",
            f"embedding.token_string={TOKEN!r}", "embedding.init_word='shape'"]
    return load_config(None, sets + [f"{k}={v}" for k, v in over.items()])


def trainer(cfg) -> Trainer:
    return Trainer(cfg, progress_bar=False)


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    return save_native(tiny_bundle("sdxl"), tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors")


# ----------------------------------------------------------------------------- config and captions


def test_config_names_defaults_and_errors(tmp_path, shapes, base_model):
    cfg = embedding_config(tmp_path, shapes, base_model, **{"embedding.num_vectors_per_token": 3})
    ec = cfg.embedding
    assert (ec.token_string, ec.init_word, ec.num_vectors_per_token, ec.num_vectors) == (TOKEN, "shape", 3, 3)
    # The web UI's learning rate, no weight decay, fp32 vectors; the file named by the token.
    assert (cfg.lr, cfg.weight_decay, cfg.save_dtype, cfg.output_name) == (5e-3, 0.0, "fp32", TOKEN)
    cfg = embedding_config(tmp_path, shapes, base_model, lr=1e-3, output_name="'x'", **{"embedding.num_vectors": 2})
    assert (cfg.lr, cfg.output_name, cfg.embedding.num_vectors_per_token) == (1e-3, "x", 2)
    for sets, message in [({"embedding.token_string": "''"}, "needs embedding.token_string"),
                          ({"embedding.token_string": "'a,b'"}, "use letters and digits"),
                          ({"embedding.num_vectors": 0}, "num_vectors_per_token must be 1 to 75"),
                          ({"save_model_as": "'ckpt'"}, "an embedding is saved as .safetensors or .pt"),
                          ({"embedding.caption_template": "'a photo'"}, "has no \\[name\\]"),
                          ({"embedding.vectors": 2}, "unknown key 'embedding.vectors'")]:
        with pytest.raises(SdlabError, match=message):
            embedding_config(tmp_path, shapes, base_model, **sets)
    with pytest.raises(SdlabError, match="'pt' is for mode 'embedding'"):
        embedding_config(tmp_path, shapes, base_model, mode="'lora'", save_model_as="'pt'")


def test_captions_carry_the_token():
    bundle = tiny_bundle("sd1")
    tok = bundle.tokenizers[0]
    ids = tok.encode(TOKEN)

    def caption(text, template=None):
        return caption_with_token(text, TOKEN, ids, tok.encode, template)

    assert caption("a red circle") == f"{TOKEN}, a red circle"
    assert caption("") == TOKEN  # caption dropout keeps the token
    assert caption(f"a {TOKEN} on a table") == f"a {TOKEN} on a table"
    assert caption("a [name] on a table") == f"a {TOKEN} on a table"
    assert caption("red circle", "a photo of a [name], [filewords]") == f"a photo of a {TOKEN}, red circle"


def test_start_vectors_are_the_init_words_spread_as_the_web_ui(tmp_path):
    bundle = tiny_bundle("sd1")
    te, tok = bundle.text_encoders[0], bundle.tokenizers[0]
    table = te.embed_tokens(torch.arange(te.cfg.vocab_size)[None])[0].detach()
    red, circle = tok.encode("red circle")
    torch.testing.assert_close(initial_vectors(te, tok, "red circle", 4), table[[red, red, circle, circle]], rtol=0, atol=0)
    torch.testing.assert_close(initial_vectors(te, tok, "red circle", 1), table[[red]], rtol=0, atol=0)
    torch.testing.assert_close(initial_vectors(te, tok, "red", 3), table[[red] * 3], rtol=0, atol=0)
    assert torch.equal(initial_vectors(te, tok, "", 2), torch.zeros(2, te.cfg.width))


# ----------------------------------------------------------------------------- training


def _fixed_batch_loss(t: Trainer) -> float:
    """The loss on all 8 images with fixed latents, noise and timesteps."""
    gen = torch.Generator().manual_seed(123)
    indices = list(range(len(t.dataset)))
    batch, part = t._local(indices)
    latents = t._latents(batch, gen, len(indices), part)
    noise, steps, _ = t._noise_and_timesteps(latents.shape, gen)
    with torch.no_grad():
        return t.module(latents, t._tokens(batch["caption"]), noise, steps, t.alphas_cumprod).item()


def test_only_the_new_vectors_train_and_the_loss_falls(tmp_path, shapes):
    """Only the vectors change, and they lower the loss on a fixed batch. A tiny random UNet hardly
    reads its context (a change of the vectors moves its loss by 1e-5), so this one's cross-attention
    and output layer are scaled up: its loss then depends on the prompt enough to measure."""
    bundle = tiny_bundle("sd1")
    with torch.no_grad():
        for name, p in bundle.unet.named_parameters():
            p.mul_(8 if ".attn2.to_" in name else 20 if name.startswith("out.") else 1)
    base_model = save_native(bundle, tmp_path / "context-sensitive.safetensors")
    t = trainer(embedding_config(tmp_path, shapes, base_model, steps=8, lr=0.05, batch_size=4,
                                 **{"embedding.num_vectors": 2}))
    base = {k: v.clone() for k, v in t.bundle.state_dict().items()}
    start = [v.detach().clone() for v in t.embedding.vectors]
    assert [p for p in t.trained] == list(t.embedding.vectors)
    assert not any(p.requires_grad for net in t.bundle.networks().values() for p in net.parameters())
    # Every caption holds the token's 2 placeholder ids (the shapes' captions do not name it: it is put in front).
    ids = t._tokens(["a red circle", f"a {TOKEN}, {TOKEN}"])[0]
    assert (ids == EMBEDDING_TOKEN).sum(dim=(1, 2)).tolist() == [2, 4]
    before = _fixed_batch_loss(t)
    batches = t._global_batches()
    losses = [t.train_step(batches) for _ in range(8)]
    after = _fixed_batch_loss(t)
    print(f"fixed-batch loss {before:.4f} -> {after:.4f}; steps {[round(x, 3) for x in losses]}")
    assert after < 0.998 * before
    assert all(torch.equal(base[k], v) for k, v in t.bundle.state_dict().items())  # UNet, text encoder, VAE
    assert all(not torch.equal(a, v) for a, v in zip(start, t.embedding.vectors))


def test_resume_is_exact(tmp_path, shapes, base_model):
    kw = dict(steps=3, ema_decay=0.9, lr_scheduler="'cosine'", noise_offset=0.05,
              **{"embedding.num_vectors": 2})
    straight = trainer(embedding_config(tmp_path / "a", shapes, base_model, **kw))
    straight.train()
    first = trainer(embedding_config(tmp_path / "b", shapes, base_model, **kw))
    assert first.train(max_steps=2) is None
    resumed = trainer(embedding_config(tmp_path / "b", shapes, base_model, **kw))
    path = resumed.train(resume=True)
    assert resumed.progress.step == straight.progress.step == 3
    for a, b in zip(straight.embedding.vectors, resumed.embedding.vectors):
        assert torch.equal(a, b)
    assert all(torch.equal(straight.ema[k], resumed.ema[k]) for k in straight.ema)
    assert torch.equal(load_embedding(path).vectors, straight.ema["0"])  # the EMA vectors are saved


# ----------------------------------------------------------------------------- the file


@pytest.mark.parametrize("save_as", ["safetensors", "pt"])
def test_file_loads_in_sdlab_and_diffusers_with_the_trained_conditioning(tmp_path, shapes, base_model, save_as):
    from diffusers import StableDiffusionPipeline

    t = trainer(embedding_config(tmp_path, shapes, base_model, steps=2, save_model_as=repr(save_as),
                                 **{"embedding.num_vectors": 3}))
    path = t.train()
    trained = t.embedding.vectors[0].detach()
    assert path == tmp_path / "out" / f"{TOKEN}.{save_as}"
    if save_as == "pt":  # the web UI trainer's file
        data = torch.load(path, weights_only=True)
        assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint",
                             "sd_checkpoint_name"}
        assert (data["name"], data["step"], data["sd_checkpoint_name"]) == (TOKEN, 2, "tiny")
        assert torch.equal(data["string_to_param"]["*"], trained)
    else:
        with safe_open(path, "pt") as f:
            assert set(f.keys()) == {"emb_params"}
            meta = f.metadata()
        assert (meta["name"], meta["step"], meta["ss_token_string"]) == (TOKEN, "2", TOKEN)

    library = EmbeddingLibrary(path.parent)
    library.refresh()
    emb = library.embeddings[TOKEN]
    # (the step of a .safetensors is in its metadata, which the web UI does not read either)
    assert (emb.num_vectors, emb.step) == (3, 2 if save_as == "pt" else None) and torch.equal(emb.vectors, trained)

    # sdlab's prompt conditioning with the file: the tokens' embeddings with the vectors in place of the
    # token, exactly; and exactly what training conditioned the UNet on for that caption.
    bundle = t.bundle
    runner = text_runners(bundle)[0]
    tensors = library.tensors(64)
    chunks = runner.chunks(PROMPT, tensors)
    ours = runner.encode(chunks, 1, tensors).context
    without = runner.encode(runner.chunks(PROMPT), 1).context
    te = bundle.text_encoders[0]
    ids = torch.tensor([[49406] + chunks[0].tokens + [49407]])
    at = (ids[0] == EMBEDDING_TOKEN).nonzero()[:, 0]
    inputs = te.embed_tokens(ids.clamp(min=0)).detach().clone()
    inputs[0, at] = trained
    with torch.no_grad():
        by_hand = te(ids, embeddings=inputs).hidden
        in_training = t.module.conditioning(t._tokens([PROMPT]))[0]
    assert len(at) == 3 and torch.equal(ours, by_hand) and torch.equal(ours, in_training)

    folder = tmp_path / "sd1"
    write_diffusers_folder(bundle.state_dict(), bundle.config, folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(path), token=TOKEN)
    with torch.no_grad():
        theirs = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    diff, effect = (ours - theirs).abs().max().item(), (ours - without).abs().max().item()
    print(f"trained embedding ({save_as}) vs diffusers: max abs diff {diff}; embedding effect {effect}")
    assert ours.shape == theirs.shape == (1, 77, 64)
    assert diff < 1e-5 and effect > 1e-2


def test_sdxl_writes_clip_l_and_clip_g_that_match_diffusers(tmp_path, shapes, sdxl_model):
    """One parameter per text encoder, saved as clip_l and clip_g (and nothing else: the web UI reads
    every entry of such a file as a tensor), in .safetensors and .pt. Loaded by diffusers into its
    two text encoders they give the prompt embeddings and pooled output of sdlab's conditioning with
    the file, which is training's."""
    from diffusers import StableDiffusionXLPipeline

    t = trainer(embedding_config(tmp_path, shapes, sdxl_model, steps=1, **{"embedding.num_vectors": 2}))
    path = t.train()
    l_vec, g_vec = (v.detach() for v in t.embedding.vectors)
    assert l_vec.shape == g_vec.shape == (2, 64)
    assert not torch.equal(l_vec, initial_vectors(t.bundle.text_encoders[0], t.bundle.tokenizers[0], "shape", 2))
    pt = tmp_path / "as.pt"
    save_embedding(t.embedding, pt, TOKEN, 1, torch.float32, None, {})
    for data in (load_file(path), torch.load(pt, weights_only=True)):
        assert set(data) == {"clip_l", "clip_g"}
        assert torch.equal(data["clip_l"], l_vec) and torch.equal(data["clip_g"], g_vec)
    emb = load_embedding(path)
    assert emb.num_vectors == 2 and torch.equal(emb.vectors_for(64, "clip_g"), g_vec)

    bundle = t.bundle
    runners = text_runners(bundle)
    per_encoder = [{TOKEN: emb.vectors_for(64, key)} for key in ("clip_l", "clip_g")]
    ours = encode_all(runners, [r.chunks(PROMPT, e) for r, e in zip(runners, per_encoder)], 1, per_encoder)
    with torch.no_grad():
        context, pooled = t.module.conditioning(t._tokens([PROMPT]))
    assert torch.equal(ours.context, context) and torch.equal(ours.pooled, pooled)

    folder = tmp_path / "sdxl"
    write_diffusers_folder(bundle.state_dict(), bundle.config, folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.load_textual_inversion(emb.vectors["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(emb.vectors["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    with torch.no_grad():
        theirs, _, theirs_pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                         do_classifier_free_guidance=False)
    diff = max((ours.context - theirs).abs().max().item(), (ours.pooled - theirs_pooled).abs().max().item())
    print(f"SDXL trained embedding vs diffusers: max abs diff {diff}")
    assert ours.context.shape == theirs.shape == (1, 77, 128)
    assert diff < 1e-5


def test_train_command(tmp_path, shapes, base_model, capsys):
    """The issue's command line: `--mode embedding --set embedding.token_string=... --set embedding.init_word=...`."""
    from sdlab.cli import build_parser

    args = build_parser().parse_args([
        "train", "--mode", "embedding", "--base-model", str(base_model), "--data", str(shapes), "--steps", "1",
        "--output-dir", str(tmp_path / "o"), "--set", f"embedding.token_string={TOKEN}",
        "--set", "embedding.init_word=shape", "--set", "data.resolution=32", "--set", "data.enable_bucket=false",
        "--set", f"validation.prompts=['a photo of {TOKEN} --s 1 --d 3']"])
    args.func(args)
    assert f"wrote {tmp_path / 'o' / (TOKEN + '.safetensors')}" in capsys.readouterr().out
    # The validation image's prompt used the vectors being trained (the web UI's "TI hashes" names them).
    (sample,) = (tmp_path / "o" / "samples").glob("*.png")
    assert f'TI hashes: "{TOKEN}: ' in Image.open(sample).info["parameters"]
