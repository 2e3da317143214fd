"""Prompt text to the tensors the UNet is conditioned on, with the web UIs'
semantics: emphasis weights applied to the hidden states with the mean
restored, 75-token chunks encoded separately and concatenated, prompt editing
and alternation as a per-step schedule, CLIP skip, textual inversion."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .prompt import PromptChunk, empty_chunk, get_prompt_schedule, pad_chunks, parse_prompt_attention, tokenize_weighted
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

    def __init__(self, encoder, tokenizer: CLIPTokenizer, base_skip: int = 1, final_norm: bool = True,
                 cache_size: int = 32):
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.base_skip = base_skip
        self.final_norm = final_norm
        # Bumped by whoever changes the encoder's weights (LoRA), so cached results are not reused.
        self.weights_version = 0
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
        key = (self.weights_version, tuple(tuple(c.tokens) + tuple(c.weights) for c in chunks), skip,
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
        device = next(self.encoder.parameters()).device
        tokens = torch.tensor([chunk_ids(chunk, self.tokenizer)], device=device)
        inputs = None
        if chunk.embeddings:
            # Embedding positions hold a negative placeholder id; look up something valid, then overwrite.
            inputs = self.encoder.embed_tokens(tokens.clamp(min=0)).clone()
            for ref in chunk.embeddings:
                vec = embeddings[ref.name].to(inputs)
                inputs[0, 1 + ref.offset: 1 + ref.offset + ref.vectors] = vec
        out = self.encoder(tokens, skip=skip, embeddings=inputs, final_norm=self.final_norm)
        z = out.hidden.float()
        weights = torch.tensor([1.0] + list(chunk.weights) + [1.0], device=device)
        if bool((weights != 1.0).any()):
            # Emphasis: scale each token's states, then restore the chunk's mean (web UI rule).
            original_mean = z.mean()
            z = z * weights[None, :, None]
            z = z * (original_mean / z.mean())
        return z, out.pooled.float()


class ZeroFilledRunner(TextEncoderRunner):
    """One of SD3's two CLIPs where the other is absent, as ComfyUI's `SD3ClipModel` conditions:
    the present encoder's states and pooled vector with zeros where the absent one's would be,
    `zeros[0]` before them (a lone CLIP-G: CLIP-L's 768 come first) and `zeros[1]` after them (a
    lone CLIP-L: CLIP-G's 1280), so the MMDiT reads every feature at its usual place."""

    def __init__(self, encoder, tokenizer: CLIPTokenizer, zeros: tuple[int, int], **kwargs):
        super().__init__(encoder, tokenizer, **kwargs)
        self.zeros = zeros

    def encode(self, chunks: Sequence[PromptChunk], clip_skip: int = 1,
               embeddings: Mapping[str, Tensor] | None = None) -> EncodedPrompt:
        encoded = super().encode(chunks, clip_skip, embeddings)
        pad = torch.nn.functional.pad
        return EncodedPrompt(pad(encoded.context, self.zeros), pad(encoded.pooled, self.zeros))


def chunk_ids(chunk: PromptChunk, tokenizer: CLIPTokenizer) -> list[int]:
    """The 77 ids the text encoder reads for one chunk: BOS, the chunk's tokens, EOS."""
    ids = [tokenizer.bos_id] + list(chunk.tokens) + [tokenizer.eos_id]
    if tokenizer.pad_id != tokenizer.eos_id:
        # OpenCLIP pads with 0 after the end-of-text token (as the web UI and diffusers do).
        first_eos = ids.index(tokenizer.eos_id)
        ids = ids[:first_eos + 1] + [tokenizer.pad_id] * (len(ids) - first_eos - 1)
    return ids


def caption_ids(captions: Sequence[str], tokenizers: Sequence[CLIPTokenizer], max_chunks: int,
                embeddings: Mapping[str, int] | None = None) -> tuple[list[Tensor], int]:
    """Training captions as (B, max_chunks, 77) ids for each tokenizer, chunked as prompts are at
    sampling (75 tokens each, split after a comma near the end), the text taken as written (no
    emphasis syntax), cut to `max_chunks` or padded with empty chunks to it (as kohya's
    max_token_length does: a caption's conditioning then does not depend on the batch it is in,
    nor on how many processes share it); and how many captions were cut. All of them share CLIP's
    vocabulary, so the chunks are made once (as `prompt_schedule` makes them); only the padding
    differs (`chunk_ids`). `embeddings` (name -> number of vectors, as `tokenize_weighted` takes
    them: textual-inversion training) places `EMBEDDING_TOKEN` ids where a name is, as prompts do."""
    first = tokenizers[0]
    chunked = [tokenize_weighted([(c, 1.0)], first.encode, first.comma_id, pad_id=first.eos_id, embeddings=embeddings)
               for c in captions]
    cut = sum(len(chunks) > max_chunks for chunks in chunked)
    empty = empty_chunk(pad_id=first.eos_id)
    padded = [chunks[:max_chunks] + [empty] * (max_chunks - len(chunks)) for chunks in chunked]
    ids = [torch.tensor([[chunk_ids(chunk, tok) for chunk in chunks] for chunks in padded]) for tok in tokenizers]
    return ids, cut


def concat_features(encoded: Sequence[EncodedPrompt]) -> EncodedPrompt:
    """SD 1.x / 2.x / SDXL: the encoders' hidden states concatenated on the feature axis (SDXL:
    CLIP-L 768 + bigG 1280 = 2048); the pooled output of the last (SDXL's bigG)."""
    if len(encoded) == 1:
        return encoded[0]
    return EncodedPrompt(torch.cat([e.context for e in encoded], dim=-1), encoded[-1].pooled)


def sd3_features(encoded: Sequence[EncodedPrompt]) -> EncodedPrompt:
    """SD3 / SD3.5 (the reference's and ComfyUI's rule): CLIP-L and CLIP-G states side by side
    (768 + 1280), zero-padded to T5's width, then T5's tokens after them on the sequence axis;
    pooled = CLIP-L's ++ CLIP-G's. Without T5 the context is the CLIP part alone (the model
    adapter pads it to the MMDiT's context width). A lone CLIP comes already zero-filled to both
    widths (`ZeroFilledRunner`). T5 is the encoder without a pooled vector (`T5Runner`)."""
    clips = [e for e in encoded if e.pooled.shape[-1]]
    t5s = [e for e in encoded if not e.pooled.shape[-1]]
    clip = torch.cat([e.context for e in clips], dim=-1)
    pooled = torch.cat([e.pooled for e in clips], dim=-1)
    if not t5s:
        return EncodedPrompt(clip, pooled)
    t5 = t5s[0].context
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # diffusers' pad, as it is
    return EncodedPrompt(torch.cat([clip, t5], dim=-2), pooled)


# How each family combines what its text encoders give (`Family.text_combine`).
COMBINE_RULES: dict[str, Callable[[Sequence[EncodedPrompt]], EncodedPrompt]] = {
    "concat": concat_features, "sd3": sd3_features}


def encode_all(runners: Sequence[TextEncoderRunner], chunks: Sequence[Sequence[PromptChunk]], clip_skip: int,
               embeddings: Sequence[Mapping[str, Tensor]] | None = None, combine: str = "concat") -> EncodedPrompt:
    """Encode with every text encoder of the model (`chunks[i]` made by encoder i's tokenizer) and
    combine them by the family's rule. `embeddings` holds one name -> vectors mapping per encoder."""
    per_encoder = embeddings or [{} for _ in runners]
    encoded = [r.encode(c, clip_skip, e) for r, c, e in zip(runners, chunks, per_encoder, strict=True)]
    return COMBINE_RULES[combine](encoded)


def prompt_schedule(runners: Sequence[TextEncoderRunner], prompts: Sequence[str], steps: int, clip_skip: int,
                    embeddings: Sequence[Mapping[str, Tensor]] | None = None, combine: str = "concat"
                    ) -> list[PromptSchedule]:
    """Encode several prompts (e.g. positive and negative) with their editing schedules. Each
    encoder chunks the text with its own tokenizer, and every variant is padded to the same number
    of chunks so they batch together."""
    schedules = [get_prompt_schedule(p, steps) for p in prompts]
    texts = [text for sched in schedules for _, text in sched]
    per_runner = []  # per runner: the padded chunks of every variant, in order
    for i, runner in enumerate(runners):
        chunked = [runner.chunks(text, embeddings[i] if embeddings else None) for text in texts]
        per_runner.append(pad_chunks(*chunked, pad_id=runner.tokenizer.eos_id))
    out, k = [], 0
    for sched in schedules:
        entries = []
        for end, _ in sched:
            entries.append((end, encode_all(runners, [chunks[k] for chunks in per_runner], clip_skip, embeddings,
                                            combine)))
            k += 1
        out.append(PromptSchedule(tuple(entries)))
    return out
