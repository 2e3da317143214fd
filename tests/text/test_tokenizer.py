"""CLIP tokenizer: ids equal transformers' CLIPTokenizer on the same vocab.json/merges.txt, and
equal a plain-Python copy of OpenAI's original BPE loop (an oracle that shares no code with either)."""

import gzip
import importlib.util
import json
import math
import unicodedata
from pathlib import Path

import pytest
import regex
import torch
import transformers

from sdlab.text.tokenizer import CLIP_SPLIT, CLIPTokenizer

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "masterpiece, best quality, 1girl, solo, (detailed eyes:1.2), [blurry], {hat}",
    "(emphasis:1.2) ((double)) [de-emphasis] (a:0.5) \\(escaped\\)",
    "<lora:myLora_v2:0.8> and <hypernet:x:1>",
    "a dog AND a cat BREAK sunset",
    "It's a dog's life; they're here, we've seen, I'm sure, you'll see, he'd go",
    "Hello,World!!!...???",
    "café, naïve, résumé, Ångström, São Paulo, Zürich",
    "cafe\u0301 (decomposed accent)",
    "emoji 🐱🐶 🎉🎉 👩‍🚀 ❤️",
    "東京タワーの夜景, 北京, 서울 야경",
    "Москва, зимний вечер",
    "numbers 1234567890 3.14159 1e-5 2024-01-01 50%",
    "multiple    spaces\tand\ttabs\nand\n\nnewlines\r\n",
    "   leading and trailing   ",
    "",
    "a",
    "!!!",
    "# hashtags #art ## double",
    "snake_case camelCase kebab-case dot.separated path/to/file",
    "quotes 'single' \"double\" `back` «guillemets» „low“",
    "symbols @ # $ % ^ & * + = | ~ < > ©®™ °C ½",
    "an <|endoftext|> in the middle <|startoftext|>",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "8k uhd, dslr, soft lighting, high quality, film grain, Fujifilm XT3",
    ", ".join(f"tag{i}" for i in range(60)),  # far beyond 77 tokens: truncation
]


@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def hf(ours, tmp_path_factory) -> transformers.PreTrainedTokenizerBase:
    directory = tmp_path_factory.mktemp("tokenizer")
    ours.save(directory)  # also proves `save` writes a folder transformers can load
    return transformers.CLIPTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def hf_zero(tmp_path_factory) -> transformers.PreTrainedTokenizerBase:
    directory = tmp_path_factory.mktemp("tokenizer_2")
    CLIPTokenizer(pad_token="zero").save(directory)
    return transformers.CLIPTokenizer.from_pretrained(directory)


def test_known_ids(ours):
    assert ours("a photo of a cat")[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.comma_id) == (49406, 49407, 49407, 267)
    assert len(ours.vocab) == 49408 and ours.vocab["!"] == 0


@pytest.mark.parametrize("prompt", PROMPTS)
def test_encode_matches_transformers(ours, hf, prompt):
    assert ours.encode(prompt) == hf(prompt, add_special_tokens=False).input_ids


def test_batch_eos_padding_matches_transformers(ours, hf):
    assert hf.pad_token_id == 49407
    ref = hf(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours(PROMPTS), ref)


def test_batch_zero_padding_matches_transformers(hf_zero):
    ours = CLIPTokenizer(pad_token="zero")
    assert hf_zero.pad_token == "!" and hf_zero.pad_token_id == 0 == ours.pad_id
    # transformers makes its pad token "!" a special token, so SD2 diffusers folders split "!!!"
    # into three id-0 tokens; OpenCLIP's own tokenizer (what SD2 was trained with) and ComfyUI
    # apply BPE ("!!!" -> 995). We follow OpenCLIP, so compare on prompts without "!".
    prompts = [p for p in PROMPTS if "!" not in p]
    ref = hf_zero(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids = ours(prompts)
    assert torch.equal(ids, ref)
    assert ids[0, 7:].eq(0).all() and ids[0, 6] == 49407
    assert ours("!!!")[0, :4].tolist() == [49406, 995, 49407, 0]


def test_truncation_keeps_eos(ours):
    ids = ours(PROMPTS[-1])
    assert ids.shape == (1, 77) and ids[0, 0] == 49406 and ids[0, -1] == 49407
    assert ids[0, 1:-1].tolist() == ours.encode(PROMPTS[-1])[:75]
    assert ours("").tolist() == [[49406] + [49407] * 76]
    short = CLIPTokenizer(max_length=8)("a photo of a cat, at night")
    assert short.tolist() == [[49406, 320, 1125, 539, 320, 2368, 267, 49407]]


def test_from_files_plain_and_gzipped(ours, tmp_path):
    ours.save(tmp_path)
    plain = CLIPTokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert torch.equal(plain(PROMPTS), ours(PROMPTS))
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress((tmp_path / name).read_bytes()))
    gz = CLIPTokenizer.from_files(tmp_path / "vocab.json.gz", tmp_path / "merges.txt.gz", pad_token="zero")
    assert gz.encode(PROMPTS[2]) == ours.encode(PROMPTS[2]) and gz.pad_id == 0


# ---- an independent oracle: OpenAI's BPE loop in plain Python (clip/simple_tokenizer.py) ----

def bytes_to_unicode() -> dict[int, str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def reference_encode(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    # OpenAI cleans with ftfy (which NFC-normalises) + whitespace collapse + lower().
    text = " ".join(unicodedata.normalize("NFC", text).split()).lower()
    byte_encoder, ids = bytes_to_unicode(), []
    for word in regex.findall(CLIP_SPLIT, text):
        if word in ("<|startoftext|>", "<|endoftext|>"):
            ids.append(vocab[word])
            continue
        symbols = [byte_encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            rank, pair = min((ranks.get(p, math.inf), p) for p in zip(symbols, symbols[1:]))
            if rank == math.inf:
                break
            merged, i = [], 0
            while i < len(symbols):
                if tuple(symbols[i:i + 2]) == pair:
                    merged.append(pair[0] + pair[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids += [vocab[s] for s in symbols]
    return ids


def test_encode_matches_reference_bpe(ours, tmp_path):
    ours.save(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    ranks = {tuple(m.split()): i for i, m in enumerate(merges) if m}
    for prompt in PROMPTS:
        assert ours.encode(prompt) == reference_encode(prompt, vocab, ranks), prompt


def test_package_data_matches_openai_bpe_file(ours, tmp_path):
    """The shipped data is what scripts/make_tokenizer_data.py derives from OpenAI's BPE file."""
    spec = importlib.util.find_spec("open_clip")  # locates the file; importing open_clip needs torchvision
    if spec is None:
        pytest.skip("open-clip-torch not installed")
    source = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(source).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    ours.save(tmp_path)
    expected = "#version: 0.2\n" + "".join(m + "\n" for m in merges)
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8") == expected
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    assert ours.vocab == {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
