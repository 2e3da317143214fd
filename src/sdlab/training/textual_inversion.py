"""Textual inversion (`mode = "embedding"`): new token vectors trained on a frozen model.

The vectors enter the text encoders exactly as an embedding does at sampling
(`text.conditioning.TextEncoderRunner._encode_chunk`): the captions are tokenized with the token
as an embedding name (`tokenize_weighted(..., embeddings=...)`), whose positions hold
`EMBEDDING_TOKEN`, and the token-embedding lookup is overwritten there by the vectors. Only the
`(num_vectors, width)` parameters train; the token-embedding table and everything else stay as
loaded. The result is the web UI's embedding file (`embeddings.embedding_from_data` reads it back).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints.io import atomic_write, save_safetensors
from ..text.prompt import EMBEDDING_TOKEN

# The web UI's trainer writes `string_to_token = {"*": 265}` (the id of "*" in CLIP's vocabulary).
_STAR_TOKEN = 265


def initial_vectors(encoder: nn.Module, tokenizer, init_word: str, n: int) -> Tensor:
    """(n, width) start vectors, as the web UI's `create_embedding`: the first `n` tokens of
    `init_word` embedded, vector i taken from token `i * tokens // n` (one token fills all n; "red
    circle" over 4 vectors gives red, red, circle, circle); zeros without an init word."""
    ids = tokenizer.encode(init_word)[:n] if init_word.strip() else []
    if not ids:
        return torch.zeros(n, encoder.cfg.width)
    with torch.no_grad():
        device = next(encoder.parameters()).device
        embedded = encoder.embed_tokens(torch.tensor([ids], device=device))[0].float().cpu()
    return torch.stack([embedded[i * len(ids) // n] for i in range(n)])


class TextualInversion(nn.Module):
    """The trained vectors: one `(n, width)` parameter per text encoder (SDXL: CLIP-L's, bigG's).

    Args:
        token: the word the captions use for them.
        vectors: the start vectors of each text encoder.
        keys: each encoder's name in an SDXL embedding file ("clip_l", "clip_g"), None for one encoder.
    """

    def __init__(self, token: str, vectors: list[Tensor], keys: list[str | None]):
        super().__init__()
        self.token, self.keys = token, list(keys)
        self.vectors = nn.ParameterList([nn.Parameter(v.detach().float().clone()) for v in vectors])

    @property
    def num_vectors(self) -> int:
        return self.vectors[0].shape[0]

    @classmethod
    def from_init_word(cls, bundle, token: str, init_word: str, n: int) -> TextualInversion:
        vectors = [initial_vectors(te, tok, init_word, n) for te, tok in zip(bundle.text_encoders, bundle.tokenizers)]
        keys = [slot.embedding_key if len(bundle.text_encoders) > 1 else None for slot in bundle.family.text_encoders]
        return cls(token, vectors, keys)

    def inputs(self, index: int, encoder: nn.Module, ids: Tensor) -> Tensor:
        """(N, T, width) inputs of text encoder `index` for (N, T) ids: the token embeddings, with
        the vectors at the `EMBEDDING_TOKEN` positions. Each use of the token holds `n` such ids in
        a row and no other embedding is in the captions, so the k-th of them takes vector k mod n."""
        placeholder = ids == EMBEDDING_TOKEN
        embedded = encoder.embed_tokens(ids.clamp(min=0))
        vectors = self.vectors[index].to(embedded.dtype)
        which = (placeholder.long().cumsum(dim=-1) - 1).clamp(min=0) % vectors.shape[0]  # (N, T)
        return torch.where(placeholder[..., None], vectors[which], embedded)

    def file_tensors(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """name -> tensor as embedding files hold them: kohya's `emb_params`, or SDXL's clip_l / clip_g."""
        out = [v.detach().to("cpu", dtype).contiguous() for v in self.vectors]
        if len(out) == 1:
            return {"emb_params": out[0]}
        return dict(zip(self.keys, out, strict=True))


def caption_with_token(caption: str, token: str, token_ids: list[int], encode, template: str | None) -> str:
    """The caption a textual-inversion step trains on. With the web UI's prompt template, its
    `[filewords]` is the caption and `[name]` the token. Otherwise a caption holding `[name]` gets
    the token there, one holding the token (as the tokenizer reads it: its ids in the caption's)
    keeps it, and any other caption gets it in front: "sksobj, a red circle" (an empty caption,
    e.g. from caption dropout, is the token alone: without it the step would teach the vectors nothing)."""
    if template is not None:
        return template.replace("[filewords]", caption).replace("[name]", token)
    if "[name]" in caption:
        return caption.replace("[name]", token)
    ids, k = encode(caption), len(token_ids)
    if any(ids[i:i + k] == token_ids for i in range(len(ids) - k + 1)):
        return caption
    return f"{token}, {caption}" if caption.strip() else token


def save_embedding(ti: TextualInversion, path: Path, name: str, step: int, dtype: torch.dtype,
                   base_model: str | None, metadata: dict[str, str]) -> None:
    """Write the embedding as the web UIs read it (`.pt` or `.safetensors` by `path`'s suffix).

    `.pt` for one text encoder is the web UI trainer's file: `string_to_param {"*": (n, width)}`,
    `string_to_token`, `name`, `step`, `sd_checkpoint` (None: the web UI's short hash of the model
    is not computed here) and `sd_checkpoint_name`. `.safetensors` holds `emb_params` (kohya's
    name; the web UI takes any single tensor) with `name` and `step` in its metadata. SDXL's, in
    either, hold `clip_l` and `clip_g` only (the web UI reads every entry of such a file as a tensor)."""
    tensors = ti.file_tensors(dtype)
    if path.suffix == ".pt":
        if "emb_params" in tensors:
            data: dict = {"string_to_token": {"*": _STAR_TOKEN}, "string_to_param": {"*": tensors["emb_params"]},
                          "name": name, "step": step, "sd_checkpoint": None,
                          "sd_checkpoint_name": Path(base_model).stem if base_model else None}
        else:
            data = tensors
        atomic_write(path, lambda tmp: torch.save(data, tmp))
        return
    meta = {"name": name, "step": str(step), "sd_checkpoint_name": Path(base_model).stem if base_model else "",
            **metadata}
    save_safetensors(tensors, path, meta)


def embedding_metadata(cfg, family, architecture: str) -> dict[str, str]:
    """What a `.safetensors` embedding records of its training, in kohya's and ModelSpec's names."""
    ec = cfg.embedding
    return {"ss_token_string": ec.token_string, "ss_init_word": ec.init_word,
            "ss_num_vectors_per_token": str(ec.num_vectors_per_token),
            "ss_base_model_version": family.base_model_version,
            "ss_learning_rate": str(cfg.lr), "ss_seed": str(cfg.seed),
            "sdlab.training": json.dumps({"mode": "embedding", "caption_template": ec.caption_template}),
            "modelspec.architecture": architecture + "/textual-inversion",
            "modelspec.implementation": "sdlab", "modelspec.title": cfg.output_name}
