"""Write the CLIP BPE tokenizer data (vocab.json.gz, merges.txt.gz) into the package.

The source is OpenAI's `bpe_simple_vocab_16e6.txt.gz` as shipped by open-clip-torch; the
output is the same vocab.json / merges.txt that transformers' openai/clip-vit-large-patch14
tokenizer uses (49408 tokens). open_clip itself is not imported (it needs torchvision): we
only locate its data file. The derivation mirrors open_clip/tokenizer.py `SimpleTokenizer`.

    python scripts/make_tokenizer_data.py
"""

import gzip
import importlib.util
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src" / "sdlab" / "text" / "data"
N_MERGES = 49152 - 256 - 2  # open_clip reads lines[1 : 49152-256-2+1]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    # The 188 printable bytes map to themselves; the rest to 256, 257, ... in byte order.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def main() -> None:
    locations = importlib.util.find_spec("open_clip").submodule_search_locations
    source = Path(list(locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(source).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]  # line 0 is a header
    assert all(len(m.split()) == 2 for m in merges), "unexpected merges line"

    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens) == 49408, len(vocab)

    OUT.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the gzip bytes reproducible, so reruns leave git clean.
    with gzip.GzipFile(OUT / "vocab.json.gz", "wb", mtime=0) as f:
        f.write(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    with gzip.GzipFile(OUT / "merges.txt.gz", "wb", mtime=0) as f:
        f.write(("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"))
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {OUT}")


if __name__ == "__main__":
    main()
