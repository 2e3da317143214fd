"""Write the T5 v1.1 tokenizer data (t5_tokenizer.json.gz) into the package.

The source is the `tokenizer.json` of google/t5-v1_1-xxl (SentencePiece Unigram, 32100 pieces)
as the MIT-licensed stable-diffusion.cpp embeds it: the C byte array `t5_tokenizer_json_str` in
`src/tokenizers/vocab/clip_t5.hpp`, vendored by the source distribution of
stable-diffusion-cpp-python 0.4.7 on PyPI. The bytes are taken unchanged (checked against the
checksum below) and gzipped, as the CLIP data is; `tokenizers` reads them as they are.

    pip install scikit-build-core   # pip needs it to prepare the sdist's metadata
    python scripts/make_t5_tokenizer_data.py [path/to/stable_diffusion_cpp_python-0.4.7.tar.gz]

Without a path the sdist is fetched with `pip download --no-deps --no-binary :all:
--no-build-isolation stable-diffusion-cpp-python==0.4.7` into a temporary folder.
"""

import gzip
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src" / "sdlab" / "text" / "data" / "t5_tokenizer.json.gz"
PACKAGE = "stable-diffusion-cpp-python==0.4.7"
SDIST_SHA256 = "998d1957260dd5ae4e18a8acc0c14b0a8757aaa9f96515197b6d5bbf46df9282"
MEMBER = "stable_diffusion_cpp_python-0.4.7/vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp"
ARRAY = "t5_tokenizer_json_str"
JSON_SIZE = 2_424_064
JSON_SHA256 = "fe2ebbbbde2985be723e0ce18217853e4020c5e9d35bd07be2c27ab9d3ead57a"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "--no-build-isolation", PACKAGE, "-d", str(folder)], check=True)
    return next(folder.glob("stable_diffusion_cpp_python-*.tar.gz"))


def extract_json(sdist: Path) -> bytes:
    data = sdist.read_bytes()
    if sha256(data) != SDIST_SHA256:
        raise SystemExit(f"{sdist}: sha256 {sha256(data)} is not the expected {SDIST_SHA256}")
    with tarfile.open(sdist) as tar:
        header = tar.extractfile(MEMBER).read().decode("ascii")
    # `static const unsigned char t5_tokenizer_json_str[] = { 0x7b, 0x0a, ... };`
    start = header.index(f"{ARRAY}[]")
    body = header[header.index("{", start) + 1 : header.index("};", start)]
    return bytes(int(h, 16) for h in re.findall(r"0x([0-9a-fA-F]{2})", body))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(sys.argv[1]) if len(sys.argv) > 1 else download(Path(tmp))
        data = extract_json(sdist)
    if len(data) != JSON_SIZE or sha256(data) != JSON_SHA256:
        raise SystemExit(f"{ARRAY}: {len(data)} bytes, sha256 {sha256(data)}; expected {JSON_SIZE}, {JSON_SHA256}")

    from tokenizers import Tokenizer  # a check that the bytes are the tokenizer they should be

    ids = Tokenizer.from_str(data.decode("utf-8")).encode("a photo of a cat").ids
    assert ids == [3, 9, 1202, 13, 3, 9, 1712, 1], ids

    OUT.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the gzip bytes reproducible, so reruns leave git clean.
    with gzip.GzipFile(OUT, "wb", compresslevel=9, mtime=0) as f:
        f.write(data)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes; tokenizer.json {len(data)} bytes, sha256 {JSON_SHA256})")


if __name__ == "__main__":
    main()
