"""The web UI's "Prompt matrix" script (A1111 1.10 `scripts/prompt_matrix.py`) as a recipe over
whole requests: the prompt (or the negative prompt) split on `|`; part 0 is in every image, and
image n adds part k+1 when bit k of n is set, so `2 ** (parts - 1)` images, joined by ", " or " "
(parts after the first are stripped of spaces and commas; the first is kept as typed). Every image
has the request's seed, or seed + n with `different_seeds`; variation seeds are subseed + n, as
the web UI numbers them. The grid has `1 << ((parts - 1) // 2)` rows, the first half of the parts
labelled above the columns and the rest left of the rows (`images.draw_prompt_matrix`), and comes
first among the images with the first image's infotext.

The web UI runs the prompts as batches of `batch_size`; here each is a request of its own (batch
size 1), so each image is the one its prompt and seed make alone.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Literal

from ..errors import SdlabError
from ..request import MAX_SEED, GenerationRequest
from .scripts import Generate, RequestsPlan, ScriptOutput
from .xyz import GridAnnotation, draw_grid_annotations, image_grid

__all__ = ["TITLE", "MatrixPlan", "PromptMatrix", "draw_prompt_matrix", "matrix_prompts", "plan"]

TITLE = "Prompt matrix"


@dataclass(frozen=True)
class PromptMatrix:
    """The script's arguments, in the web UI's order and with its defaults."""

    put_at_start: bool = False  # "Set at prompt start": the varying parts before part 0
    different_seeds: bool = False  # "Random seeds": image n gets seed + n
    prompt_type: Literal["positive", "negative"] = "positive"  # which prompt holds the `|` parts
    variations_delimiter: Literal["comma", "space"] = "comma"  # "Joining char"
    margin_size: int = 0  # "Grid margins", px between the cells

    def __post_init__(self):
        if self.prompt_type not in ("positive", "negative"):
            raise SdlabError(f"{TITLE}: unknown prompt type {self.prompt_type!r}; choose positive or negative")
        if self.variations_delimiter not in ("comma", "space"):
            raise SdlabError(f"{TITLE}: unknown joining char {self.variations_delimiter!r}; choose comma or "
                             "space")
        if not 0 <= self.margin_size <= 500:
            raise SdlabError(f"{TITLE}: grid margins {self.margin_size} is outside 0-500")


def matrix_prompts(prompt: str, put_at_start: bool = False, delimiter: str = ", ") -> tuple[list[str], list[str]]:
    """(the prompt's parts, the 2 ** (parts - 1) prompts of the matrix in the web UI's order)."""
    parts = prompt.split("|")
    prompts = []
    for n in range(2 ** (len(parts) - 1)):
        selected = [text.strip().strip(",") for k, text in enumerate(parts[1:]) if n & (1 << k)]
        selected = selected + [parts[0]] if put_at_start else [parts[0]] + selected
        prompts.append(delimiter.join(selected))
    return parts, prompts


@dataclass(frozen=True)
class MatrixPlan(RequestsPlan):
    options: PromptMatrix
    parts: list[str]
    requests: list[GenerationRequest]  # one per image, seeds fixed

    def run(self, generate: Generate) -> ScriptOutput:
        results, interrupted = self.run_requests(generate, f"{TITLE}: interrupted before the first image")
        images = [r.images[0] for r in results]
        infotexts = [r.infotexts[0] for r in results]
        if not interrupted:
            # The web UI draws the grid only over a full matrix.
            w, h = images[0].size
            grid = image_grid(images, rows=1 << ((len(self.parts) - 1) // 2))
            grid = draw_prompt_matrix(grid, w, h, self.parts, self.options.margin_size)
            from ..infotext import with_infotext

            images, infotexts = [with_infotext(grid, infotexts[0]), *images], [infotexts[0], *infotexts]
        prompts = [r.request.prompt for r in results]
        return ScriptOutput(images, infotexts, results, 0 if interrupted else 1, interrupted, prompts,
                            grids=0 if interrupted else 1)


def plan(req: GenerationRequest, options: PromptMatrix = PromptMatrix()) -> MatrixPlan:
    """The matrix's requests: `req` with each prompt of the matrix, one image each."""
    # fix_seed: one seed (and variation seed) for the whole matrix.
    seed = random.randrange(MAX_SEED) if req.seed is None or req.seed < 0 else int(req.seed)
    subseed = random.randrange(MAX_SEED) if req.subseed is None or req.subseed < 0 else int(req.subseed)
    source = req.prompt if options.prompt_type == "positive" else req.negative_prompt
    delimiter = ", " if options.variations_delimiter == "comma" else " "
    parts, prompts = matrix_prompts(source, options.put_at_start, delimiter)
    requests = []
    for n, text in enumerate(prompts):
        field = {"prompt": text} if options.prompt_type == "positive" else {"negative_prompt": text}
        requests.append(replace(req, **field, seed=seed + (n if options.different_seeds else 0), subseed=subseed + n,
                                batch_size=1, n_iter=1))
    return MatrixPlan(options, parts, requests)


def draw_prompt_matrix(grid, width: int, height: int, parts: list[str], margin: int = 0):
    """The web UI's `draw_prompt_matrix`: the first half of the varying parts above the
    columns, the rest left of the rows; each label lists its parts, those left out of that
    column / row struck through."""
    prompts = parts[1:]
    boundary = math.ceil(len(prompts) / 2)
    horizontal, vertical = prompts[:boundary], prompts[boundary:]
    hor = [[GridAnnotation(x, pos & (1 << i) != 0) for i, x in enumerate(horizontal)]
           for pos in range(1 << len(horizontal))]
    ver = [[GridAnnotation(x, pos & (1 << i) != 0) for i, x in enumerate(vertical)] for pos in range(1 << len(vertical))]
    return draw_grid_annotations(grid, width, height, hor, ver, margin)
