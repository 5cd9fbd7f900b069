"""Prompt emphasis as the AUTOMATIC1111 web UI reads it, and the weighting of the encoder's hidden states.

Syntax: `(text)` multiplies the text's weight by 1.1, `[text]` divides it by 1.1, `(text:1.5)` multiplies
it by 1.5; brackets nest and multiply. `\\(` `\\)` `\\[` `\\]` `\\\\` are the literal characters, and a
backslash before anything else is dropped. `BREAK` (upper case, a word of its own) ends the current
75-token chunk. Runs of text of equal weight are joined before tokenizing, as the web UI joins them.

Unbalanced brackets are text, as the web UI reads them, with a warning: a `)` or `]` that closes nothing
is a literal character, and a `(` or `[` still open at the end weights all text after it. Two
differences from the web UI: a weight that is not a number (`(word:abc)`) is refused instead of being
read as text, and `BREAK` inside brackets still breaks the chunk (the web UI tokenizes it as a word);
the brackets' weight carries on into the next chunk.

Weighting (`emphasize`): each token's hidden states are multiplied by its weight, then the chunk is
rescaled so that the mean over all its elements is what it was before weighting.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from sdrun.errors import UserError

ROUND_FACTOR = 1.1  # `(text)`
SQUARE_FACTOR = 1 / 1.1  # `[text]`
BREAK = "BREAK"

_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*")
_NUMBER = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*")
# One lexical piece: an escape, an opening or closing bracket, `:weight)` (a colon, then anything
# without brackets, backslashes or colons, then `)`), a lone colon, or a run of plain text.
_PIECE = re.compile(r"(?P<escape>\\[()\[\]\\]?)|(?P<open>[(\[])|(?P<weight>:[^()\[\]\\:]*\))|(?P<close>[)\]])"
                    r"|(?P<text>[^\\()\[\]:]+|:)")


@dataclasses.dataclass(frozen=True)
class Fragment:
    text: str
    weight: float  # multiplies the hidden states of the text's tokens


@dataclasses.dataclass(frozen=True)
class ParsedPrompt:
    fragments: tuple[Fragment | None, ...]  # None: a BREAK (start the next chunk)
    warnings: tuple[str, ...]


@dataclasses.dataclass
class _Parse:
    """The parse so far: text pieces [text, weight] (None for BREAK), and the piece index where each
    still-open bracket started."""

    pieces: list = dataclasses.field(default_factory=list)
    open: list = dataclasses.field(default_factory=list)  # [(bracket, first piece index)]
    warnings: list = dataclasses.field(default_factory=list)

    def weigh_from(self, start: int, factor: float) -> None:
        for piece in self.pieces[start:]:
            if piece is not None:
                piece[1] *= factor

    def add_text(self, text: str) -> None:
        for i, part in enumerate(_BREAK_SPLIT.split(text)):
            if i:
                self.pieces.append(None)
            self.pieces.append([part, 1.0])

    def close(self, bracket: str, factor: float) -> bool:
        """Close the innermost open `bracket` ('(' or '['); False when none is open."""
        starts = [start for kind, start in self.open if kind == bracket]
        if not starts:
            return False
        self.open.remove((bracket, starts[-1]))
        self.weigh_from(starts[-1], factor)
        return True


def parse_prompt(prompt: str) -> ParsedPrompt:
    """A prompt's text fragments and weights, in order, with BREAKs; UserError for a non-numeric weight."""
    state = _Parse()
    for match in _PIECE.finditer(prompt):
        kind, piece = match.lastgroup, match.group()
        if kind == "escape":
            state.pieces.append([piece[1:], 1.0])
        elif kind == "open":
            state.open.append((piece, len(state.pieces)))
        elif kind == "weight" and any(bracket == "(" for bracket, _ in state.open):
            state.close("(", _weight(piece, prompt, match.start()))
        elif kind == "weight":  # `:W)` with no '(' open: text, and a ')' that closes nothing
            state.add_text(piece[:-1])
            _close(state, ")", match.end() - 1)
        elif kind == "close":
            _close(state, piece, match.start())
        else:
            state.add_text(piece)
    for bracket, factor in (("(", ROUND_FACTOR), ("[", SQUARE_FACTOR)):
        for kind, start in state.open:
            if kind == bracket:
                state.warnings.append(f"the prompt's {bracket!r} is never closed; all text after it is weighted")
                state.weigh_from(start, factor)
    return ParsedPrompt(_joined(state.pieces), tuple(state.warnings))


def _close(state: _Parse, bracket: str, at: int) -> None:
    """A ')' or ']': close the innermost bracket of its kind, or, with none open, read it as text."""
    if not state.close("(" if bracket == ")" else "[", ROUND_FACTOR if bracket == ")" else SQUARE_FACTOR):
        state.warnings.append(f"the prompt's {bracket!r} at character {at} closes nothing; it is read as text "
                              f"(write \\{bracket} for the character without this warning)")
        state.add_text(bracket)


def _weight(piece: str, prompt: str, at: int) -> float:
    """The number W of a `:W)` piece that starts at character `at` of `prompt`."""
    number = piece[1:-1]
    if not _NUMBER.fullmatch(number):
        fragment = prompt[max(0, prompt.rfind("(", 0, at)):at + len(piece)]
        raise UserError(f"the prompt's weight {number.strip()!r} in {fragment!r} is not a number.",
                        expected="(text:1.2): a number after the colon", got=fragment,
                        fix="write the weight as a number, or escape the brackets as \\( \\) to keep them as text")
    return float(number)


def _joined(pieces: list) -> tuple[Fragment | None, ...]:
    """Adjacent texts of equal weight as one fragment (the web UI tokenizes them together)."""
    out: list[list | None] = []
    for piece in pieces:
        if piece is not None and out and out[-1] is not None and out[-1][1] == piece[1]:
            out[-1][0] += piece[0]
        else:
            out.append(None if piece is None else list(piece))
    return tuple(None if p is None else Fragment(p[0], p[1]) for p in out)


def emphasize(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Hidden states (B, T, W) of one chunk weighted per token by `weights` (B, T), each row rescaled to
    its mean before weighting (the web UI's "original" emphasis); a copy, rows of weight 1 unchanged."""
    out = np.array(hidden, copy=True)
    for row in np.flatnonzero((weights != 1.0).any(axis=1)):
        weighted = hidden[row] * weights[row, :, None].astype(hidden.dtype)
        scale = hidden[row].mean(dtype=np.float64) / weighted.mean(dtype=np.float64)
        out[row] = weighted * hidden.dtype.type(scale)
    return out
