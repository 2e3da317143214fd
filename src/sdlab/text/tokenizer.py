"""The CLIP BPE tokenizer (the one SD 1.x, 2.x and SDXL all use), on the `tokenizers` library.

The pipeline mirrors transformers' `CLIPTokenizer`
(transformers/models/clip/tokenization_clip.py, v5) so ids are identical: NFC, whitespace runs
to one space, lowercase; the CLIP regex split; GPT-2's byte-level alphabet; BPE with a `</w>`
end-of-word suffix. BOS/EOS, truncation and padding are done here on plain lists, because
SD's rule (always end with EOS, pad with EOS or with id 0) is simpler written out than configured.
"""

import gzip
import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable  # Python >= 3.11; only a type hint here

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# The split of OpenAI's original tokenizer: the two special tokens, English contractions,
# letter runs, single digits, and runs of everything else (punctuation, emoji, ...).
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _read_text(path: "Path | Traversable") -> str:
    """Read a UTF-8 file, transparently un-gzipping `*.gz`."""
    data = path.read_bytes()
    return (gzip.decompress(data) if path.name.endswith(".gz") else data).decode("utf-8")


def _parse_merges(text: str) -> list[tuple[str, str]]:
    lines = text.split("\n")
    # Only the first line is a header: real merges may start with '#' ("# #</w>").
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [tuple(line.split()) for line in lines if line.strip()]


class CLIPTokenizer:
    """CLIP BPE tokenizer producing fixed-length (B, max_length) id tensors.

    Args:
        pad_token: "eos" pads with <|endoftext|> (49407), as SD 1.x does; "zero" pads with
            id 0 ("!"), as SD 2.x and SDXL's OpenCLIP encoder do.
        max_length: the context length, BOS and EOS included.
    """

    def __init__(self, pad_token: Literal["eos", "zero"] = "eos", max_length: int = 77):
        data = resources.files("sdlab.text") / "data"
        vocab = json.loads(_read_text(data / "vocab.json.gz"))
        merges = _parse_merges(_read_text(data / "merges.txt.gz"))
        self._setup(vocab, merges, pad_token, max_length)

    @classmethod
    def from_files(cls, vocab_path: str | Path, merges_path: str | Path, pad_token: Literal["eos", "zero"] = "eos",
                   max_length: int = 77) -> "CLIPTokenizer":
        """Build from vocab.json / merges.txt (plain or .gz), e.g. a diffusers folder's `tokenizer/`."""
        self = cls.__new__(cls)
        vocab = json.loads(_read_text(Path(vocab_path)))
        merges = _parse_merges(_read_text(Path(merges_path)))
        self._setup(vocab, merges, pad_token, max_length)
        return self

    def _setup(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str, max_length: int) -> None:
        if pad_token not in ("eos", "zero"):
            raise ValueError(f"pad_token must be 'eos' or 'zero', got {pad_token!r}")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
        for token in (BOS, EOS, ",</w>"):
            if token not in vocab:
                raise ValueError(f"vocabulary lacks {token!r}: not a CLIP vocab.json")
        self.pad_token, self.max_length = pad_token, max_length
        self._vocab, self._merges = dict(vocab), merges

        model = BPE(vocab=self._vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                    fuse_unk=False, unk_token=EOS)
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        # As in transformers: a literal "<|endoftext|>" in a prompt is the special token.
        tok.add_special_tokens([BOS, EOS])
        self._tok = tok

    @property
    def bos_id(self) -> int:
        return self._vocab[BOS]

    @property
    def eos_id(self) -> int:
        return self._vocab[EOS]

    @property
    def pad_id(self) -> int:
        return self.eos_id if self.pad_token == "eos" else 0

    @property
    def comma_id(self) -> int:
        """Id of ",</w>": the long-prompt chunker prefers to break after a comma."""
        return self._vocab[",</w>"]

    @property
    def vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`: no BOS/EOS, no truncation (long prompts are chunked by the caller)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def __call__(self, texts: str | list[str]) -> torch.LongTensor:
        """Ids (B, max_length): BOS, the text truncated to fit, EOS, then padding."""
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for enc in self._tok.encode_batch(list(texts), add_special_tokens=False):
            ids = [self.bos_id, *enc.ids[: self.max_length - 2], self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)

    def save(self, directory: str | Path) -> None:
        """Write vocab.json, merges.txt and the two config files in the layout of a diffusers
        folder's `tokenizer/`, loadable by transformers' `CLIPTokenizer.from_pretrained`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "vocab.json").write_text(json.dumps(self._vocab, ensure_ascii=False), encoding="utf-8")
        merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges)
        (out / "merges.txt").write_text(merges, encoding="utf-8")
        # SD 2.x / SDXL tokenizer_2 folders name "!" (id 0) as their pad token.
        pad = EOS if self.pad_token == "eos" else "!"
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, "do_lower_case": True,
                  "errors": "replace", "add_prefix_space": False, **special}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
