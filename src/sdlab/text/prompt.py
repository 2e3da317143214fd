"""Prompt syntax of the AUTOMATIC1111 web UI, with its exact semantics.

A prompt goes through these steps, in the order A1111's processing applies them:

1. `extract_extra_networks` removes `<lora:NAME:MULT>`-style tags and returns them.
2. `parse_and` splits composable-diffusion subprompts (`a AND b :1.2`) with their weights.
3. `get_prompt_schedule` turns each subprompt into the plain prompt for each range of
   sampling steps (prompt editing `[from:to:when]`, alternation `[a|b]`).
4. `parse_prompt_attention` splits each plain prompt into `(text, weight)` pieces
   (`(word)`, `[word]`, `(word:1.3)`, `BREAK`).
5. `tokenize_weighted` turns the pieces into 75-token chunks with one weight per token;
   the caller adds BOS/EOS (77 tokens per chunk) and encodes each chunk separately.

Sources, AUTOMATIC1111/stable-diffusion-webui v1.10: `modules/prompt_parser.py`,
`modules/sd_hijack_clip.py` (`tokenize_line`), `modules/extra_networks.py` (`parse_prompt`),
`extensions-builtin/Lora/extra_networks_lora.py` and `modules/textual_inversion/
textual_inversion.py` (`find_embedding_at_position`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from sdlab.errors import SdlabError

__all__ = [
    "CLIP_END_OF_TEXT",
    "EMBEDDING_TOKEN",
    "EmbeddingRef",
    "ExtraNetwork",
    "PromptChunk",
    "empty_chunk",
    "extract_extra_networks",
    "get_prompt_schedule",
    "pad_chunks",
    "parse_and",
    "parse_prompt_attention",
    "tokenize_weighted",
]

# <|endoftext|> of the CLIP BPE vocabulary (CLIP-L and OpenCLIP alike). A1111 pads chunks
# with it; for SD 2.x the conditioning code replaces everything after the first one with
# the model's pad id, as A1111's `process_tokens` does.
CLIP_END_OF_TEXT = 49407

# Placeholder id at the positions of textual-inversion vectors. Negative on purpose: a chunk
# whose embeddings were not spliced in fails loudly in `nn.Embedding` instead of silently
# encoding token 0 (A1111 writes 0 there and overwrites the vectors afterwards).
EMBEDDING_TOKEN = -1


# --------------------------------------------------------------------------------------
# Emphasis: (word), [word], (word:1.3), BREAK
# --------------------------------------------------------------------------------------

# Same alternatives, same order as A1111's `re_attention`: escapes first, then brackets,
# then an explicit weight closing a round bracket, then plain text.
_RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)

_ROUND_MULTIPLIER = 1.1
_SQUARE_MULTIPLIER = 1 / 1.1


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into `(text, weight)` pieces, exactly as A1111's `parse_prompt_attention`.

    `(abc)` multiplies by 1.1, `[abc]` divides by 1.1, `(abc:3.12)` multiplies by 3.12, and
    nesting multiplies. `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literal characters (any other
    backslash is dropped). Brackets still open at the end apply their multiplier to the rest of
    the prompt; a closing bracket with nothing open is plain text. `BREAK` becomes the marker
    `("BREAK", -1.0)`. Adjacent pieces of equal weight are merged; an empty prompt gives
    `[("", 1.0)]`.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    res: list[list] = []  # [text, weight] pairs, mutated in place like A1111's
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _RE_ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(res))
        elif piece == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), _parse_weight(weight, text))
        elif piece == ")" and round_brackets:
            multiply_range(round_brackets.pop(), _ROUND_MULTIPLIER)
        elif piece == "]" and square_brackets:
            multiply_range(square_brackets.pop(), _SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_RE_BREAK.split(piece)):
                if i > 0:
                    res.append(["BREAK", -1.0])
                res.append([part, 1.0])

    for pos in round_brackets:
        multiply_range(pos, _ROUND_MULTIPLIER)
    for pos in square_brackets:
        multiply_range(pos, _SQUARE_MULTIPLIER)

    if not res:
        res = [["", 1.0]]

    # Merge runs of identical weights (exact float equality, as A1111).
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(t, float(w)) for t, w in res]


def _parse_weight(weight: str, prompt: str) -> float:
    # `[.\d]+` also matches "." or "1.2.3"; A1111 crashes on those with a ValueError.
    try:
        return float(weight)
    except ValueError:
        raise SdlabError(
            f"bad emphasis weight {weight!r} in prompt {_short(prompt)}: write a number such as (word:1.2)"
        ) from None


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


# --------------------------------------------------------------------------------------
# Prompt editing and alternation: [from:to:when], [to:when], [from::when], [a|b|c]
# --------------------------------------------------------------------------------------
#
# A1111 parses with this lark grammar (Earley, dynamic lexer) and, when the parse fails,
# uses the whole prompt unchanged for every step:
#
#   !start: (prompt | /[][():]/+)*
#   prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
#   !emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
#   scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
#   alternate: "[" prompt ("|" [prompt])+ "]"
#   WHITESPACE: /\s+/
#   plain: /([^\\\[\]():|]|\\.)+/
#   %import common.SIGNED_NUMBER -> NUMBER
#
# The recursive-descent parser below accepts the same language. Inside a bracket every
# nested bracket must be a well-formed construct, so the parse from an opening bracket is
# deterministic; only at the top level may `[ ] ( ) :` also stand for themselves. There we
# try a construct at each opening bracket and fall back to the literal character when it
# does not parse. Where lark has both readings (e.g. "[a:b:3]]") its choice depends on
# Python's string-hash seed, i.e. A1111 itself is not deterministic; we always take the
# construct, which is what A1111 gives for every well-formed prompt.

# lark's common.SIGNED_NUMBER, matched greedily at one position like lark's dynamic lexer.
_RE_NUMBER = re.compile(r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)")
_RE_WHITESPACE = re.compile(r"\s+")
_SPECIAL = frozenset("[]():|\\")


@dataclass(frozen=True)
class _Scheduled:
    before: tuple | None  # None for [to:when]: nothing before the switch
    after: tuple
    number: str  # the NUMBER exactly as written; "." in it decides step vs fraction


@dataclass(frozen=True)
class _Alternate:
    options: tuple  # of node tuples; an empty option is ()


class _NoParse(Exception):
    """The text does not match the grammar (here: at this bracket)."""


class _ScheduleParser:
    def __init__(self, text: str) -> None:
        self.text = text
        # The parse of a bracket depends only on where it opens, so remember it: a prompt
        # full of unclosed brackets then costs linear time, not one rescan per bracket.
        self._brackets: dict[int, tuple[list, int] | None] = {}

    def parse(self) -> tuple:
        """Nodes of the whole prompt; raises _NoParse when A1111's grammar rejects it."""
        s, n = self.text, len(self.text)
        nodes: list = []
        i = 0
        while i < n:
            c = s[i]
            if c in "[(":
                try:
                    node_list, i = self._bracket(i)
                    nodes.extend(node_list)
                    continue
                except _NoParse:
                    pass  # the bracket is a literal character at the top level
                nodes.append(c)
                i += 1
            elif c in "]):":
                nodes.append(c)
                i += 1
            else:
                text, i = self._plain(i)
                if not text:  # "|" outside an alternation: nothing in the grammar takes it
                    raise _NoParse
                nodes.append(text)
        return tuple(nodes)

    def _plain(self, i: int) -> tuple[str, int]:
        """Plain text and whitespace from i up to the next special character."""
        s, n = self.text, len(self.text)
        start = i
        while i < n:
            c = s[i]
            if c == "\\":
                # `\\.`: any character but a newline may be escaped; a lone backslash
                # at the end (or before a newline) matches no terminal at all.
                if i + 1 >= n or s[i + 1] == "\n":
                    raise _NoParse
                i += 2
            elif c in _SPECIAL:
                break
            else:
                i += 1
        return s[start:i], i

    def _prompt(self, i: int) -> tuple[list, int]:
        """An inner prompt: text and well-formed brackets, stopping at ] ) : | or the end."""
        s, n = self.text, len(self.text)
        nodes: list = []
        while i < n:
            c = s[i]
            if c in "[(":
                node_list, i = self._bracket(i)
                nodes.extend(node_list)
            elif c in "]):|":
                break
            else:
                text, i = self._plain(i)
                nodes.append(text)
        return nodes, i

    def _expect(self, i: int, char: str) -> int:
        if i < len(self.text) and self.text[i] == char:
            return i + 1
        raise _NoParse

    def _when(self, i: int) -> tuple[str, int]:
        """`[WHITESPACE] NUMBER [WHITESPACE] "]"` after the last colon."""
        s = self.text
        m = _RE_WHITESPACE.match(s, i)
        if m:
            i = m.end()
        m = _RE_NUMBER.match(s, i)
        if not m:
            raise _NoParse
        number, i = m.group(0), m.end()
        m = _RE_WHITESPACE.match(s, i)
        if m:
            i = m.end()
        return number, self._expect(i, "]")

    def _bracket(self, i: int) -> tuple[list, int]:
        """A construct opening at i; returns its nodes (literal brackets as text)."""
        if i not in self._brackets:
            try:
                self._brackets[i] = self._parse_bracket(i)
            except _NoParse:
                self._brackets[i] = None
        result = self._brackets[i]
        if result is None:
            raise _NoParse
        return result

    def _parse_bracket(self, i: int) -> tuple[list, int]:
        s, n = self.text, len(self.text)
        if s[i] == "(":
            first, j = self._prompt(i + 1)
            if j < n and s[j] == ":":
                second, j = self._prompt(j + 1)
                return ["(", *first, ":", *second, ")"], self._expect(j, ")")
            return ["(", *first, ")"], self._expect(j, ")")

        first, j = self._prompt(i + 1)
        if j >= n:
            raise _NoParse
        c = s[j]
        if c == "]":
            return ["[", *first, "]"], j + 1
        if c == "|":
            options = [tuple(first)]
            while j < n and s[j] == "|":
                option, j = self._prompt(j + 1)
                options.append(tuple(option))
            return [_Alternate(tuple(options))], self._expect(j, "]")
        if c == ":":
            try:  # [to:when]
                number, end = self._when(j + 1)
                return [_Scheduled(None, tuple(first), number)], end
            except _NoParse:
                pass
            second, j = self._prompt(j + 1)  # [from:to:when]
            j = self._expect(j, ":")
            number, end = self._when(j)
            return [_Scheduled(tuple(first), tuple(second), number)], end
        raise _NoParse  # ")" closing a "["


def _walk(nodes: tuple):
    for node in nodes:
        if isinstance(node, _Scheduled):
            yield node
            yield from _walk(node.before or ())
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            yield node
            for option in node.options:
                yield from _walk(option)


def _when_step(number: str, steps: int, use_old_scheduling: bool) -> int:
    v = float(number)
    if use_old_scheduling:
        v = v * steps if v < 1 else v
    elif "." in number:
        v = v * steps
    # Same as A1111's min(steps, int(v)); clamping first keeps "1e999" from overflowing
    # int(), and every value below 1 acts alike (the "before" text never shows).
    return int(min(max(v, -1.0), float(steps)))


def _render(nodes: tuple, step: int, whens: dict[int, int]) -> str:
    out: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            chosen = (node.before or ()) if step <= whens[id(node)] else node.after
            out.append(_render(chosen, step, whens))
        else:
            out.append(_render(node.options[(step - 1) % len(node.options)], step, whens))
    return "".join(out)


def get_prompt_schedule(prompt: str, steps: int, *, use_old_scheduling: bool = False) -> list[tuple[int, str]]:
    """The plain prompt for each range of sampling steps, as A1111's
    `get_learned_conditioning_prompt_schedules` gives for one prompt without hires fix.

    Each entry is `(end_at_step, text)`; the last entry ends at `steps`. A1111 picks, at
    sampler step `s` counted from 0 (`CFGDenoiser.step`, one per model call), the first entry
    with `s <= end_at_step`: with `[a:b:3]` the first 4 steps (0..3) use `a`.

    `[from:to:when]` switches from `from` to `to` after step `when`; `[to:when]` adds `to`
    after it and `[from::when]` removes `from` after it. `when` written with a "." is a
    fraction of `steps` (`0.25`, `.5`), otherwise a step number, clamped to `steps`; a `when`
    below 1 never shows the "before" text. `[a|b|c]` takes the next option at every step.
    Anything that only looks like syntax (`[a:b]`, `(a:1.2)`, `[word]`, escaped brackets)
    is kept verbatim for `parse_prompt_attention`. A prompt the grammar rejects (a `|`
    outside `[...]`, a trailing backslash) is used unchanged for all steps.

    Args:
        prompt: one prompt (after extra-network tags and `AND` were split off).
        steps: number of sampling steps, at least 1.
        use_old_scheduling: A1111's "use old prompt editing timelines" option: `when`
            below 1 is a fraction and 1 or more a step number, however it is written.
    """
    if steps < 1:
        raise SdlabError(f"steps must be at least 1 to schedule a prompt, got {steps}")
    try:
        nodes = _ScheduleParser(prompt).parse()
        boundaries = {steps}
        whens: dict[int, int] = {}
        for node in _walk(nodes):
            if isinstance(node, _Scheduled):
                when = _when_step(node.number, steps, use_old_scheduling)
                whens[id(node)] = when
                if when >= 1:
                    boundaries.add(when)
            else:
                boundaries.update(range(1, steps + 1))
        return [(step, _render(nodes, step, whens)) for step in sorted(boundaries)]
    except (_NoParse, RecursionError):
        # RecursionError: brackets nested hundreds deep, which no real prompt does; keep
        # the prompt whole, as A1111 does with any prompt its parser rejects.
        return [(steps, prompt)]


# --------------------------------------------------------------------------------------
# Composable diffusion: a AND b :1.2
# --------------------------------------------------------------------------------------

_RE_AND = re.compile(r"\bAND\b")
_RE_SUBPROMPT_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def parse_and(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt at `AND` into `(subprompt, weight)`, as A1111's `get_multicond_prompt_list`.

    A trailing `:number` on a subprompt is its weight (default 1.0) and is removed, as is
    trailing whitespace; leading whitespace stays. This applies to a prompt without `AND`
    too: `"a cat:1.5"` is `[("a cat", 1.5)]`.
    """
    result: list[tuple[str, float]] = []
    for subprompt in _RE_AND.split(prompt):
        m = _RE_SUBPROMPT_WEIGHT.search(subprompt)
        assert m is not None  # the pattern matches every string
        text, weight = m.groups()
        result.append((text, float(weight) if weight is not None else 1.0))
    return result


# --------------------------------------------------------------------------------------
# Extra networks: <lora:NAME:MULT>, <lora:NAME:TE:UNET:DYN>, te= unet= dyn=, <hypernet:...>
# --------------------------------------------------------------------------------------

_RE_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_RE_EMPTY_EXTRA_NETWORK = re.compile(r"<(\w+):>")


@dataclass(frozen=True)
class ExtraNetwork:
    """One `<kind:name:...>` tag of a prompt.

    Every kind is read with the LoRA rules of A1111's `extra_networks_lora.py`: positional
    `name:te:unet:dyn`, named `te=`, `unet=`, `dyn=` overriding them; `unet` defaults to
    `te`, `te` to 1.0. For `<hypernet:NAME:MULT>` the multiplier is `te_multiplier`.
    """

    kind: str  # "lora", "hypernet", ... (A1111 also knows "lyco" as an alias of "lora")
    name: str
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0
    dyn_dim: int | None = None  # rank to truncate a dynamic-rank LoRA to; None: all


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetwork]]:
    """Remove `<kind:args>` tags from a prompt and parse them, as A1111's `extra_networks.parse_prompt`.

    Every match of `<(\\w+):([^>]+)>` is removed (nothing else changes, so spaces around a
    tag stay); the tags come back in the order they appear.

    Raises:
        SdlabError: a tag without a name (`<lora:>`, `<lora::1>`) or with a multiplier or
            `dyn` that is not a number.
    """
    empty = _RE_EMPTY_EXTRA_NETWORK.search(prompt)
    if empty:
        raise SdlabError(f"extra network tag {empty.group(0)!r} has no name: write <{empty.group(1)}:NAME:1.0>")
    networks: list[ExtraNetwork] = []

    def found(m: re.Match) -> str:
        networks.append(_parse_extra_network(m.group(0), m.group(1), m.group(2).split(":")))
        return ""

    return _RE_EXTRA_NETWORK.sub(found, prompt), networks


def _parse_extra_network(tag: str, kind: str, items: list[str]) -> ExtraNetwork:
    # ExtraNetworkParams: "key=value" (exactly one "=") is named, anything else positional.
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in items:
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    if not positional or not positional[0].strip():
        raise SdlabError(f"extra network tag {tag!r} has no name: write <{kind}:NAME:1.0>")

    def number(text: str, convert: Callable[[str], float]) -> float:
        try:
            value = convert(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise SdlabError(f"extra network tag {tag!r}: {text!r} is not a number (e.g. <{kind}:NAME:0.8>)")
        return value

    te = number(positional[1], float) if len(positional) > 1 else 1.0
    te = number(named["te"], float) if "te" in named else te
    unet = number(positional[2], float) if len(positional) > 2 else te
    unet = number(named["unet"], float) if "unet" in named else unet
    dyn = int(number(positional[3], int)) if len(positional) > 3 else None
    dyn = int(number(named["dyn"], int)) if "dyn" in named else dyn
    return ExtraNetwork(kind, positional[0], te, unet, dyn)


# --------------------------------------------------------------------------------------
# Long prompts: 75-token chunks with per-token weights
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingRef:
    """A textual-inversion embedding placed in a chunk.

    Its vectors go at `offset .. offset + vectors - 1` of the chunk's 75 tokens (add 1 for
    the BOS token the caller puts in front); those token positions hold `EMBEDDING_TOKEN`.
    """

    offset: int
    name: str
    vectors: int


@dataclass(frozen=True)
class PromptChunk:
    """One chunk of a prompt: exactly `chunk_length` (75) token ids and weights, no BOS/EOS.

    Padding is `pad_id` (CLIP's end-of-text) with weight 1.0. The caller encodes
    `[BOS] + tokens + [EOS]` (77 tokens) per chunk and concatenates the results.
    """

    tokens: list[int]
    weights: list[float]
    embeddings: list[EmbeddingRef] = field(default_factory=list)


def empty_chunk(chunk_length: int = 75, pad_id: int = CLIP_END_OF_TEXT) -> PromptChunk:
    """The chunk of an empty prompt (A1111's `empty_chunk` without BOS/EOS)."""
    return PromptChunk([pad_id] * chunk_length, [1.0] * chunk_length, [])


def pad_chunks(*chunk_lists: list[PromptChunk], pad_id: int = CLIP_END_OF_TEXT) -> list[list[PromptChunk]]:
    """Pad chunk lists (e.g. positive and negative prompt) with empty chunks to the same count.

    This is what A1111 does with its "pad prompt/negative prompt to be same length" option, so
    cond and uncond can go through the model as one batch: `pos, neg = pad_chunks(pos, neg)`.
    """
    lengths = {len(chunk.tokens) for chunks in chunk_lists for chunk in chunks}
    if len(lengths) > 1:
        raise ValueError(f"chunks of different lengths {sorted(lengths)} cannot be padded together")
    chunk_length = lengths.pop() if lengths else 75
    count = max((len(chunks) for chunks in chunk_lists), default=0)
    return [
        list(chunks) + [empty_chunk(chunk_length, pad_id) for _ in range(count - len(chunks))]
        for chunks in chunk_lists
    ]


def tokenize_weighted(
    parsed: Sequence[tuple[str, float]],
    encode: Callable[[str], list[int]],
    comma_id: int,
    chunk_length: int = 75,
    comma_backtrack: int = 20,
    *,
    pad_id: int = CLIP_END_OF_TEXT,
    embeddings: Mapping[str, int] | None = None,
) -> list[PromptChunk]:
    """Token ids and weights of a parsed prompt in chunks, as A1111's `tokenize_line`.

    A chunk takes `chunk_length` tokens. When a chunk is full and a comma lies within its last
    `comma_backtrack` tokens, the tokens after that comma move to the next chunk (0 turns
    this off). `("BREAK", -1)` ends the current chunk. The last chunk is padded; there is
    always at least one chunk.

    Args:
        parsed: `(text, weight)` pieces from `parse_prompt_attention`.
        encode: text -> token ids without BOS/EOS (the CLIP BPE tokenizer).
        comma_id: the token id of "," (`,</w>` in CLIP's vocabulary).
        chunk_length: tokens per chunk, 75 for CLIP's 77-token context.
        comma_backtrack: A1111's `comma_padding_backtrack` option.
        pad_id: token that fills the end of a chunk.
        embeddings: textual-inversion embeddings, name -> number of vectors. As in A1111 a
            name is found by its token ids (`encode(name)`) inside each piece, the longest
            name first; it takes `vectors` positions, is never split across chunks, and is
            reported in `PromptChunk.embeddings`.

    Raises:
        SdlabError: an embedding with fewer than 1 or more than `chunk_length` vectors.
    """
    lookup = _embedding_lookup(embeddings or {}, encode, chunk_length)
    chunks: list[PromptChunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    refs: list[EmbeddingRef] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal tokens, weights, refs, last_comma
        to_add = chunk_length - len(tokens)
        chunks.append(PromptChunk(tokens + [pad_id] * to_add, weights + [1.0] * to_add, refs))
        tokens, weights, refs = [], [], []
        last_comma = -1

    for (text, weight), ids in zip(parsed, [encode(text) for text, _ in parsed]):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue

        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma_id:
                last_comma = len(tokens)
            # The chunk is full and the current token is not a comma: if a comma is near,
            # move the text after it to the next chunk so a phrase is not cut in two.
            elif (
                comma_backtrack != 0
                and len(tokens) == chunk_length
                and last_comma != -1
                and len(tokens) - last_comma <= comma_backtrack
            ):
                cut = last_comma + 1
                moved_tokens, moved_weights = tokens[cut:], weights[cut:]
                # A1111 leaves the moved embeddings' fixes behind (their vectors then land on
                # padding); we move them with their tokens.
                moved_refs = [EmbeddingRef(r.offset - cut, r.name, r.vectors) for r in refs if r.offset >= cut]
                tokens, weights = tokens[:cut], weights[:cut]
                refs = [r for r in refs if r.offset < cut]
                next_chunk()
                tokens, weights, refs = moved_tokens, moved_weights, moved_refs

            if len(tokens) == chunk_length:
                next_chunk()

            match = _find_embedding(lookup, ids, position)
            if match is None:
                tokens.append(token)
                weights.append(weight)
                position += 1
                continue

            name, vectors, length_in_tokens = match
            if len(tokens) + vectors > chunk_length:
                next_chunk()
            refs.append(EmbeddingRef(len(tokens), name, vectors))
            tokens += [EMBEDDING_TOKEN] * vectors
            weights += [weight] * vectors
            position += length_in_tokens

    if tokens or not chunks:
        next_chunk()
    return chunks


def _embedding_lookup(
    embeddings: Mapping[str, int], encode: Callable[[str], list[int]], chunk_length: int
) -> dict[int, list[tuple[list[int], str, int]]]:
    """first token id -> [(token ids of the name, name, vectors)], longest name first."""
    lookup: dict[int, list[tuple[list[int], str, int]]] = {}
    for name, vectors in embeddings.items():
        if not 1 <= vectors <= chunk_length:
            raise SdlabError(
                f"embedding {name!r} has {vectors} vectors; it must have 1 to {chunk_length} to fit in a prompt chunk"
            )
        ids = list(encode(name))
        if not ids:
            continue  # a name that encodes to nothing can never appear in a prompt
        lookup.setdefault(ids[0], []).append((ids, name, vectors))
    for candidates in lookup.values():
        candidates.sort(key=lambda c: len(c[0]), reverse=True)
    return lookup


def _find_embedding(
    lookup: dict[int, list[tuple[list[int], str, int]]], ids: list[int], position: int
) -> tuple[str, int, int] | None:
    for name_ids, name, vectors in lookup.get(ids[position], ()):
        if ids[position : position + len(name_ids)] == name_ids:
            return name, vectors, len(name_ids)
    return None
