"""The web UI's "Prompts from file or textbox" script (A1111 1.10 `scripts/prompts_from_file.py`) as
a recipe over whole requests: one request per non-empty line of the text.

A line is a prompt, or, when it starts with `--`, options in the script's command-line form
(`--prompt "a cat" --steps 30 --negative_prompt "blurry"`, split as a shell splits it; the value of
`--prompt` / `--negative_prompt` runs up to the next `--`). The options are the script's
`prompt_tags`, each setting the request field of the same name (`LINE_OPTIONS`). A line's prompt
goes before the request's own prompt ("start") or after it ("end"), joined by a space, when both
are there (the negative prompt too); otherwise it replaces it.

Seeds as the script numbers them: "Iterate seed every line" (`checkbox_iterate`) adds
batch_size * n_iter (the request's) to the seed after each line; with it or "Use same random seed
for all lines" (`checkbox_iterate_batch`) a -1 seed is drawn once for all lines; otherwise each
line with a -1 seed draws its own.

Where sdlab differs: the web UI logs a line it cannot parse and uses the whole line as a prompt,
and it accepts options it then ignores or cannot honour; here such a line is refused, naming the
line and the option. A line that does not start with `--` is a prompt in both.
"""

from __future__ import annotations

import random
import shlex
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from ..errors import SdlabError
from ..request import MAX_SEED, GenerationRequest
from .scripts import Generate, ScriptOutput, run_requests

__all__ = ["TITLE", "LINE_OPTIONS", "FilePlan", "Line", "PromptsFromFile", "parse_line", "plan"]

TITLE = "Prompts from file or textbox"


def _bool(value: str) -> bool:
    return value == "true"  # the script's rule: anything else is false


def _styles(value: str) -> list[str]:
    # The script sets the string itself, which the web UI then reads letter by letter; style names
    # separated by commas are what a user means.
    return [s.strip() for s in value.split(",") if s.strip()]


def _sampler(value: str) -> str:
    from ..sampling.samplers import resolve_sampler

    return resolve_sampler(value).name


def _sampler_index(value: str) -> str:
    from ..sampling.samplers import SAMPLERS

    names, index = list(SAMPLERS), int(value)
    if not 0 <= index < len(names):
        raise ValueError(f"sampler_index {index} is out of range 0-{len(names) - 1}")
    return names[index]


def _refused(why: str) -> Callable[[str], Any]:
    def refuse(value: str) -> Any:
        raise SdlabError(why)

    return refuse


def _off_or_refused(off: tuple[str, ...], why: str) -> Callable[[str], Any]:
    def read(value: str) -> Any:
        if value not in off:
            raise SdlabError(why)
        return None  # off: nothing to set

    return read


# The script's prompt_tags: option -> (the request field it sets, how its value is read). A None
# field: read for its checks only (sd_model is the line's checkpoint, not a request field).
LINE_OPTIONS: dict[str, tuple[str | None, Callable[[str], Any]]] = {
    "sd_model": (None, str),
    "outpath_samples": (None, _refused("sdlab does not let a prompt line choose where files are written")),
    "outpath_grids": (None, _refused("sdlab does not let a prompt line choose where files are written")),
    "prompt_for_display": (None, _refused("sdlab shows the prompt itself; leave the option out")),
    "prompt": ("prompt", str),
    "negative_prompt": ("negative_prompt", str),
    "styles": ("styles", _styles),
    "seed": ("seed", int),
    "subseed_strength": ("subseed_strength", float),
    "subseed": ("subseed", int),
    "seed_resize_from_h": (None, _off_or_refused(("-1", "0"), "seed resize is not implemented by sdlab; send -1")),
    "seed_resize_from_w": (None, _off_or_refused(("-1", "0"), "seed resize is not implemented by sdlab; send -1")),
    "sampler_index": ("sampler", _sampler_index),
    "sampler_name": ("sampler", _sampler),
    "batch_size": ("batch_size", int),
    "n_iter": ("n_iter", int),
    "steps": ("steps", int),
    "cfg_scale": ("cfg_scale", float),
    "width": ("width", int),
    "height": ("height", int),
    "restore_faces": (None, _off_or_refused(("false",), "face restoration is not implemented by sdlab; send false")),
    "tiling": ("tiling", _bool),
    # No effect over the API in the web UI either: save_images alone decides.
    "do_not_save_samples": (None, lambda v: None),
    "do_not_save_grid": (None, lambda v: None),
}


@dataclass(frozen=True)
class Line:
    """One line made ready: the request fields it sets and the checkpoint it names."""

    fields: dict[str, Any]
    checkpoint: str | None = None


def parse_line(line: str) -> Line:
    """One line of the text: a prompt, or `--option value ...` (the script's `cmdargs`)."""
    line = line.strip()
    if not line.startswith("--"):
        return Line({"prompt": line})
    try:
        args = shlex.split(line)
    except ValueError as e:
        raise SdlabError(f"{TITLE}: line {line!r}: {e}; close the quotes") from None
    fields: dict[str, Any] = {}
    checkpoint = None
    pos = 0
    while pos < len(args):
        arg = args[pos]
        if not arg.startswith("--"):
            raise SdlabError(f"{TITLE}: line {line!r}: {arg!r} must start with \"--\" (quote a value "
                             "with spaces)")
        if pos + 1 >= len(args):
            raise SdlabError(f"{TITLE}: line {line!r}: missing value for {arg}")
        tag = arg[2:]
        if tag in ("prompt", "negative_prompt"):
            pos += 1
            words = [args[pos]]
            pos += 1
            while pos < len(args) and not args[pos].startswith("--"):
                words.append(args[pos])
                pos += 1
            fields[tag] = " ".join(words)
            continue
        if tag not in LINE_OPTIONS:
            raise SdlabError(f"{TITLE}: line {line!r}: unknown option {arg}; the options are "
                             + ", ".join(f"--{t}" for t in LINE_OPTIONS))
        field, read = LINE_OPTIONS[tag]
        try:
            value = read(args[pos + 1])
        except (SdlabError, ValueError) as e:
            raise SdlabError(f"{TITLE}: line {line!r}: {arg} {args[pos + 1]!r}: {e}") from None
        if tag == "sd_model":
            checkpoint = value
        elif field is not None:
            fields[field] = value
        pos += 2
    return Line(fields, checkpoint)


@dataclass(frozen=True)
class PromptsFromFile:
    """The script's arguments, in the web UI's order and with its defaults."""

    checkbox_iterate: bool = False  # "Iterate seed every line"
    checkbox_iterate_batch: bool = False  # "Use same random seed for all lines"
    prompt_position: Literal["start", "end"] = "start"  # "Insert prompts at the"
    prompt_txt: str = ""  # "List of prompt inputs"

    def __post_init__(self):
        if self.prompt_position not in ("start", "end"):
            raise SdlabError(f"{TITLE}: prompt position {self.prompt_position!r}; choose start or end")


@dataclass(frozen=True)
class FilePlan:
    requests: list[tuple[GenerationRequest, str | None]]  # (request, the checkpoint its line names)

    @property
    def count(self) -> int:
        return len(self.requests)

    @property
    def checks(self) -> list[tuple[GenerationRequest, str | None]]:
        return self.requests

    def run(self, generate: Generate) -> ScriptOutput:
        results, interrupted = run_requests(self.requests, generate)
        images = [i for r in results for i in r.images]
        infotexts = [t for r in results for t in r.infotexts]
        prompts = [r.request.prompt for r in results for _ in r.images]
        return ScriptOutput(images, infotexts, results, 0, interrupted, prompts)


def plan(req: GenerationRequest, options: PromptsFromFile) -> FilePlan:
    """One request per non-empty line of `options.prompt_txt`, over `req`."""
    lines = [parse_line(x) for x in (x.strip() for x in options.prompt_txt.splitlines()) if x]
    if not lines:
        raise SdlabError(f"{TITLE}: the list of prompts is empty; give one prompt per line")
    seed = req.seed
    if (options.checkbox_iterate or options.checkbox_iterate_batch) and (seed is None or seed < 0):
        # fix_seed: one seed (and variation seed) for every line
        seed = random.randrange(MAX_SEED)
        if req.subseed is None or req.subseed < 0:
            req = replace(req, subseed=random.randrange(MAX_SEED))
    requests = []
    for line in lines:
        fields = {"seed": seed, **line.fields}
        for name, base in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
            if fields.get(name) and base:
                fields[name] = (f"{fields[name]} {base}" if options.prompt_position == "start"
                                else f"{base} {fields[name]}")
        requests.append((replace(req, **fields), line.checkpoint))
        if options.checkbox_iterate:
            seed = seed + req.batch_size * req.n_iter
    return FilePlan(requests)
