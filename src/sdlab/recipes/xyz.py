"""The web UI's X/Y/Z plot (A1111 1.10 `scripts/xyz_grid.py`, title "X/Y/Z plot") as a recipe over
`Pipeline.generate`: every cell is one ordinary `GenerationRequest`, made as if it were asked for
alone; this module only plans the cells, and draws the grid the web UI draws around their images
(`modules/images.py` `image_grid` / `draw_grid_annotations`).

The faces (`sdlab grid`, the API's `script_name: "x/y/z plot"`) parse their input into `AxisSpec`s,
call `plan`, run each `Cell` on the model it names and hand the results to `assemble`.

The web UI's rules kept here (reference: ../shared/reference/webui-extras.md section 4.1):
- values are CSV (quotes keep commas in a value); int axes take `1-5`, `1-5 (+2)` (the step has
  its sign), `10-1 (-3)`, `1-10 [5]` (np.linspace, truncated); float axes the same with
  np.arange / np.linspace; `Prompt S/R` replaces its first value, which must occur in the prompt
  or the negative prompt; `Prompt order` takes every permutation.
- axes with a list of choices read their values from the dropdown list unless `csv_mode`.
- a -1 seed (the request's or a Seed axis value) is fixed to one random seed for the whole grid
  unless `no_fixed_seeds`; `vary_seeds_x/y/z` add ix, iy*len(xs), iz*len(xs)*len(ys).
- the costliest axis (Checkpoint name) is the outermost loop.
- the grid infotext is the first cell's with `Script`, `X Type`, `X Values`, `Fixed X Values`...
"""

from __future__ import annotations

import csv
import io
import math
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain, permutations
from typing import Any, Literal

from PIL import Image, ImageDraw, ImageFont

from ..errors import SdlabError
from ..request import MAX_SEED, GenerationRequest, GenerationResult

__all__ = ["AXIS_OPTIONS", "AxisOption", "AxisSpec", "Cell", "Plan", "Grid", "GridAnnotation", "TITLE", "assemble",
           "is_xyz", "axis_options", "draw_grid_annotations", "find_axis", "image_grid", "parse_axis", "parse_values", "plan"]

TITLE = "X/Y/Z plot"


def is_xyz(script_name: str | None) -> bool:
    """Whether an API request's `script_name` names this script (any case, as the web UI's
    `script_name_to_index` matches)."""
    return isinstance(script_name, str) and script_name.strip().lower() == TITLE.lower()

Mode = Literal["txt2img", "img2img"]


@dataclass(frozen=True)
class AxisOption:
    """One entry of the web UI's `axis_options`.

    `kind`: how values parse ("int", "float", "str", "permutations"). `field`: the request field
    it sets (None: a rule of its own in `_apply`). `fmt`: its label on the grid ("label":
    "Steps: 20", "value": "20", "basename", "join", "nothing"). `mode`: the tab it belongs to
    (None: both). `choices`: read from the dropdown list unless csv_mode. `supported`: False for
    the web UI's axes sdlab has no setting for (refused with a clear message)."""

    label: str
    kind: str = "str"
    field: str | None = None
    fmt: str = "label"
    mode: Mode | None = None
    choices: bool = False
    cost: float = 0.0
    supported: bool = True


def _no(label: str, kind: str = "float", mode: Mode | None = None, choices: bool = False) -> AxisOption:
    return AxisOption(label, kind, mode=mode, choices=choices, supported=False)


# A1111 1.10's list, in its order: the API's x_type / y_type / z_type index into it after the
# entries of the other tab are left out (`axis_options(mode)`). Forge inserts "Distilled CFG
# Scale" after "CFG Scale", so its indices from there on are one higher.
AXIS_OPTIONS: tuple[AxisOption, ...] = (
    AxisOption("Nothing", "str", fmt="nothing"),
    AxisOption("Seed", "int", "seed"),
    AxisOption("Var. seed", "int", "subseed"),
    AxisOption("Var. strength", "float", "subseed_strength"),
    AxisOption("Steps", "int", "steps"),
    AxisOption("Hires steps", "int", "hr_second_pass_steps", mode="txt2img"),
    AxisOption("CFG Scale", "float", "cfg_scale"),
    _no("Image CFG Scale", mode="img2img"),
    AxisOption("Prompt S/R", "str", fmt="value"),
    AxisOption("Prompt order", "permutations", fmt="join"),
    AxisOption("Sampler", "str", "sampler", fmt="value", mode="txt2img", choices=True),
    AxisOption("Hires sampler", "str", "hr_sampler_name", mode="txt2img", choices=True),
    AxisOption("Sampler", "str", "sampler", fmt="value", mode="img2img", choices=True),
    AxisOption("Checkpoint name", "str", fmt="basename", choices=True, cost=1.0),
    _no("Negative Guidance minimum sigma"),
    _no("Sigma Churn"),
    _no("Sigma min"),
    _no("Sigma max"),
    _no("Sigma noise"),
    AxisOption("Schedule type", "str", "schedule", choices=True),
    _no("Schedule min sigma"),
    _no("Schedule max sigma"),
    _no("Schedule rho"),
    _no("Beta schedule alpha"),
    _no("Beta schedule beta"),
    AxisOption("Eta", "float", "eta"),
    AxisOption("Clip skip", "int", "clip_skip"),
    AxisOption("Denoising", "float", "denoising_strength"),
    _no("Initial noise multiplier"),
    _no("Extra noise"),
    AxisOption("Hires upscaler", "str", "hr_upscaler", mode="txt2img", choices=True),
    _no("Cond. Image Mask Weight", mode="img2img"),
    _no("VAE", "str", choices=True),
    AxisOption("Styles", "str", choices=True),
    _no("UniPC Order", "int"),
    _no("Face restore", "str"),
    _no("Token merging ratio"),
    _no("Token merging ratio high-res"),
    _no("Always discard next-to-last sigma", "str", choices=True),
    _no("SGM noise multiplier", "str", choices=True),
    _no("Refiner checkpoint", "str", choices=True),
    _no("Refiner switch at"),
    AxisOption("RNG source", "str", choices=True),
    _no("FP8 mode", "str", choices=True),
    AxisOption("Size", "str"),
)

# The web UI's RNG sources; sdlab draws its noise on the CPU for "GPU" too (as the server's
# randn_source option does).
_RNG = {"gpu": "cpu", "cpu": "cpu", "nv": "nv"}


def axis_options(mode: Mode) -> list[AxisOption]:
    """The axes of one tab, in the order its x_type / y_type / z_type indices count."""
    return [o for o in AXIS_OPTIONS if o.mode in (None, mode)]


def supported_axes(mode: Mode) -> str:
    """'0 Nothing, 1 Seed, ...': the supported axes of a tab with their indices, for messages."""
    return ", ".join(f"{i} {o.label}" for i, o in enumerate(axis_options(mode)) if o.supported)


def find_axis(which: int | str | None, mode: Mode, name: str = "axis") -> AxisOption:
    """The axis a client named: the web UI's index for the tab, or (sdlab's addition) its label
    in any case. Raises one line naming the supported axes."""
    options = axis_options(mode)
    if which is None or which == "":
        return options[0]
    if isinstance(which, bool) or not isinstance(which, (int, str)):
        raise SdlabError(f"{name}: {which!r} is not an axis index or name; {mode} axes: {supported_axes(mode)}")
    if isinstance(which, int) or which.strip().isdigit():
        index = int(which)
        if not 0 <= index < len(options):
            raise SdlabError(f"{name}: axis index {index} is out of range 0-{len(options) - 1} of the web UI 1.10 "
                             f"{mode} list; supported: {supported_axes(mode)}")
        option = options[index]
    else:
        key = " ".join(which.lower().split())
        option = next((o for o in options if o.label.lower() == key or _ALIASES.get(key) == o.label), None)
        if option is None:
            raise SdlabError(f"{name}: unknown axis {which!r}; {mode} axes: "
                             f"{', '.join(o.label for o in options if o.supported)}")
    if not option.supported:
        raise SdlabError(f"{name}: the {option.label!r} axis is not supported by sdlab (it has no such setting); "
                         f"supported: {supported_axes(mode)}")
    return option


# Short names the CLI takes besides the labels.
_ALIASES = {"cfg": "CFG Scale", "cfg scale": "CFG Scale", "schedule": "Schedule type", "scheduler": "Schedule type",
            "checkpoint": "Checkpoint name", "model": "Checkpoint name", "denoise": "Denoising",
            "denoising strength": "Denoising", "prompt sr": "Prompt S/R", "sr": "Prompt S/R",
            "hires denoise": "Denoising", "variation seed": "Var. seed", "variation strength": "Var. strength",
            "rng": "RNG source", "style": "Styles"}


# -- values ----------------------------------------------------------------------------------------

_INT = r"[+-]?\s*\d+"
_FLOAT = r"[+-]?\s*\d+(?:\.\d*)?"
_RANGE = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\(([+-]\d+)\s*\))?\s*")
_RANGE_COUNT = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\[(\d+)\s*\])?\s*")
_RANGE_F = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*")
_RANGE_COUNT_F = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\[(\d+(?:\.\d*)?)\s*\])?\s*")
_SYNTAX = "write a list (10,20,30) or a range: 1-5, 1-5 (+2) (the step has its sign), 1-10 [5]"


def csv_values(text: str) -> list[str]:
    """The web UI's `csv_string_to_list_strip`: CSV fields over all lines, stripped."""
    return [v.strip() for v in chain.from_iterable(csv.reader(io.StringIO(text), skipinitialspace=True))]


def list_to_csv(values: Sequence[str]) -> str:
    """The web UI's `list_to_csv_string` (how dropdown values are written as X Values)."""
    out = io.StringIO()
    csv.writer(out).writerow(list(values))
    return out.getvalue().strip()


def _num(text: str, cast):
    return cast(text.replace(" ", ""))


def parse_values(option: AxisOption, text: str | Sequence[str], name: str = "values") -> list[Any]:
    """The values of an axis from what the user typed (a CSV string) or a list (dropdown
    values): ranges expanded and values cast, as the web UI's `process_axis`. One-line errors."""
    if option.label == "Nothing":
        return [0]
    raw = csv_values(text) if isinstance(text, str) else [str(v).strip() for v in text]
    where = f"{name} ({option.label})"
    if option.kind in ("int", "float"):
        out: list[Any] = []
        for val in raw:
            if not val:
                continue
            expanded = _expand(option.kind, val, where)
            if expanded is None:
                try:
                    out.append(_num(val, int if option.kind == "int" else float))
                except ValueError:
                    kind = "a whole number" if option.kind == "int" else "a number"
                    raise SdlabError(f"{where}: {val!r} is not {kind} or a range; {_SYNTAX}") from None
            else:
                if not expanded:
                    raise SdlabError(f"{where}: the range {val!r} gives no values; a range that counts down "
                                     "needs a negative step, e.g. 10-1 (-3)")
                out += expanded
        values = out
    elif option.kind == "permutations":
        values = [tuple(p) for p in permutations(raw)]
    else:
        values = raw
    if not values:
        raise SdlabError(f"{where}: no values given; {_SYNTAX}")
    return values


def _expand(kind: str, val: str, where: str) -> list | None:
    """A range's values, or None if `val` is no range."""
    import numpy as np

    if kind == "int":
        if m := _RANGE.fullmatch(val):
            start, end, step = _num(m[1], int), _num(m[2], int) + 1, int(m[3]) if m[3] else 1
            if step == 0:
                raise SdlabError(f"{where}: the range {val!r} has a step of 0")
            return list(range(start, end, step))
        if m := _RANGE_COUNT.fullmatch(val):
            count = int(m[3]) if m[3] else 1
            return [int(x) for x in np.linspace(_num(m[1], int), _num(m[2], int), count).tolist()]
        return None
    if m := _RANGE_F.fullmatch(val):
        start, end, step = _num(m[1], float), _num(m[2], float), float(m[3]) if m[3] else 1.0
        if step == 0:
            raise SdlabError(f"{where}: the range {val!r} has a step of 0")
        return np.arange(start, end + step, step).tolist()
    if m := _RANGE_COUNT_F.fullmatch(val):
        count = int(float(m[3])) if m[3] else 1
        return np.linspace(_num(m[1], float), _num(m[2], float), count).tolist()
    return None


def format_value(option: AxisOption, value: Any) -> str:
    """The label of a value on the grid, as the web UI's format_value functions write it."""
    if isinstance(value, float):
        value = round(value, 8)
    if option.fmt == "nothing":
        return ""
    if option.fmt == "value":
        return str(value)
    if option.fmt == "basename":
        return os.path.basename(str(value))
    if option.fmt == "join":
        return ", ".join(value)
    return f"{option.label}: {value}"


# -- the plan ---------------------------------------------------------------------------------------

@dataclass
class AxisSpec:
    """One axis as a face received it: the option, the text typed (or the dropdown list)."""

    option: AxisOption
    text: str = ""
    dropdown: list[str] | None = None


def parse_axis(text: str, mode: Mode = "txt2img", name: str = "axis") -> AxisSpec:
    """'Steps: 10,20,30' (the CLI's form: the axis label, a colon, its values) -> AxisSpec."""
    label, sep, values = text.partition(":")
    if not sep or not label.strip():
        raise SdlabError(f"{name}: {text!r} is not 'AXIS: VALUES', e.g. 'Steps: 10,20,30' or 'CFG scale: 5-9 (+2)'")
    return AxisSpec(find_axis(label.strip(), mode, name), values.strip())


@dataclass
class Cell:
    ix: int
    iy: int
    iz: int
    request: GenerationRequest
    checkpoint: str | None = None  # the Checkpoint name axis's value; None: the request's model


@dataclass
class Plan:
    axes: tuple[AxisSpec, AxisSpec, AxisSpec]
    values: tuple[list, list, list]  # xs, ys, zs
    texts: tuple[str, str, str]  # X/Y/Z Values as the infotext writes them
    cells: list[Cell]  # in the order they run (the costliest axis outermost)
    no_fixed_seeds: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(len(v) for v in self.values)  # type: ignore[return-value]

    def labels(self, axis: int) -> list[str]:
        option = self.axes[axis].option
        return [format_value(option, v) for v in self.values[axis]]

    def index(self, cell: Cell) -> int:
        """The web UI's index of a cell: x fastest, then y, then z."""
        nx, ny, _ = self.shape
        return cell.ix + cell.iy * nx + cell.iz * nx * ny

    def total_steps(self) -> int:
        return sum(c.request.steps * c.request.n_iter for c in self.cells)


def plan(base: GenerationRequest, x: AxisSpec, y: AxisSpec | None = None, z: AxisSpec | None = None, *,
         csv_mode: bool = True, no_fixed_seeds: bool = False, vary_seeds: tuple[bool, bool, bool] = (False,) * 3,
         check: Callable[[GenerationRequest], None] | None = None) -> Plan:
    """The cells of an X/Y/Z plot over `base`, every value checked before anything runs.

    Args:
        base: the request every cell starts from.
        x, y, z: the axes (None: Nothing).
        csv_mode: read choice axes (Sampler, Checkpoint name, ...) from their text, not their
            dropdown list (the web UI's "Use text inputs instead of dropdowns").
        no_fixed_seeds: keep -1 seeds -1, so every cell draws its own (the web UI's "Keep -1 for seeds").
        vary_seeds: add ix / iy*len(xs) / iz*len(xs)*len(ys) to each cell's seed.
        check: a face's check of each cell's request (`request.check_request` with its models folder).
    """
    nothing = AxisSpec(axis_options("txt2img")[0])
    specs = (x, y or nothing, z or nothing)
    values, texts = [], []
    for name, spec in zip("XYZ", specs):
        option = spec.option
        if option.choices and not csv_mode and spec.dropdown:  # without a list, the text (the web UI: nothing)
            items = list(spec.dropdown)
            text = list_to_csv(items)
            vals = parse_values(option, items, f"{name} values")
        else:
            text = spec.text
            vals = parse_values(option, text, f"{name} values")
        if option.label in ("Seed", "Var. seed") and not no_fixed_seeds:
            vals = [random.randrange(MAX_SEED) if v == -1 else v for v in vals]
        values.append(vals)
        texts.append(text)
    if not no_fixed_seeds and (base.seed is None or base.seed < 0):
        base = replace(base, seed=random.randrange(MAX_SEED))  # the web UI's fix_seed
    for spec, vals, name in zip(specs, values, "XYZ"):
        _confirm(spec.option, vals, base, f"{name} values")
    xs, ys, zs = values
    cells: list[Cell] = []
    for iz, zv in enumerate(zs):
        for iy, yv in enumerate(ys):
            for ix, xv in enumerate(xs):
                req, ckpt = replace(base, styles=list(base.styles)), None
                for spec, v, vals in ((specs[0], xv, xs), (specs[1], yv, ys), (specs[2], zv, zs)):
                    req, ckpt = _apply(spec.option, req, v, vals, ckpt)
                seed_add = 0
                if vary_seeds[0]:
                    seed_add += ix
                if vary_seeds[1]:
                    seed_add += iy * (len(xs) if vary_seeds[0] else 1)
                if vary_seeds[2]:
                    seed_add += iz * (len(xs) if vary_seeds[0] else 1) * (len(ys) if vary_seeds[1] else 1)
                if seed_add and req.seed is not None and req.seed >= 0:
                    req = replace(req, seed=req.seed + seed_add)
                if check is not None:
                    try:
                        check(req)
                    except SdlabError as e:
                        raise type(e)(f"X/Y/Z plot cell {_cell_name(specs, (xv, yv, zv))}: {e}") from None
                cells.append(Cell(ix, iy, iz, req, ckpt))
    result = Plan(specs, (xs, ys, zs), tuple(texts), cells, no_fixed_seeds)  # type: ignore[arg-type]
    result.cells.sort(key=_run_order(specs, result))
    return result


def _cell_name(specs, values) -> str:
    parts = [format_value(s.option, v) or f"{s.option.label} {v}" for s, v in zip(specs, values)
             if s.option.label != "Nothing"]
    return "(" + ", ".join(parts) + ")"


def _run_order(specs: tuple[AxisSpec, ...], p: Plan):
    """The web UI's loop order: the costliest axis outermost (ties: z, then y), x fastest
    otherwise."""
    cx, cy, cz = (s.option.cost for s in specs)
    first, second = "z", "y"
    if cx > cy and cx > cz:
        first, second = "x", "y" if cy > cz else "z"
    elif cy > cx and cy > cz:
        first, second = "y", "x" if cx > cz else "z"
    elif cz > cx and cz > cy:
        first, second = "z", "x" if cx > cy else "y"
    third = ({"x", "y", "z"} - {first, second}).pop()
    return lambda c: tuple(getattr(c, "i" + a) for a in (first, second, third))


def _confirm(option: AxisOption, values: list, base: GenerationRequest, where: str) -> None:
    """What the web UI checks before the first cell (its `confirm` functions), and what sdlab
    checks besides so that a typo fails now, not after half the grid."""
    from ..sampling.samplers import resolve_sampler
    from ..sampling.schedules import resolve_schedule

    label = option.label
    try:
        if label in ("Sampler", "Hires sampler"):
            for v in values:
                resolve_sampler(v)
        elif label == "Schedule type":
            for v in values:
                resolve_schedule(v)
        elif label == "Prompt S/R":
            if values[0] not in base.prompt and values[0] not in base.negative_prompt:
                raise SdlabError(f"Prompt S/R did not find {values[0]!r} in the prompt or negative prompt (the "
                                 "first value is what the others replace)")
        elif label == "Size":
            for v in values:
                _size(v)
        elif label == "RNG source":
            for v in values:
                if v.lower() not in _RNG:
                    raise SdlabError(f"unknown RNG source {v!r}; choose GPU, CPU or NV")
    except SdlabError as e:
        raise SdlabError(f"{where}: {e}") from None


def _size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    try:
        return int(w.strip()), int(h.strip())
    except ValueError:
        raise SdlabError(f"{text!r} is not a size WIDTHxHEIGHT such as 512x768") from None


def _apply(option: AxisOption, req: GenerationRequest, value: Any, values: list,
           checkpoint: str | None) -> tuple[GenerationRequest, str | None]:
    label = option.label
    if label == "Nothing":
        return req, checkpoint
    if option.field is not None:
        return replace(req, **{option.field: value}), checkpoint
    if label == "Prompt S/R":
        return replace(req, prompt=req.prompt.replace(values[0], value),
                       negative_prompt=req.negative_prompt.replace(values[0], value)), checkpoint
    if label == "Prompt order":
        return replace(req, prompt=_reorder(req.prompt, value)), checkpoint
    if label == "Checkpoint name":
        return req, value
    if label == "Styles":
        return replace(req, styles=[*req.styles, *value.split(",")]), checkpoint
    if label == "Size":
        w, h = _size(value)
        return replace(req, width=w, height=h), checkpoint
    if label == "RNG source":
        return replace(req, rng=_RNG[value.lower()]), checkpoint
    raise SdlabError(f"the {label!r} axis is not supported by sdlab")


def _reorder(prompt: str, order: tuple[str, ...]) -> str:
    """The web UI's `apply_order`: the tokens, taken out where they first occur, put back in
    `order`."""
    found = sorted((prompt.find(t), t) for t in order)
    parts, rest = [], prompt
    for _, token in found:
        n = rest.find(token)
        parts.append(rest[:n])
        rest = rest[n + len(token):]
    return "".join(part + token for part, token in zip(parts, order)) + rest


# -- the grid ---------------------------------------------------------------------------------------

# The web UI's default grid colours (options grid_text_active_color, grid_background_color).
TEXT_COLOR = (0, 0, 0)
BACKGROUND = (255, 255, 255)


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's own font (DejaVu Sans metrics, needs FreeType) at `size`: always there, unlike
    the web UI's Roboto."""
    return ImageFont.load_default(size=max(1, size))


def image_grid(images: Sequence[Image.Image], rows: int) -> Image.Image:
    """The web UI's `image_grid`: `rows` rows, left to right, on black; every cell as large as
    the largest image (the web UI takes the first's size: the same for a grid of one size)."""
    rows = min(rows, len(images))
    cols = math.ceil(len(images) / rows)
    w, h = max(i.width for i in images), max(i.height for i in images)
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for n, img in enumerate(images):
        grid.paste(img.convert("RGB"), (n % cols * w, n // cols * h))
    return grid


@dataclass(frozen=True)
class GridAnnotation:
    """One line of a grid label (the web UI's `GridAnnotation`); an inactive one (the prompt
    matrix's parts left out of a cell) is drawn grey and struck through."""

    text: str = ""
    is_active: bool = True


Label = str | Sequence[GridAnnotation]
TEXT_INACTIVE_COLOR = (153, 153, 153)  # the web UI's grid_text_inactive_color


def draw_grid_annotations(im: Image.Image, width: int, height: int, hor_texts: Sequence[Label],
                          ver_texts: Sequence[Label], margin: int = 0) -> Image.Image:
    """The web UI's `draw_grid_annotations`: labels above the columns and left of the rows
    (words wrapped to the cell width, or 3/4 of it on the left; a label too wide for its place
    shrinks), `margin` px between cells, font size (width + height) // 25. A label is a string
    or a list of `GridAnnotation` lines."""
    fontsize = (width + height) // 25
    line_spacing = fontsize // 2
    fnt = font(fontsize)
    hor_lines = [[GridAnnotation(t)] if isinstance(t, str) else list(t) for t in hor_texts]
    ver_lines = [[GridAnnotation(t)] if isinstance(t, str) else list(t) for t in ver_texts]
    pad_left = width * 3 // 4 if any(a.text for lines in ver_lines for a in lines) else 0
    cols, rows = im.width // width, im.height // height
    if cols != len(hor_texts) or rows != len(ver_texts):
        raise ValueError(f"{len(hor_texts)}x{len(ver_texts)} labels for a grid of {cols}x{rows}")
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def lines_of(label: list[GridAnnotation], allowed: int) -> list[tuple[str, tuple[int, int], int, bool]]:
        out = []
        for annotation in label:
            wrapped = [""]
            for word in annotation.text.split():
                line = f"{wrapped[-1]} {word}".strip()
                if measure.textlength(line, font=fnt) <= allowed:
                    wrapped[-1] = line
                else:
                    wrapped.append(word)
            for line in wrapped:
                box = measure.multiline_textbbox((0, 0), line, font=fnt)
                out.append((line, (box[2] - box[0], box[3] - box[1]), allowed, annotation.is_active))
        return out

    hor = [lines_of(t, width) for t in hor_lines]
    ver = [lines_of(t, pad_left) for t in ver_lines]
    hor_heights = [sum(s[1] + line_spacing for _, s, _, _ in lines) - line_spacing for lines in hor]
    ver_heights = [sum(s[1] + line_spacing for _, s, _, _ in lines) - line_spacing * len(lines) for lines in ver]
    pad_top = 0 if sum(hor_heights) == 0 else max(hor_heights) + line_spacing * 2

    result = Image.new("RGB", (im.width + pad_left + margin * (cols - 1), im.height + pad_top + margin * (rows - 1)),
                       BACKGROUND)
    for row in range(rows):
        for col in range(cols):
            cell = im.crop((width * col, height * row, width * (col + 1), height * (row + 1)))
            result.paste(cell, (pad_left + (width + margin) * col, pad_top + (height + margin) * row))
    d = ImageDraw.Draw(result)

    def draw(x: float, y: float, lines) -> None:
        for text, size, allowed, active in lines:
            f, fs = fnt, fontsize
            while d.textlength(text, font=f) > allowed and fs > 1:
                fs -= 1
                f = font(fs)
            color = TEXT_COLOR if active else TEXT_INACTIVE_COLOR
            d.multiline_text((x, y + size[1] / 2), text, font=f, fill=color, anchor="mm", align="center")
            if not active:  # struck through, as the web UI marks a part left out
                d.line((x - size[0] // 2, y + size[1] // 2, x + size[0] // 2, y + size[1] // 2), fill=color,
                       width=4)
            y += size[1] + line_spacing

    for col in range(cols):
        draw(pad_left + (width + margin) * col + width / 2, pad_top / 2 - hor_heights[col] / 2, hor[col])
    for row in range(rows):
        draw(pad_left / 2, pad_top + (height + margin) * row + height / 2 - ver_heights[row] / 2, ver[row])
    return result


def add_params(infotext: str, params: dict[str, object]) -> str:
    """`infotext` with `params` added to its parameters line, before the trailing Version / User
    keys (where the web UI's extra_generation_params go)."""
    from ..infotext import quote

    head, sep, line = infotext.rpartition("\n")
    extra = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    if not extra:
        return infotext
    m = re.search(r", (Version|User): ", line)
    line = f"{line[:m.start()]}, {extra}{line[m.start():]}" if m else (f"{line}, {extra}" if line else extra)
    return head + sep + line


@dataclass
class Grid:
    """What the web UI's script returns: the images in its order (the Z grid; the sub-grids if
    `include_sub_grids`; the cells' first images if `include_lone_images`), their infotexts, and
    every cell's result (by the web UI's cell index) for the faces to save."""

    images: list[Image.Image]
    infotexts: list[str]
    results: list[GenerationResult | None]
    seeds: list[int] = field(default_factory=list)  # the web UI's all_seeds: sub-grids', then cells'
    interrupted: bool = False


def assemble(p: Plan, results: dict[int, GenerationResult], *, draw_legend: bool = True,
             include_lone_images: bool = False, include_sub_grids: bool = False, margin_size: int = 0) -> Grid:
    """The grid images of a plan whose cells ran (`results` by `Plan.index`; a cell missing or
    without images, interrupted say, is a black image, as the web UI draws it)."""
    from ..infotext import with_infotext

    nx, ny, nz = p.shape
    ordered = [results.get(i) for i in range(nx * ny * nz)]
    first = next((r for r in ordered if r is not None and r.images), None)
    if first is None:
        raise SdlabError("X/Y/Z plot: no cell finished (interrupted before the first image)")
    cells = [r.images[0] if r is not None and r.images else Image.new("RGB", first.images[0].size) for r in ordered]
    infos = [r.infotexts[0] if r is not None and r.images else "" for r in ordered]
    seeds = [r.seeds[0] if r is not None and r.images else -1 for r in ordered]
    x_labels, y_labels, z_labels = p.labels(0), p.labels(1), p.labels(2)

    def script_params(axes: str) -> dict[str, object]:
        out: dict[str, object] = {"Script": TITLE}
        for i, name in enumerate("XYZ"):
            spec = p.axes[i]
            if name not in axes or spec.option.label == "Nothing":
                continue
            out[f"{name} Type"] = spec.option.label
            out[f"{name} Values"] = p.texts[i]
            if spec.option.label in ("Seed", "Var. seed") and not p.no_fixed_seeds:
                out[f"Fixed {name} Values"] = ", ".join(str(v) for v in p.values[i])
        return out

    sub_grids, sub_infos = [], []
    for iz in range(nz):
        part = cells[iz * nx * ny:(iz + 1) * nx * ny]
        grid = image_grid(part, rows=ny)
        if draw_legend:
            w, h = max(i.width for i in part), max(i.height for i in part)
            grid = draw_grid_annotations(grid, w, h, x_labels, y_labels, margin_size)
        info = infos[iz * nx * ny] or first.infotexts[0]
        sub_grids.append(grid)
        sub_infos.append(add_params(info, script_params("XY")))
    z_grid = image_grid(sub_grids, rows=1)
    if draw_legend:
        w, h = max(g.width for g in sub_grids), max(g.height for g in sub_grids)
        z_grid = draw_grid_annotations(z_grid, w, h, z_labels, [""])
    main_info = add_params(infos[0] or first.infotexts[0], script_params("XYZ"))
    images, texts, all_seeds = [z_grid], [main_info], []
    if include_sub_grids:
        images += sub_grids
        texts += sub_infos
        all_seeds += [seeds[iz * nx * ny] for iz in range(nz)]
    all_seeds += seeds
    if include_lone_images:
        images += cells
        texts += infos
    images = [with_infotext(img, text) if text else img for img, text in zip(images, texts)]
    interrupted = any(r is None or r.interrupted for r in ordered)
    return Grid(images, texts, ordered, all_seeds, interrupted)
