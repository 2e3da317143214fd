"""SD3's third text encoder (T5) behind the interface `prompt_schedule` drives
(`TextEncoderRunner`'s `chunks` / `encode` / `tokenizer`).

The prompt's web-UI syntax is parsed as for CLIP (so `(word:1.2)`, `BREAK` and prompt editing
read the same), but T5 sees the plain text: the reference implementation ignores emphasis weights
on SD3 ("weights themselves has weak effect"), and textual inversion does not reach T5. The
tokens (EOS last) are padded with 0 to a multiple of the tokenizer's length (77 as the reference
and ComfyUI pad; diffusers' `max_sequence_length`) and encoded as one sequence without a mask,
so that a prompt and its negative batch together as CLIP's 77-token chunks do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..models.t5 import T5Encoder
from .conditioning import EncodedPrompt
from .prompt import PromptChunk, parse_prompt_attention
from .t5_tokenizer import T5Tokenizer

__all__ = ["T5Runner"]


class _ChunkTokenizer:
    """What `prompt_schedule` and the embeddings check read from a runner's tokenizer. `eos_id`
    is what extra chunks are filled with: T5's padding (0), since its EOS ends the text itself."""

    def __init__(self, tok: T5Tokenizer):
        self.t5 = tok
        self.eos_id = tok.pad_id
        self.pad_id = tok.pad_id
        self.comma_id = tok.encode(",", eos=False)[-1]

    def encode(self, text: str) -> list[int]:
        return self.t5.encode(text, eos=False)


class T5Runner:
    """Encodes prompts with T5; caches by tokens so an unchanged prompt is not recomputed."""

    def __init__(self, encoder: T5Encoder, tokenizer: T5Tokenizer, cache_size: int = 8):
        self.encoder = encoder
        self.t5_tokenizer = tokenizer
        self.tokenizer = _ChunkTokenizer(tokenizer)
        self.weights_version = 0
        self._cache: dict[tuple, Tensor] = {}
        self._cache_size = cache_size

    def chunks(self, text: str, embeddings: Mapping[str, Tensor] | None = None) -> list[PromptChunk]:
        plain = "".join(piece for piece, weight in parse_prompt_attention(text) if weight >= 0)  # BREAK is -1
        ids = self.t5_tokenizer.encode(plain)
        n = self.t5_tokenizer.length
        ids = ids + [self.t5_tokenizer.pad_id] * (-len(ids) % n)
        return [PromptChunk(ids[i:i + n], [1.0] * n) for i in range(0, len(ids), n)]

    @torch.no_grad()
    def encode(self, chunks: Sequence[PromptChunk], clip_skip: int = 1,
               embeddings: Mapping[str, Tensor] | None = None) -> EncodedPrompt:
        ids = [t for c in chunks for t in c.tokens]
        key = (self.weights_version, tuple(ids))
        context = self._cache.get(key)
        if context is None:
            device = next(self.encoder.parameters()).device
            context = self.encoder(torch.tensor([ids], device=device)).float()
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = context
        return EncodedPrompt(context, torch.zeros(1, 0))
