"""T5 tokenizer: the shipped T5 v1.1 data gives the released tokenizer's ids, pads and ends
prompts as SD3 feeds T5, and round-trips through a diffusers-style `tokenizer_3/` folder that
transformers reads."""

import hashlib
import importlib.util
import gzip
from importlib import resources
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from sdlab.errors import SdlabError
from sdlab.text.t5_tokenizer import DATA_FILE, T5Tokenizer

PROMPTS = [
    "a photo of a cat",
    "masterpiece, best quality, (detailed eyes:1.2), [blurry]",
    "multiple    spaces\tand\nnewlines  ",
    "  leading and trailing\u3000\n",
    "café, naïve, Zürich, 東京タワー, Москва, emoji 🐱",
    "numbers 1234567890 3.14159 50%",
    "",
]


@pytest.fixture(scope="module")
def tok() -> T5Tokenizer:
    return T5Tokenizer()


def make_script():
    path = Path(__file__).resolve().parents[2] / "scripts" / "make_t5_tokenizer_data.py"
    spec = importlib.util.spec_from_file_location("make_t5_tokenizer_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_data_is_the_source_file_unchanged():
    script = make_script()
    data = gzip.decompress((resources.files("sdlab.text") / "data" / DATA_FILE).read_bytes())
    assert len(data) == script.JSON_SIZE
    assert hashlib.sha256(data).hexdigest() == script.JSON_SHA256


def test_released_ids(tok):
    # As google/t5-v1_1-xxl's tokenizer (and diffusers' T5TokenizerFast) encode it.
    assert tok.encode("a photo of a cat") == [3, 9, 1202, 13, 3, 9, 1712, 1]
    assert tok.encode("a photo of a cat", eos=False) == [3, 9, 1202, 13, 3, 9, 1712]
    assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 32100)
    assert tok.encode("") == [1]
    assert tok.encode("<extra_id_0>") == [32099, 1]


def test_precompiled_normalizer_is_applied(tok):
    """SentencePiece's nmt_nfkc map (which stable-diffusion.cpp's own tokenizer skips): full-width
    letters are plain letters, and runs of spaces are one."""
    assert tok.encode("ＡＢＣ  cat") == tok.encode("ABC cat")
    assert tok.encode("a   photo") == tok.encode("a photo")
    # Trailing whitespace is dropped (SentencePiece), not a "▁" (3) before the EOS.
    assert tok.encode("a cat \n") == tok.encode("a cat") == [3, 9, 1712, 1]
    assert tok.encode(" ") == [1]


def test_rows_are_padded_with_zero_after_eos(tok):
    ids = tok(["a photo of a cat", "a cat"])
    assert ids.shape == (2, 77)
    assert ids[0].tolist() == [3, 9, 1202, 13, 3, 9, 1712, 1] + [0] * 69
    assert ids[1, :4].tolist() == [3, 9, 1712, 1] and ids[1, 4:].eq(0).all()


def test_long_prompts_grow_or_are_cut(tok):
    long = ", ".join(f"tag{i}" for i in range(60))
    n = len(tok.encode(long))
    assert n > 77
    grown = tok([long, "a cat"])  # the reference / ComfyUI: no truncation, the batch pads to the longest
    assert grown.shape == (2, n) and grown[0, n - 1] == 1 and grown[1, 4:].eq(0).all()
    cut = T5Tokenizer(length=77, truncate=True)(long)  # diffusers: max_sequence_length, EOS last
    assert cut.shape == (1, 77) and cut[0, -1] == 1 and cut[0, :-1].tolist() == tok.encode(long)[:76]


def test_folder_round_trip_and_transformers(tok, tmp_path):
    tok.save(tmp_path)
    again = T5Tokenizer.from_file(tmp_path, length=256)
    hf = transformers.T5TokenizerFast.from_pretrained(tmp_path)  # diffusers' tokenizer_3 class
    for prompt in PROMPTS:
        assert again.encode(prompt) == tok.encode(prompt) == hf(prompt).input_ids, prompt
    assert again(PROMPTS).shape == (len(PROMPTS), 256)
    assert T5Tokenizer.from_file(resources.files("sdlab.text") / "data" / DATA_FILE).encode("a cat") == [3, 9, 1712, 1]


def test_tiny_unigram_for_tests(tmp_path):
    """Tiny models need no real vocabulary: a small Unigram tokenizer.json with T5's special tokens loads."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁a", -1.0), ("▁cat", -2.0), ("▁", -3.0)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tiny = Tokenizer(models.Unigram(vocab, unk_id=2))
    tiny.pre_tokenizer = pre_tokenizers.Metaspace()
    tiny.save(str(tmp_path / "tokenizer.json"))
    assert T5Tokenizer.from_file(tmp_path).encode("a cat") == [3, 4, 1]


def test_bad_folders(tmp_path):
    with pytest.raises(SdlabError, match="tokenizer.json"):
        T5Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(SdlabError, match="not a tokenizer.json"):
        T5Tokenizer.from_file(tmp_path)
    Tokenizer(models.Unigram([("<unk>", 0.0), ("▁a", -1.0)], unk_id=0)).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(SdlabError, match="not a T5 tokenizer"):
        T5Tokenizer.from_file(tmp_path)
