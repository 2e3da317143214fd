"""The T5 tokenizer (SentencePiece Unigram, the one all T5 v1.0 / v1.1 models share), on the
`tokenizers` library.

The package ships T5 v1.1's `tokenizer.json` (text/data/t5_tokenizer.json.gz, made by
scripts/make_t5_tokenizer_data.py): its normalizer (SentencePiece's precompiled nmt_nfkc map,
then runs of spaces to one), Metaspace pre-tokenizer and Unigram model are `tokenizers`' own,
so ids equal transformers' T5 tokenizer (trailing whitespace dropped, as SentencePiece does).
Ids: <pad> 0, </s> 1, <unk> 2; no BOS, an EOS after each prompt. EOS and padding are added
here on plain lists, as in `tokenizer.py`.
"""

import gzip
import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, normalizers

from sdlab.errors import SdlabError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable  # Python >= 3.11; only a type hint here

PAD = "<pad>"
EOS = "</s>"
UNK = "<unk>"
DATA_FILE = "t5_tokenizer.json.gz"


def _read_text(path: "Path | Traversable") -> str:
    """A UTF-8 file, transparently decompressing `*.xz` and `*.gz`."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        import lzma  # not in every Python build; only needed for a user's .xz file

        data = lzma.decompress(data)
    elif path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8")


class T5Tokenizer:
    """T5 tokenizer producing (B, L) id tensors: each prompt's pieces, EOS, then padding with 0.

    Args:
        length: rows are padded to this many tokens (77 as the reference implementation and
            ComfyUI pad; diffusers' `max_sequence_length` is 256).
        truncate: what to do with a prompt longer than `length`: False keeps every token and
            pads the batch to its longest row (the reference, ComfyUI); True cuts it to `length`,
            EOS last (diffusers).
    """

    def __init__(self, length: int = 77, truncate: bool = False):
        self._setup(_read_text(resources.files("sdlab.text") / "data" / DATA_FILE), length, truncate)

    @classmethod
    def from_file(cls, path: str | Path, length: int = 77, truncate: bool = False) -> "T5Tokenizer":
        """Build from a `tokenizer.json` (plain, .xz or .gz), or from a folder holding one,
        e.g. a diffusers folder's `tokenizer_3/`.

        Raises:
            SdlabError: no tokenizer.json there, or not a T5 tokenizer.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise SdlabError(f"{path} not found: a T5 tokenizer folder needs its tokenizer.json "
                             "(sdlab does not read spiece.model); remove the folder to use the built-in T5 tokenizer")
        self = cls.__new__(cls)
        self._setup(_read_text(path), length, truncate, source=str(path))
        return self

    def _setup(self, text: str, length: int, truncate: bool, source: str = "the built-in data") -> None:
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        try:
            tok = Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises plain Exceptions on a malformed file
            raise SdlabError(f"{source} is not a tokenizer.json `tokenizers` can read: {e}") from e
        if tok.token_to_id(EOS) is None or tok.token_to_id(PAD) is None:
            raise SdlabError(f"{source} has no {EOS!r} or {PAD!r} token: not a T5 tokenizer")
        # SentencePiece drops trailing whitespace. This tokenizer.json, an early conversion, would
        # encode it as a "▁" token; later conversions (ComfyUI's copy) and transformers 5 strip it.
        strip = normalizers.Strip(left=False, right=True)
        tok.normalizer = strip if tok.normalizer is None else normalizers.Sequence([tok.normalizer, strip])
        self.length, self.truncate = length, truncate
        self._json = text
        self._tok = tok

    @property
    def pad_id(self) -> int:
        return self._tok.token_to_id(PAD)

    @property
    def eos_id(self) -> int:
        return self._tok.token_to_id(EOS)

    @property
    def vocab_size(self) -> int:
        """Pieces the tokenizer knows, special tokens included (32100 for T5 v1.1)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, eos: bool = True) -> list[int]:
        """Token ids of `text`, followed by EOS unless `eos` is False (for the pieces of a prompt
        that is put together from several). No padding, no truncation."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [*ids, self.eos_id] if eos else ids

    def __call__(self, texts: str | list[str]) -> torch.LongTensor:
        """Ids (B, L): each text's tokens and EOS, then padding with 0 to L; L is `length`, or the
        longest row where `truncate` is off and a row is longer."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [[*enc.ids, self.eos_id] for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        if self.truncate:
            rows = [row if len(row) <= self.length else [*row[: self.length - 1], self.eos_id] for row in rows]
        width = max([self.length, *map(len, rows)])
        return torch.tensor([row + [self.pad_id] * (width - len(row)) for row in rows], dtype=torch.long).reshape(
            len(rows), width)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and the two config files in the layout of a diffusers folder's
        `tokenizer_3/`, loadable by transformers' `T5TokenizerFast.from_pretrained`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(self._json, encoding="utf-8")
        extra = sorted((t for t in self._tok.get_vocab(with_added_tokens=True) if t.startswith("<extra_id_")),
                       key=lambda t: int(t[len("<extra_id_"):-1]))
        special = {"eos_token": EOS, "pad_token": PAD, "unk_token": UNK, "additional_special_tokens": extra}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
        config = {"tokenizer_class": "T5Tokenizer", "model_max_length": self.length, "extra_ids": len(extra),
                  **special}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
