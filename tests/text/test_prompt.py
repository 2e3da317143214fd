"""Prompt syntax against the AUTOMATIC1111 web UI's exact results.

Expected values come from A1111 v1.10 (`modules/prompt_parser.py` docstrings and its code run on
these inputs); the float weights are the exact products its parser computes.
"""

import re

import pytest

from sdlab.errors import SdlabError
from sdlab.text.prompt import (
    CLIP_END_OF_TEXT,
    EMBEDDING_TOKEN,
    EmbeddingRef,
    ExtraNetwork,
    PromptChunk,
    empty_chunk,
    extract_extra_networks,
    get_prompt_schedule,
    pad_chunks,
    parse_and,
    parse_prompt_attention,
    tokenize_weighted,
)

# --------------------------------------------------------------------------------------
# Emphasis
# --------------------------------------------------------------------------------------

ATTENTION_CASES = [
    # A1111's docstring
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    # plain emphasis and nesting
    ("", [("", 1.0)]),
    ("(word)", [("word", 1.1)]),
    ("((word))", [("word", 1.2100000000000002)]),
    ("(((word)))", [("word", 1.3310000000000004)]),
    ("[word]", [("word", 0.9090909090909091)]),
    ("[[word]]", [("word", 0.8264462809917354)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("(word: 1.3 )", [("word", 1.3)]),
    ("(word:0.5)", [("word", 0.5)]),
    ("(word:-1)", [("word", -1.0)]),
    ("(word:0)", [("word", 0.0)]),
    ("(a:.5)", [("a", 0.5)]),
    ("(a:+2)", [("a", 2.0)]),
    ("(a:1.)", [("a", 1.0)]),
    ("((a:1.3))", [("a", 1.4300000000000002)]),
    ("((a:1.5) b)", [("a", 1.6500000000000001), (" b", 1.1)]),
    ("[(word:1.2)]", [("word", 1.0909090909090908)]),
    ("([word])", [("word", 1.0)]),
    ("(a [b] c)", [("a ", 1.1), ("b", 1.0), (" c", 1.1)]),
    ("[a (b) c]", [("a ", 0.9090909090909091), ("b", 1.0), (" c", 0.9090909090909091)]),
    # merging of equal neighbours
    ("(a:1.2) (b:1.2)", [("a", 1.2), (" ", 1.0), ("b", 1.2)]),
    ("(a:1.2)(b:1.2)", [("ab", 1.2)]),
    # unbalanced brackets
    ("[unbalanced", [("unbalanced", 0.9090909090909091)]),
    ("[[a]", [("a", 0.8264462809917354)]),
    ("((a)", [("a", 1.2100000000000002)]),
    ("(a [b", [("a ", 1.1), ("b", 1.0)]),
    ("(a))", [("a", 1.1), (")", 1.0)]),
    ("a ]b", [("a ]b", 1.0)]),
    ("a )b", [("a )b", 1.0)]),
    ("a :b", [("a :b", 1.0)]),
    ("a:1.2)", [("a:1.2)", 1.0)]),
    ("(a:1.2:3)", [("a:1.2", 3.0)]),
    ("[(a]:1.5)", [("a", 1.3636363636363635)]),
    # text that is syntax elsewhere
    ("[a:b:3]", [("a:b:3", 0.9090909090909091)]),
    ("(a|b)", [("a|b", 1.1)]),
    # escapes
    ("\\\\", [("\\", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # a backslash before anything else is dropped
    ("\\(a\\)", [("(a)", 1.0)]),
    ("\\[a\\]", [("[a]", 1.0)]),
    ("(a\\)b)", [("a)b", 1.1)]),
    # BREAK
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("aBREAKb", [("aBREAKb", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # no longer a break marker
    ("a, b, (c:1.4), BREAK, d", [("a, b, ", 1.0), ("c", 1.4), (",", 1.0), ("BREAK", -1.0), (", d", 1.0)]),
]


@pytest.mark.parametrize("prompt, expected", ATTENTION_CASES, ids=[repr(p) for p, _ in ATTENTION_CASES])
def test_parse_prompt_attention(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


@pytest.mark.parametrize("prompt", ["(a:.)", "(a:1.2.3)"])
def test_parse_prompt_attention_bad_weight(prompt):
    # A1111 crashes here with a ValueError from float(); we say what is wrong.
    with pytest.raises(SdlabError, match="bad emphasis weight"):
        parse_prompt_attention(prompt)


# --------------------------------------------------------------------------------------
# Prompt editing and alternation
# --------------------------------------------------------------------------------------

FANTASY = (
    "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
    "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]"
)

SCHEDULE_CASES = [
    # A1111's docstring (steps=10)
    ("test", 10, [(10, "test")]),
    ("a [b:3]", 10, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", 10, [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]),
    ("[fe|]male", 10, [(i, "female" if i % 2 else "male") for i in range(1, 11)]),
    ("[fe|||]male", 10, [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)]),
    # The docstring claims [[5, 'a  c'], [10, 'a {b|d{ c']] ("not handling this right now"); with
    # v1.10's grammar "|" is not plain text, the parse fails and the prompt is kept whole.
    ("a [{b|d{:.5] c", 10, [(10, "a [{b|d{:.5] c")]),
    # The example at the top of prompt_parser.py, at 20 steps
    (
        FANTASY,
        20,
        [
            (5, "fantasy landscape with a mountain and an oak in foreground shoddy"),
            (10, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
            (12, "fantasy landscape with a lake and an oak in foreground in background masterful"),
            (15, "fantasy landscape with a lake and an oak in background masterful"),
            (20, "fantasy landscape with a lake and a christmas tree in background masterful"),
        ],
    ),
    # when: a step number, or a fraction when written with "."
    ("a [cat:dog:10] photo", 20, [(10, "a cat photo"), (20, "a dog photo")]),
    ("a [cat:dog:0.5] photo", 30, [(15, "a cat photo"), (30, "a dog photo")]),
    ("[a:b:20]", 30, [(20, "a"), (30, "b")]),
    ("[cat::5]", 20, [(5, "cat"), (20, "")]),
    ("[a:b:0.33]", 30, [(9, "a"), (30, "b")]),  # int(9.9)
    ("[a:b:1e1]", 20, [(10, "a"), (20, "b")]),  # no "." -> a step number
    ("[a:b:1.5]", 10, [(10, "a")]),  # "." -> 1.5 * 10 steps, clamped to 10
    ("[a:b:25]", 20, [(20, "a")]),
    ("[a:b:0]", 10, [(10, "b")]),
    ("[a:b:-1]", 10, [(10, "b")]),
    ("[a: b :3 ]", 10, [(3, "a"), (10, " b ")]),
    # nesting, alternation with editing
    ("[[a:b:2]:3]", 10, [(2, ""), (3, ""), (10, "b")]),
    ("[a|b] [c:d:3]", 4, [(1, "a c"), (2, "b c"), (3, "a c"), (4, "b d")]),
    ("[[a|b]:[c|d]:0.5]", 4, [(1, "a"), (2, "b"), (3, "c"), (4, "d")]),
    ("[(a:1.2)|[b]|c]", 30, [(i, ["(a:1.2)", "[b]", "c"][(i - 1) % 3]) for i in range(1, 31)]),
    # escapes and text that only looks like syntax
    ("(a:1.2) [b:c:3]", 10, [(3, "(a:1.2) b"), (10, "(a:1.2) c")]),
    ("[a\\:b:c:4]", 10, [(4, "a\\:b"), (10, "c")]),
    ("a \\[b:c:3\\]", 10, [(10, "a \\[b:c:3\\]")]),
    ("a [b:c] d", 10, [(10, "a [b:c] d")]),
    ("[a:b:3:4]", 10, [(10, "[a:b:3:4]")]),
    ("[a:b:3 4]", 10, [(10, "[a:b:3 4]")]),
    ("", 10, [(10, "")]),
    # prompts the grammar rejects are kept whole
    ("a | b [c:d:3]", 10, [(10, "a | b [c:d:3]")]),
    ("[a|b:3]", 10, [(10, "[a|b:3]")]),
    ("a [b:3] \\", 10, [(10, "a [b:3] \\")]),
]


@pytest.mark.parametrize("prompt, steps, expected", SCHEDULE_CASES, ids=[repr(c[0])[:40] for c in SCHEDULE_CASES])
def test_get_prompt_schedule(prompt, steps, expected):
    assert get_prompt_schedule(prompt, steps) == expected


def test_get_prompt_schedule_old_timelines():
    # "Use old prompt editing timelines": below 1 a fraction, else a step, however written.
    assert get_prompt_schedule("[a:b:1.5]", 10, use_old_scheduling=True) == [(1, "a"), (10, "b")]
    assert get_prompt_schedule("[a:b:1.0]", 10, use_old_scheduling=True) == [(1, "a"), (10, "b")]
    assert get_prompt_schedule("[a:b:1.0]", 10) == [(10, "a")]
    assert get_prompt_schedule("[a:b:0.5]", 10, use_old_scheduling=True) == [(5, "a"), (10, "b")]


def test_get_prompt_schedule_needs_steps():
    with pytest.raises(SdlabError):
        get_prompt_schedule("a", 0)


def test_get_prompt_schedule_long_prompt_is_fast():
    # Many unclosed brackets make every "[" a failed attempt; this must stay quick.
    prompt = "[" * 300 + "a [b:c:3] " * 50
    schedule = get_prompt_schedule(prompt, 20)
    assert [step for step, _ in schedule] == [3, 20]


# --------------------------------------------------------------------------------------
# Composable diffusion
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a cat", [("a cat", 1.0)]),
        ("a AND b", [("a", 1.0), (" b", 1.0)]),
        ("a :1.2 AND b:0.5", [("a", 1.2), (" b", 0.5)]),
        ("a cat:1.5", [("a cat", 1.5)]),  # a trailing weight counts without AND too
        ("a AND b AND c :-1", [("a", 1.0), (" b", 1.0), (" c", -1.0)]),
        ("(a:1.2)", [("(a:1.2)", 1.0)]),
        ("a ANDb", [("a ANDb", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parse_and(prompt, expected):
    assert parse_and(prompt) == expected


# --------------------------------------------------------------------------------------
# Extra networks
# --------------------------------------------------------------------------------------

EXTRA_NETWORK_CASES = [
    ("a <lora:foo:0.8> b", "a  b", [ExtraNetwork("lora", "foo", 0.8, 0.8, None)]),
    ("<lora:foo>cat", "cat", [ExtraNetwork("lora", "foo", 1.0, 1.0, None)]),
    ("<lora:foo:0.5:0.7>", "", [ExtraNetwork("lora", "foo", 0.5, 0.7, None)]),
    ("<lora:foo:1:0.5:8>", "", [ExtraNetwork("lora", "foo", 1.0, 0.5, 8)]),
    ("<lora:foo:te=0.3:unet=0.6:dyn=4>", "", [ExtraNetwork("lora", "foo", 0.3, 0.6, 4)]),
    ("<lora:foo:0.5:te=0.8>", "", [ExtraNetwork("lora", "foo", 0.8, 0.8, None)]),  # unet follows te
    ("<lora:foo:0.5:unet=0>", "", [ExtraNetwork("lora", "foo", 0.5, 0.0, None)]),
    ("x <hypernet:bar:0.6>", "x ", [ExtraNetwork("hypernet", "bar", 0.6, 0.6, None)]),
    ("<lyco:my style v2:-0.4>", "", [ExtraNetwork("lyco", "my style v2", -0.4, -0.4, None)]),
    (
        "<lora:a:1>, b <lora:c:0.2> <hypernet:d>",
        ", b  ",
        [
            ExtraNetwork("lora", "a", 1.0, 1.0, None),
            ExtraNetwork("lora", "c", 0.2, 0.2, None),
            ExtraNetwork("hypernet", "d", 1.0, 1.0, None),
        ],
    ),
    ("no tags (a:1.2) [b:c:3]", "no tags (a:1.2) [b:c:3]", []),
    ("a<b c>d <lora-x:y> <:z>", "a<b c>d <lora-x:y> <:z>", []),  # not tags for `<(\w+):([^>]+)>`
]


@pytest.mark.parametrize("prompt, text, networks", EXTRA_NETWORK_CASES, ids=[c[0] for c in EXTRA_NETWORK_CASES])
def test_extract_extra_networks(prompt, text, networks):
    assert extract_extra_networks(prompt) == (text, networks)


@pytest.mark.parametrize(
    "prompt, tag",
    [
        ("a <lora:> b", "<lora:>"),
        ("<lora::1>", "<lora::1>"),
        ("<lora:foo:abc>", "<lora:foo:abc>"),
        ("<lora:foo:te=x>", "<lora:foo:te=x>"),
        ("<lora:foo:1:1:1.5>", "<lora:foo:1:1:1.5>"),  # dyn must be an integer
        ("<lora:te=1>", "<lora:te=1>"),  # no name
        ("<lora:foo:nan>", "<lora:foo:nan>"),
    ],
)
def test_extract_extra_networks_malformed(prompt, tag):
    with pytest.raises(SdlabError) as info:
        extract_extra_networks(prompt)
    message = str(info.value)
    assert tag in message and "\n" not in message


def test_extra_network_is_frozen():
    net = ExtraNetwork("lora", "foo")
    with pytest.raises(AttributeError):
        net.name = "bar"


# --------------------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------------------

COMMA = 1
PAD = CLIP_END_OF_TEXT


class WordEncoder:
    """One token per word, "," its own token; "tN" encodes to N, other words to ids from 5000."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, text):
        ids = []
        for word in re.findall(r",|[^\s,]+", text):
            if word == ",":
                ids.append(COMMA)
            elif re.fullmatch(r"t\d+", word):
                ids.append(int(word[1:]))
            else:
                ids.append(self.vocab.setdefault(word, 5000 + len(self.vocab)))
        return ids


def words(start, stop):
    return " ".join(f"t{i}" for i in range(start, stop))


def chunks_of(prompt, **kwargs):
    return tokenize_weighted(parse_prompt_attention(prompt), WordEncoder(), COMMA, **kwargs)


def real(chunk):
    """The tokens of a chunk before its padding."""
    tokens = list(chunk.tokens)
    while tokens and tokens[-1] == PAD:
        tokens.pop()
    return tokens


def test_chunk_shapes_and_padding():
    (chunk,) = chunks_of("t10 (t11) [t12]")
    assert len(chunk.tokens) == len(chunk.weights) == 75
    assert chunk.tokens == [10, 11, 12] + [PAD] * 72
    assert chunk.weights == [1.0, 1.1, 1 / 1.1] + [1.0] * 72
    assert chunk.embeddings == []


def test_empty_prompt_is_one_padded_chunk():
    assert chunks_of("") == [empty_chunk()]
    assert empty_chunk().tokens == [PAD] * 75


def test_chunk_boundary_at_75_tokens():
    assert [real(c) for c in chunks_of(words(0, 75))] == [list(range(75))]
    two = chunks_of(words(0, 76))
    assert [real(c) for c in two] == [list(range(75)), [75]]


def test_200_tokens_give_3_chunks():
    chunks = chunks_of(words(100, 300))
    assert len(chunks) == 3
    assert [real(c) for c in chunks] == [list(range(100, 175)), list(range(175, 250)), list(range(250, 300))]


def test_comma_backtrack_moves_phrase_to_next_chunk():
    # The comma is token 71 of the chunk (index 70); 75 - 70 <= 20, so t70..t73 move on.
    chunks = chunks_of(words(0, 70) + ", " + words(70, 80))
    assert real(chunks[0]) == list(range(70)) + [COMMA]
    assert real(chunks[1]) == list(range(70, 80))
    assert chunks[0].weights == [1.0] * 75


def test_comma_backtrack_keeps_weights():
    chunks = chunks_of(words(0, 70) + ", (" + words(70, 80) + ")")
    assert chunks[1].weights[:10] == [1.1] * 10
    assert chunks[1].weights[10:] == [1.0] * 65


def test_comma_too_far_back_is_ignored():
    # Comma at index 50: 75 - 50 = 25 > 20, so the chunk is cut at 75 tokens.
    chunks = chunks_of(words(0, 50) + ", " + words(50, 80))
    assert real(chunks[0]) == list(range(50)) + [COMMA] + list(range(50, 74))
    assert real(chunks[1]) == list(range(74, 80))


def test_comma_backtrack_setting():
    prompt = words(0, 50) + ", " + words(50, 80)
    wide = chunks_of(prompt, comma_backtrack=30)
    assert real(wide[0]) == list(range(50)) + [COMMA]
    prompt = words(0, 70) + ", " + words(70, 80)
    off = chunks_of(prompt, comma_backtrack=0)
    assert real(off[0]) == list(range(70)) + [COMMA] + list(range(70, 74))


def test_comma_arriving_at_a_full_chunk_is_not_a_backtrack_point():
    # A1111 resets the remembered comma when it starts the next chunk, even when the comma
    # itself is the token that opens it.
    chunks = chunks_of(words(0, 75) + ", " + words(75, 160))
    assert real(chunks[0]) == list(range(75))
    assert real(chunks[1]) == [COMMA] + list(range(75, 149))
    assert real(chunks[2]) == list(range(149, 160))


def test_small_chunk_length():
    chunks = chunks_of("t1 t2 , t3 t4 t5", chunk_length=4, comma_backtrack=2)
    assert [c.tokens for c in chunks] == [[1, 2, COMMA, PAD], [3, 4, 5, PAD]]


def test_break_starts_a_new_chunk():
    chunks = chunks_of("t1 t2 BREAK t3")
    assert [real(c) for c in chunks] == [[1, 2], [3]]
    assert chunks_of("t1 BREAK") == chunks_of("t1")
    assert [real(c) for c in chunks_of("BREAK t1")] == [[], [1]]
    assert [real(c) for c in chunks_of("t1 BREAK BREAK t2")] == [[1], [], [2]]


def test_break_inside_parentheses_is_a_word():
    # parse_prompt_attention multiplies the marker to -1.1, so A1111 encodes "BREAK" as text.
    (chunk,) = chunks_of("(t1 BREAK t2)")
    assert real(chunk)[0] == 1 and real(chunk)[2] == 2 and len(real(chunk)) == 3
    assert chunk.weights[1] == -1.1


def test_break_after_a_long_prompt():
    chunks = chunks_of(words(0, 80) + " BREAK t500")
    assert [real(c) for c in chunks] == [list(range(75)), list(range(75, 80)), [500]]


def test_embedding_placeholders():
    (chunk,) = chunks_of("t1 (myemb) t2", embeddings={"myemb": 3})
    assert chunk.tokens[:5] == [1, EMBEDDING_TOKEN, EMBEDDING_TOKEN, EMBEDDING_TOKEN, 2]
    assert chunk.weights[:5] == [1.0, 1.1, 1.1, 1.1, 1.0]
    assert chunk.embeddings == [EmbeddingRef(offset=1, name="myemb", vectors=3)]


def test_embedding_is_matched_on_tokens_longest_first():
    encoder = WordEncoder()
    parsed = parse_prompt_attention("big emb, big t7")
    (chunk,) = tokenize_weighted(parsed, encoder, COMMA, embeddings={"big": 1, "big emb": 2})
    assert chunk.tokens[:5] == [EMBEDDING_TOKEN, EMBEDDING_TOKEN, COMMA, EMBEDDING_TOKEN, 7]
    assert chunk.embeddings == [EmbeddingRef(0, "big emb", 2), EmbeddingRef(3, "big", 1)]


def test_embedding_is_not_split_across_chunks():
    chunks = chunks_of(words(0, 73) + " myemb t99", embeddings={"myemb": 3})
    assert real(chunks[0]) == list(range(73))
    assert chunks[1].tokens[:4] == [EMBEDDING_TOKEN] * 3 + [99]
    assert chunks[1].embeddings == [EmbeddingRef(0, "myemb", 3)]


def test_embedding_moves_with_comma_backtrack():
    # A1111 leaves the embedding's position behind in the first chunk; we move it along.
    chunks = chunks_of(words(0, 70) + ", t70 myemb " + words(80, 90), embeddings={"myemb": 2})
    assert real(chunks[0]) == list(range(70)) + [COMMA]
    assert chunks[0].embeddings == []
    assert chunks[1].tokens[:4] == [70, EMBEDDING_TOKEN, EMBEDDING_TOKEN, 80]
    assert chunks[1].embeddings == [EmbeddingRef(1, "myemb", 2)]


def test_embedding_refs_always_point_at_placeholders():
    prompt = ", ".join(f"t{i} myemb t{i + 1}" for i in range(0, 120, 2))
    for chunk in chunks_of(prompt, embeddings={"myemb": 4}):
        at = [i for i, t in enumerate(chunk.tokens) if t == EMBEDDING_TOKEN]
        covered = [r.offset + k for r in chunk.embeddings for k in range(r.vectors)]
        assert at == covered


@pytest.mark.parametrize("vectors", [0, 76])
def test_embedding_vector_count_is_checked(vectors):
    with pytest.raises(SdlabError, match="myemb"):
        chunks_of("t1", embeddings={"myemb": vectors})


def test_pad_chunks():
    pos = chunks_of(words(0, 100))
    neg = chunks_of("t1")
    padded_pos, padded_neg = pad_chunks(pos, neg)
    assert padded_pos == pos
    assert padded_neg == [neg[0], empty_chunk()]
    assert [len(c) for c in pad_chunks(neg, pos, chunks_of(words(0, 160)))] == [3, 3, 3]
    assert isinstance(padded_neg[1], PromptChunk)


def test_pad_chunks_needs_equal_chunk_lengths():
    with pytest.raises(ValueError):
        pad_chunks(chunks_of("t1"), chunks_of("t1", chunk_length=10))
