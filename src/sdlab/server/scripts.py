"""The web UI's scripts that sdlab runs: the registry behind `script_name` / `script_args` (web UI
1.10's positional order) on /sdapi/v1/txt2img and /img2img, and their listings (GET
/sdapi/v1/scripts, /script-info).

`SCRIPTS` holds each script's title (matched in any case, as the web UI's `script_name_to_index`),
the tabs it shows on, its arguments as its `ui()` returns them (what script-info lists, and what
positional script_args fill: defaults for those a client leaves out), and the recipe it plans
(`recipes/prompt_matrix.py`, `prompts_from_file.py`, `outpaint_scripts.py`). `server/run_scripts.py`
runs them; the X/Y/Z plot runs in `server/xyz.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import SdlabError
from ..recipes import outpaint_scripts, prompt_matrix, prompts_from_file, xyz
from ..recipes.scripts import ScriptPlan
from ..request import GenerationRequest
from .errors import BadInput
from .models import ScriptArg, ScriptInfo


@dataclass(frozen=True)
class Arg:
    """One control of a script's `ui()`: its `run()` parameter, and what script-info shows."""

    name: str
    label: str
    value: Any = None
    minimum: Any = None
    maximum: Any = None
    step: Any = None
    choices: tuple[str, ...] | None = None

    def info(self) -> ScriptArg:
        return ScriptArg(label=self.label, value=self.value, minimum=self.minimum, maximum=self.maximum,
                         step=self.step, choices=list(self.choices) if self.choices is not None else None)


@dataclass(frozen=True)
class Script:
    title: str  # as its title(); the API's name is its lowercase
    txt2img: bool
    img2img: bool
    args: tuple[Arg, ...]
    # script_args (defaults filled) -> the recipe's plan over the translated request; None: X/Y/Z.
    plan: Callable[[dict[str, Any], GenerationRequest], ScriptPlan] | None = None

    @property
    def name(self) -> str:
        return self.title.lower()


def _directions(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise SdlabError(f"{where}: expected a list of directions (left, right, up, down), got {value!r}")
    return tuple(str(v) for v in value)


def _index(value: Any, choices: tuple[str, ...], where: str) -> int:
    """A radio of type "index": its index, or (as clients also send) its label."""
    if isinstance(value, str) and value in choices:
        return choices.index(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(choices):
        raise SdlabError(f"{where}: expected 0-{len(choices) - 1} ({', '.join(choices)}), got {value!r}")
    return value


def _number(value: Any, cast, where: str):
    if isinstance(value, bool):
        raise SdlabError(f"{where}: expected a number, got {value!r}")
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise SdlabError(f"{where}: expected a number, got {value!r}") from None


def _poor_mans(a: dict[str, Any], req: GenerationRequest) -> ScriptPlan:
    options = outpaint_scripts.PoorMansOutpainting(
        _number(a["pixels"], int, "pixels"), _number(a["mask_blur"], int, "mask_blur"),
        _index(a["inpainting_fill"], outpaint_scripts.MASKED_CONTENT, "inpainting_fill"),
        _directions(a["direction"], "direction"))
    return outpaint_scripts.plan_poor_mans(req, options)


def _mk2(a: dict[str, Any], req: GenerationRequest) -> ScriptPlan:
    if isinstance(a["info"], (int, float)) and not isinstance(a["info"], bool):
        # A client that counts from pixels would have every value read one place off.
        raise SdlabError(f"script_args[0] is {a['info']!r}, but it is the script's info text (send null); pixels "
                         "is script_args[1], as in the web UI")
    options = outpaint_scripts.OutpaintingMk2(
        _number(a["pixels"], int, "pixels"), _number(a["mask_blur"], int, "mask_blur"),
        _directions(a["direction"], "direction"), _number(a["noise_q"], float, "noise_q"),
        _number(a["color_variation"], float, "color_variation"))
    return outpaint_scripts.plan_mk2(req, options)


def _matrix(a: dict[str, Any], req: GenerationRequest) -> ScriptPlan:
    options = prompt_matrix.PromptMatrix(bool(a["put_at_start"]), bool(a["different_seeds"]), a["prompt_type"],
                                         a["variations_delimiter"], _number(a["margin_size"], int, "margin_size"))
    return prompt_matrix.plan(req, options)


def _from_file(a: dict[str, Any], req: GenerationRequest) -> ScriptPlan:
    if not isinstance(a["prompt_txt"], str):
        raise SdlabError(f"prompt_txt: expected the prompts as text, one per line, got {a['prompt_txt']!r}")
    options = prompts_from_file.PromptsFromFile(bool(a["checkbox_iterate"]), bool(a["checkbox_iterate_batch"]),
                                                a["prompt_position"], a["prompt_txt"])
    return prompts_from_file.plan(req, options)


_DIRECTIONS = Arg("direction", "Outpainting direction", list(outpaint_scripts.DIRECTIONS),
                  choices=outpaint_scripts.DIRECTIONS)
_MK2_INFO = ("<p style=\"margin-bottom:0.75em\">Recommended settings: Sampling Steps: 80-100, Sampler: Euler a, "
             "Denoising strength: 0.8</p>")


def _xyz_args(mode: xyz.Mode) -> tuple[Arg, ...]:
    labels = tuple(o.label for o in xyz.axis_options(mode))
    axes = []
    for n, axis in enumerate("XYZ"):
        low = axis.lower()
        axes += [Arg(f"{low}_type", f"{axis} type", labels[1 if n == 0 else 0], choices=labels),
                 Arg(f"{low}_values", f"{axis} values", ""),
                 Arg(f"{low}_values_dropdown", f"{axis} values", None, choices=())]
    flags = [Arg("draw_legend", "Draw legend", True), Arg("include_lone_images", "Include Sub Images", False),
             Arg("include_sub_grids", "Include Sub Grids", False), Arg("no_fixed_seeds", "Keep -1 for seeds", False),
             Arg("vary_seeds_x", "Vary seeds for X", False), Arg("vary_seeds_y", "Vary seeds for Y", False),
             Arg("vary_seeds_z", "Vary seeds for Z", False),
             Arg("margin_size", "Grid margins (px)", 0, 0, 500, 2),
             Arg("csv_mode", "Use text inputs instead of dropdowns", False)]
    return tuple(axes + flags)


# In the web UI's order (its script files, alphabetically); ControlNet, an extension, after them.
SCRIPTS: tuple[Script, ...] = (
    Script(outpaint_scripts.MK2_TITLE, False, True, (
        Arg("info", "", _MK2_INFO),
        Arg("pixels", "Pixels to expand", 128, 8, 256, 8),
        Arg("mask_blur", "Mask blur", 8, 0, 64, 1),
        _DIRECTIONS,
        Arg("noise_q", "Fall-off exponent (lower=higher detail)", 1.0, 0.0, 4.0, 0.01),
        Arg("color_variation", "Color variation", 0.05, 0.0, 1.0, 0.01)), _mk2),
    Script(outpaint_scripts.POOR_MANS_TITLE, False, True, (
        Arg("pixels", "Pixels to expand", 128, 8, 256, 8),
        Arg("mask_blur", "Mask blur", 4, 0, 64, 1),
        Arg("inpainting_fill", "Masked content", "fill", choices=outpaint_scripts.MASKED_CONTENT),
        _DIRECTIONS), _poor_mans),
    Script(prompt_matrix.TITLE, True, True, (
        Arg("put_at_start", "Set at prompt start", False),
        Arg("different_seeds", "Random seeds", False),
        Arg("prompt_type", "Prompt type", "positive", choices=("positive", "negative")),
        Arg("variations_delimiter", "Joining char", "comma", choices=("comma", "space")),
        Arg("margin_size", "Grid margins", 0, 0, 500, 2)), _matrix),
    Script(prompts_from_file.TITLE, True, True, (
        Arg("checkbox_iterate", "Iterate seed every line", False),
        Arg("checkbox_iterate_batch", "Use same random seed for all lines", False),
        Arg("prompt_position", "Insert prompts at the", "start", choices=("start", "end")),
        Arg("prompt_txt", "List of prompt inputs", "")), _from_file),
    Script(xyz.TITLE, True, True, ()),  # its args differ by tab: `_xyz_args`
)


def find(script_name: str | None, kind: str) -> Script | None:
    """The script a request's script_name names on its tab (any case), or None."""
    if not isinstance(script_name, str):
        return None
    name = script_name.strip().lower()
    for script in SCRIPTS:
        if script.name == name and (script.img2img if kind == "img2img" else script.txt2img):
            return script
    return None


def not_found(script_name: str, kind: str) -> str:
    """The web UI's 422 text, with the names that would work on this tab."""
    names = [s.name for s in SCRIPTS if (s.img2img if kind == "img2img" else s.txt2img)]
    return f"Script {script_name!r} not found (this tab's scripts: {', '.join(names)}; leave script_name out)"


def script_lists() -> dict[str, list[str]]:
    """GET /sdapi/v1/scripts: the lowercase titles per tab, ControlNet (always on) last."""
    return {tab: [s.name for s in SCRIPTS if getattr(s, tab)] + ["controlnet"] for tab in ("txt2img", "img2img")}


def script_info(controlnet_units: int) -> list[ScriptInfo]:
    """GET /sdapi/v1/script-info: the web UI's `api_info` of each script on each tab (txt2img's
    first), each control of its ui() as an arg."""
    from .controlnet import UNIT_DEFAULTS

    out = []
    for tab in ("txt2img", "img2img"):
        img2img = tab == "img2img"
        for s in SCRIPTS:
            if getattr(s, tab):
                args = _xyz_args(tab) if s.title == xyz.TITLE else s.args
                out.append(ScriptInfo(name=s.name, is_alwayson=False, is_img2img=img2img,
                                      args=[a.info() for a in args]))
        units = [ScriptArg(label=f"ControlNet Unit {i}", value=dict(UNIT_DEFAULTS)) for i in range(controlnet_units)]
        out.append(ScriptInfo(name="controlnet", is_alwayson=True, is_img2img=img2img, args=units))
    return out


def parse_script_args(script: Script, args: list[Any]) -> dict[str, Any]:
    """Positional script_args -> {run() parameter: value}; those left out take the ui()'s
    defaults, as the web UI's API fills them."""
    if len(args) > len(script.args):
        raise BadInput(f"script_args: {script.title} takes {len(script.args)} values "
                       f"({', '.join(a.name for a in script.args)}), got {len(args)}")
    return {a.name: (args[i] if i < len(args) else a.value) for i, a in enumerate(script.args)}


