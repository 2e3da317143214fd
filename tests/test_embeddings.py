"""Textual-inversion embeddings: the web UI's .pt, diffusers' .bin, .safetensors; the
conditioning of a prompt using one against diffusers' `load_textual_inversion`."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdlab.checkpoints.diffusers_folder import write_diffusers_folder
from sdlab.embeddings import Embedding, EmbeddingLibrary, load_embedding
from sdlab.errors import SdlabError
from sdlab.text.conditioning import TextEncoderRunner

from .tiny import tiny_bundle

PROMPT = "a photo of myemb on a table, red circle"  # no emphasis: diffusers reads brackets literally


def _webui_pt(path, vectors: torch.Tensor, **extra) -> None:
    """The web UI trainer's file (`Embedding.save` in modules/textual_inversion)."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "ignored-name",
                "step": 1500, "sd_checkpoint": "6ce0161689", "sd_checkpoint_name": "v1-5-pruned-emaonly", **extra}, path)


def test_webui_embedding_matches_diffusers_textual_inversion(tmp_path):
    from diffusers import StableDiffusionPipeline

    bundle = tiny_bundle("sd1")
    vectors = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    _webui_pt(tmp_path / "myemb.pt", vectors)
    emb = load_embedding(tmp_path / "myemb.pt")
    assert (emb.name, emb.num_vectors, emb.shape, emb.step) == ("myemb", 2, 64, 1500)
    assert emb.sd_checkpoint == "6ce0161689"

    runner = TextEncoderRunner(bundle.text_encoders[0], bundle.tokenizers[0])
    tensors = {emb.name: emb.vectors_for(64)}
    chunks = runner.chunks(PROMPT, tensors)
    assert [r.name for r in chunks[0].embeddings] == ["myemb"]
    ours = runner.encode(chunks, 1, tensors).context
    without = runner.encode(runner.chunks(PROMPT), 1).context

    folder = tmp_path / "sd1"
    write_diffusers_folder(bundle.state_dict(), bundle.config, folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(tmp_path / "myemb.pt"), token="myemb")
    with torch.no_grad():
        theirs = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    diff = (ours - theirs).abs().max().item()
    effect = (ours - without).abs().max().item()
    print(f"textual inversion vs diffusers: max abs diff {diff}; embedding effect {effect}")
    assert ours.shape == theirs.shape == (1, 77, 64)
    assert diff < 1e-4
    assert effect > 1e-2


def test_formats(tmp_path):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(3, 64, generator=g)
    torch.save({"<concept>": v[0]}, tmp_path / "diffusers.bin")  # one (width,) vector
    save_file({"emb_params": v}, str(tmp_path / "emb.safetensors"))
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(tmp_path / "xl.safetensors"))
    _webui_pt(tmp_path / "param.pt", torch.nn.Parameter(v.half()))

    assert torch.equal(load_embedding(tmp_path / "diffusers.bin").vectors, v[:1])
    e = load_embedding(tmp_path / "emb.safetensors")
    assert e.name == "emb" and torch.equal(e.vectors, v) and e.step is None
    p = load_embedding(tmp_path / "param.pt")
    assert p.vectors.dtype == torch.float32 and not p.vectors.requires_grad
    torch.testing.assert_close(p.vectors, v.half().float())
    xl = load_embedding(tmp_path / "xl.safetensors")
    assert (xl.num_vectors, xl.shape) == (2, 2048)
    assert xl.vectors_for(1280, "clip_g").shape == (2, 1280)
    with pytest.raises(SdlabError, match="for SDXL"):
        xl.vectors_for(64)


def test_wrong_width_is_one_clear_error(tmp_path):
    bundle = tiny_bundle("sd1")
    _webui_pt(tmp_path / "sd2style.pt", torch.randn(1, 1024))
    emb = load_embedding(tmp_path / "sd2style.pt")
    with pytest.raises(SdlabError) as e:
        emb.vectors_for(64)
    assert "sd2style.pt" in str(e.value) and "1024" in str(e.value) and "64" in str(e.value)

    _webui_pt(tmp_path / "good.pt", torch.randn(1, 64))
    library = EmbeddingLibrary(tmp_path)
    assert library.refresh()
    assert not library.refresh()  # nothing changed on disk
    assert set(library.embeddings) == {"sd2style", "good"}
    assert set(library.tensors(64)) == {"good"}
    tok = bundle.tokenizers[0]
    library.check_prompt("a good photo", tok, 64)  # the wrong one is not used: fine
    with pytest.raises(SdlabError, match="sd2style.pt.*width 1024.*width 64"):
        library.check_prompt("a (sd2style:1.2) photo", tok, 64)


def test_bad_files_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"string_to_param": {"*": torch.zeros(1, 64)}, "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(SdlabError, match="refused.*print"):
        load_embedding(tmp_path / "evil.pt")
    torch.save({"string_to_param": {"*": torch.zeros(1, 64), "+": torch.zeros(1, 64)}}, tmp_path / "two.pt")
    with pytest.raises(SdlabError, match="exactly one"):
        load_embedding(tmp_path / "two.pt")
    save_file({"a": torch.zeros(1, 64), "b": torch.zeros(1, 64)}, str(tmp_path / "many.safetensors"))
    with pytest.raises(SdlabError, match="not a textual-inversion embedding"):
        load_embedding(tmp_path / "many.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(SdlabError, match="not a readable"):
        load_embedding(tmp_path / "junk.pt")
    # A folder with broken files still serves the good ones.
    torch.save({"t": torch.zeros(1, 64)}, tmp_path / "fine.bin")
    library = EmbeddingLibrary(tmp_path)
    library.refresh()
    assert set(library.embeddings) == {"fine"} and len(library.errors) == 4


def test_embedding_dataclass_in_memory():
    e = Embedding("x", torch.zeros(4, 64))
    assert e.num_vectors == 4 and e.vectors_for(64).shape == (4, 64)
    with pytest.raises(SdlabError, match="in memory"):
        e.vectors_for(768)
