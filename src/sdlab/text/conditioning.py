"""Prompt text to the tensors the UNet is conditioned on, with the web UIs'
semantics: emphasis weights applied to the hidden states with the mean
restored, 75-token chunks encoded separately and concatenated, prompt editing
and alternation as a per-step schedule, CLIP skip, textual inversion."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .prompt import PromptChunk, get_prompt_schedule, pad_chunks, parse_prompt_attention, tokenize_weighted
from .tokenizer import CLIPTokenizer


@dataclass(frozen=True, eq=False)  # compared by identity: the cache hands out the same object
class EncodedPrompt:
    context: Tensor  # (1, 77 * chunks, width): hidden states of every chunk, concatenated
    pooled: Tensor  # (1, width or projection): the first chunk's pooled output


@dataclass(frozen=True)
class PromptSchedule:
    """Conditioning that changes during sampling: `entries[i] = (end_step, encoded)`;
    entry i applies up to and including step `end_step` (0-based sampler steps, as the web UI counts)."""

    entries: tuple[tuple[int, EncodedPrompt], ...]

    def at(self, step: int) -> EncodedPrompt:
        for end, encoded in self.entries:
            if step <= end:
                return encoded
        return self.entries[-1][1]


class TextEncoderRunner:
    """Encodes chunks with one text encoder; caches by (tokens, weights, skip) so an
    unchanged prompt is not recomputed between requests."""

    def __init__(self, encoder, tokenizer: CLIPTokenizer, base_skip: int = 1, cache_size: int = 32):
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.base_skip = base_skip
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._cache_size = cache_size

    def chunks(self, text: str, embeddings: Mapping[str, Tensor] | None = None) -> list[PromptChunk]:
        parsed = parse_prompt_attention(text)
        sizes = {name: v.shape[0] for name, v in (embeddings or {}).items()}
        return tokenize_weighted(parsed, self.tokenizer.encode, self.tokenizer.comma_id,
                                 pad_id=self.tokenizer.eos_id, embeddings=sizes)

    def encode(self, chunks: Sequence[PromptChunk], clip_skip: int = 1,
               embeddings: Mapping[str, Tensor] | None = None) -> EncodedPrompt:
        skip = self.base_skip + max(clip_skip, 1) - 1
        skip = min(skip, self.encoder.cfg.layers)
        key = (tuple(tuple(c.tokens) + tuple(c.weights) for c in chunks), skip,
               tuple(sorted((r.name, r.offset) for c in chunks for r in c.embeddings)))
        if key in self._cache and not any(c.embeddings for c in chunks):
            context, pooled = self._cache[key]
            return EncodedPrompt(context, pooled)
        contexts, pooled = [], None
        for chunk in chunks:
            z, p = self._encode_chunk(chunk, skip, embeddings or {})
            contexts.append(z)
            pooled = p if pooled is None else pooled
        context = torch.cat(contexts, dim=1)
        if len(self._cache) >= self._cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (context, pooled)
        return EncodedPrompt(context, pooled)

    @torch.no_grad()
    def _encode_chunk(self, chunk: PromptChunk, skip: int, embeddings: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        tok = self.tokenizer
        ids = [tok.bos_id] + list(chunk.tokens) + [tok.eos_id]
        if tok.pad_id != tok.eos_id:
            # OpenCLIP pads with 0 after the end-of-text token (as the web UI and diffusers do).
            first_eos = ids.index(tok.eos_id)
            ids = ids[:first_eos + 1] + [tok.pad_id] * (len(ids) - first_eos - 1)
        device = next(self.encoder.parameters()).device
        tokens = torch.tensor([ids], device=device)
        inputs = None
        if chunk.embeddings:
            inputs = self.encoder.embed_tokens(tokens).clone()
            for ref in chunk.embeddings:
                vec = embeddings[ref.name].to(inputs)
                inputs[0, 1 + ref.offset: 1 + ref.offset + ref.vectors] = vec
        out = self.encoder(tokens, skip=skip, embeddings=inputs)
        z = out.hidden.float()
        weights = torch.tensor([1.0] + list(chunk.weights) + [1.0], device=device)
        if bool((weights != 1.0).any()):
            # Emphasis: scale each token's states, then restore the chunk's mean (web UI rule).
            original_mean = z.mean()
            z = z * weights[None, :, None]
            z = z * (original_mean / z.mean())
        return z, out.pooled.float()


def prompt_schedule(runner: TextEncoderRunner, prompts: Sequence[str], steps: int, clip_skip: int,
                    embeddings: Mapping[str, Tensor] | None = None) -> list[PromptSchedule]:
    """Encode several prompts (e.g. positive and negative) with their editing schedules,
    every variant padded to the same number of chunks so they batch together."""
    schedules = [get_prompt_schedule(p, steps) for p in prompts]
    chunked = [[runner.chunks(text, embeddings) for _, text in sched] for sched in schedules]
    flat = [c for per_prompt in chunked for c in per_prompt]
    padded = iter(pad_chunks(*flat, pad_id=runner.tokenizer.eos_id))
    out = []
    for sched, per_prompt in zip(schedules, chunked):
        entries = []
        for (end, _), _ in zip(sched, per_prompt):
            entries.append((end, runner.encode(next(padded), clip_skip, embeddings)))
        out.append(PromptSchedule(tuple(entries)))
    return out
