"""Saved prompt styles: the web UI's `styles.csv` and the way it merges a style into a prompt.

The file has the columns `name,prompt,negative_prompt` (an older `name,text` layout is read
too). A style's prompt holding `{prompt}` has the prompt put in its place; any other style
prompt is appended after a comma. Styles apply in the order given, each to the result of the
one before, the negative prompt likewise (A1111 `modules/styles.py`). The infotext records the
styled prompts, as the web UI's does; there is no separate key for the styles.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SdlabError

if TYPE_CHECKING:
    from .request import GenerationRequest

log = logging.getLogger(__name__)

STYLES_FILE = "styles.csv"  # its name in the models folder's root, where sdlab looks by default


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str
    negative_prompt: str


def read_styles(path: str | Path) -> dict[str, PromptStyle]:
    """The styles of a styles.csv by name, in file order; none if the file does not exist.

    Raises:
        SdlabError: the file cannot be read or has no `name` column.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        # utf-8-sig and skipinitialspace as the web UI reads it (files saved by Excel start with a BOM).
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f, skipinitialspace=True))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SdlabError(f"{path}: cannot read the styles ({str(e).splitlines()[0][:120]})") from None
    styles = {}
    for row in rows:
        name = row.get("name")
        if name is None:
            raise SdlabError(f"{path}: no 'name' column; a styles file has the columns name,prompt,negative_prompt")
        if not name or name.startswith("#"):  # empty rows and comments, as the web UI skips them
            continue
        prompt = row.get("prompt", row.get("text")) or ""
        styles[name] = PromptStyle(name, prompt, row.get("negative_prompt") or "")
    return styles


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """One style's text applied to a prompt: into its `{prompt}`, else after a comma."""
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply_styles(req: GenerationRequest, path: str | Path) -> GenerationRequest:
    """`req` with its `styles` (names in the styles file at `path`) merged into its prompt and
    negative prompt; `styles` stays as the record of which were applied.

    Raises:
        SdlabError: a style is not in the file (the web UI skips such a name silently; an image
            made without the style asked for must not pass for one made with it).
    """
    if not req.styles:
        return req
    styles = read_styles(path)
    missing = [name for name in req.styles if name not in styles]
    if missing:
        have = ", ".join(map(repr, styles)) or "none"
        raise SdlabError(f"no style named {missing[0]!r} in {path} (styles there: {have})")
    prompt, negative = req.prompt, req.negative_prompt
    # The hires fix's own prompts get the styles too, as the web UI does; empty ones stay empty
    # (they mean "the prompt", already styled).
    hr_prompt, hr_negative = req.hr_prompt, req.hr_negative_prompt
    for name in req.styles:
        prompt = merge_prompts(styles[name].prompt, prompt)
        negative = merge_prompts(styles[name].negative_prompt, negative)
        hr_prompt = hr_prompt and merge_prompts(styles[name].prompt, hr_prompt)
        hr_negative = hr_negative and merge_prompts(styles[name].negative_prompt, hr_negative)
    return replace(req, prompt=prompt, negative_prompt=negative, hr_prompt=hr_prompt, hr_negative_prompt=hr_negative)
