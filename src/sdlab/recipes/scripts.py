"""What the web UI's scripts share as recipes over whole requests (`prompt_matrix.py`,
`prompts_from_file.py`, `outpaint_scripts.py`; the X/Y/Z plot is `xyz.py`): each plans the
ordinary `GenerationRequest`s the script makes, runs them through a `Generate` the face gives
(the server's queued pipeline, or a `Pipeline` from Python), and puts the images together as the
script does. No script samples anything itself, so each of its images is the image its request
makes alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from PIL import Image

from ..errors import SdlabError
from ..request import GenerationRequest, GenerationResult, Interrupted, Progress

if TYPE_CHECKING:
    from ..pipeline import Pipeline

__all__ = ["Generate", "ScriptOutput", "ScriptPlan", "pipeline_generate", "run_requests"]

# One request made into images; `checkpoint`: the model a script line names (prompts from file's
# --sd_model), None for the one in use.
Generate = Callable[[GenerationRequest, "str | None"], GenerationResult]


@dataclass
class ScriptOutput:
    """What a script returns, in the web UI's order: its images (a grid first where it makes
    one) with their infotexts, and every request's result in the order they ran."""

    images: list[Image.Image]
    infotexts: list[str]
    results: list[GenerationResult]
    index_of_first_image: int = 0  # as the web UI reports it (1 after the prompt matrix's grid)
    interrupted: bool = False
    all_prompts: list[str] = field(default_factory=list)
    grids: int = 0  # how many of the images, first, are grids
    # The results are steps toward the images (outpainting's tiles and strips), not images of their own.
    intermediate: bool = False


class ScriptPlan(Protocol):
    """A script made ready: how many requests it will run, and running them. `checks`: each
    request it will run, as far as it knows them before running (with its size and steps; a
    later step's image may not be there yet), paired with the checkpoint it names, for a face to
    check against its limits before any runs."""

    count: int
    checks: list[tuple[GenerationRequest, str | None]]

    def run(self, generate: Generate) -> ScriptOutput: ...


def run_requests(requests: Sequence[tuple[GenerationRequest, str | None]], generate: Generate
                 ) -> tuple[list[GenerationResult], bool]:
    """Run the requests in order; stop at the first one interrupted. Returns the results that
    have images and whether it stopped early."""
    results = []
    for req, checkpoint in requests:
        try:
            res = generate(req, checkpoint)
        except Interrupted:
            return results, True
        if res.images:
            results.append(res)
        if res.interrupted:
            return results, True
    return results, False


class RequestsPlan:
    """A plan made of plain requests on the loaded model, run in order (mixed into the scripts'
    dataclass plans, which declare `requests`)."""

    requests: list[GenerationRequest]

    @property
    def count(self) -> int:
        return len(self.requests)

    @property
    def checks(self) -> list[tuple[GenerationRequest, str | None]]:
        return [(r, None) for r in self.requests]

    def run_requests(self, generate: Generate, nothing_done: str) -> tuple[list[GenerationResult], bool]:
        """`run_requests` over them; `nothing_done` is the error when the first is interrupted."""
        results, interrupted = run_requests(self.checks, generate)
        if not results:
            raise SdlabError(nothing_done)
        return results, interrupted


def pipeline_generate(pipe: Pipeline, callback: Callable[[Progress], None] | None = None) -> Generate:
    """A `Generate` over one loaded `Pipeline` (the Python face): a script line that names
    another checkpoint is refused, as only the server switches models."""

    def generate(req: GenerationRequest, checkpoint: str | None = None) -> GenerationResult:
        if checkpoint is not None:
            raise SdlabError(f"a script line names the checkpoint {checkpoint!r}; from Python, load that model and "
                             "run those lines on it (the server switches models by itself)")
        return pipe.generate(req, callback)

    return generate
