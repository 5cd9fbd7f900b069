"""Whether a `tiny-shapes` pipeline draws what its prompts say, as the pixel judge reads the images.

The prompt set is fixed: every ordered pair of distinct palette colours once, the shapes in turn, in the
training set's first phrasing (30 prompts), and each colour once more as the shape on the next colour in
the reversed word order ("a blue background with a red circle"), so word order must be understood (6).
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from benchmarks.shapes import data
from benchmarks.shapes.judge import Verdict, judge

SEEDS = (0, 1)
REVERSED_PHRASING = 3  # "a {background} background with a {colour} {shape}"
NO_SHAPE = "none"  # the judge's column for images where it finds no shape
# The acceptance bars (share of images whose judged colour is the prompted one).
COLOUR_BAR = 0.90
BACKGROUND_BAR = 0.95


@dataclasses.dataclass(frozen=True)
class Prompted:
    shape: str
    colour: str
    background: str
    phrasing: int = 0

    @property
    def prompt(self) -> str:
        return data.caption(self.shape, self.colour, self.background, self.phrasing)


def prompt_set() -> tuple[Prompted, ...]:
    """The 36 prompts of the module docstring, in a fixed order."""
    pairs = [(c, b) for c, b in itertools.permutations(data.COLOURS, 2)]
    plain = [Prompted(data.SHAPES[i % len(data.SHAPES)], c, b) for i, (c, b) in enumerate(pairs)]
    following = zip(data.COLOURS, data.COLOURS[1:] + data.COLOURS[:1])
    reversed_order = [Prompted(data.SHAPES[i % len(data.SHAPES)], c, b, REVERSED_PHRASING)
                      for i, (c, b) in enumerate(following)]
    return tuple(plain + reversed_order)


@dataclasses.dataclass(frozen=True)
class Case:
    """One generated image: what was asked and with which seed."""

    asked: Prompted
    seed: int


def cases(prompts: Sequence[Prompted] = prompt_set(), seeds: Sequence[int] = SEEDS) -> tuple[Case, ...]:
    return tuple(Case(p, s) for s in seeds for p in prompts)


def generate(pipeline, asked: Sequence[Case], images: np.ndarray | None = None, **options) -> np.ndarray:
    """(N, 64, 64, 3) uint8, one image per case, `options` as GenerationRequest fields (sampler, guidance, ...).

    `images` (N, 64, 64, 3) uint8: each case's img2img input. Cases run in loops of as many
    images as the bundle's batch profile allows.
    """
    from sdrun.images import model_image
    from sdrun.pipeline import GenerationRequest

    per_loop = pipeline.recipe.shapes.batch.max
    requests = [GenerationRequest(c.asked.prompt, seed=c.seed, **options,
                                  **({} if images is None else {"image": model_image(images[i])}))
                for i, c in enumerate(asked)]
    loops = [pipeline.generate_batch(requests[i:i + per_loop]) for i in range(0, len(requests), per_loop)]
    return np.concatenate([r.images for results in loops for r in results])


@dataclasses.dataclass(frozen=True)
class Score:
    asked: tuple[Case, ...]
    verdicts: tuple[Verdict, ...]

    @classmethod
    def of(cls, asked: Sequence[Case], images: np.ndarray) -> Score:
        return cls(tuple(asked), tuple(judge(image) for image in images))

    def accuracy(self, field: str) -> float:
        """Share of images whose judged `field` (colour, background or shape) is the prompted one."""
        hits = [getattr(c.asked, field) == getattr(v, field) for c, v in zip(self.asked, self.verdicts)]
        return float(np.mean(hits))

    def confusion(self, field: str) -> np.ndarray:
        """(6, 7) counts: prompted colour (rows, palette order) × judged colour (palette order, then none)."""
        columns = [*data.COLOURS, NO_SHAPE]
        table = np.zeros((len(data.COLOURS), len(columns)), dtype=np.int64)
        for case, verdict in zip(self.asked, self.verdicts):
            table[data.COLOURS.index(getattr(case.asked, field)), columns.index(getattr(verdict, field) or NO_SHAPE)] += 1
        return table

    def misses(self) -> list[str]:
        """One line per image whose colour or background is not the prompted one."""
        return [f"seed {c.seed}, {c.asked.prompt!r}: judged a {v.colour} {v.shape} on {v.background}"
                for c, v in zip(self.asked, self.verdicts)
                if (c.asked.colour, c.asked.background) != (v.colour, v.background)]

    def meets_bars(self) -> bool:
        return self.accuracy("colour") >= COLOUR_BAR and self.accuracy("background") >= BACKGROUND_BAR


def confusion_markdown(table: np.ndarray) -> str:
    header = "| prompted \\ judged | " + " | ".join([*data.COLOURS, NO_SHAPE]) + " |"
    rule = "|---" * (table.shape[1] + 1) + "|"
    rows = [f"| {colour} | " + " | ".join(str(n) for n in row) + " |" for colour, row in zip(data.COLOURS, table)]
    return "\n".join([header, rule, *rows])
