"""Prompt chunking and emphasis: our tokenizer's ids and weights equal an independent statement of the
AUTOMATIC1111 web UI's rule, written here as a character scan and a window-by-window split."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import open_clip
import pytest

from sdrun.tokenizer import CONTEXT_LENGTH, VOCAB_FILENAME, ClipTokenizer

START, END, COMMA = 49406, 49407, 267
CHUNK = CONTEXT_LENGTH - 2
BACKTRACK = 20
FACTORS = {"(": 1.1, "[": 1 / 1.1}
_CLOSING = {")": "(", "]": "["}
_WEIGHT_CLOSE = re.compile(r":([^()\[\]\\:]*)\)")


def words(n: int, word: str = "word") -> str:
    return " ".join([word] * n)


CORPUS = [
    "a photo of an astronaut riding a horse",
    # commas near the end of a full chunk: after 55..74 tokens (within the last 20) the chunk ends after it
    *(f"{words(i)}, {words(80 - i, 'cat')}" for i in (53, 54, 55, 56, 60, 70, 73, 74, 75, 76)),
    f"{words(75)}, {words(10, 'dog')}",  # the comma itself finds the chunk full
    f"{words(40)}, {words(14, 'red')}, {words(30, 'cat')}",  # two commas, the last one counts
    "a, " * 110,
    "a cat BREAK a dog",
    "BREAK first chunk empty",
    "last chunk BREAK",
    "x BREAK BREAK y",
    f"{words(75)} BREAK after a full chunk",
    f"{words(60)}, {words(10)} BREAK {words(80, 'dog')}",
    "BREAKING news, aBREAK, BREAK, BREAK.",
    words(300),
    ("masterpiece, best quality, a (very detailed:1.2) portrait of an old sailor, ((weathered skin)), "
     "[[blurry background]], dramatic lighting, " * 6),
    f"({words(70, 'red')}, {words(30, 'blue')}:1.3) {words(40, 'green')} [{words(20, 'cat')}]",
    f"({words(50)} BREAK {words(30, 'dog')}) and then (more:0.5)",
    "a ((nested (deeply:1.5) [and] square)) thing, (x:-0.5) (y: 2 ) (z:.5) (w:3.)",
    r"escaped \(round\) and \[square\] and \\ backslash, (real)",
    "unclosed (round and [square",
    "closing) too many] here ) (ok)",
    "(a:1.5 (b:2) c)",
    "time 10:30 (noon) and ratio 1:2",
    ("a (cat:1.2), " * 30) + "end",
    "",
]


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer.from_file(Path(open_clip.__file__).parent / VOCAB_FILENAME)


def reference_fragments(prompt: str) -> list[tuple[str, float] | None]:
    """(text, weight) runs and None for BREAK: each character is tagged with the brackets open around it, and
    a bracket's factor is known when it closes (1.1 / 1/1.1 / its number) or when the prompt ends open."""
    tagged: list[tuple[str, tuple[int, ...]] | None] = []
    open_brackets: list[tuple[str, int]] = []  # (kind, bracket id)
    factors: dict[int, tuple[int, float]] = {}  # bracket id -> (order it was resolved in, factor)
    next_id, i = 0, 0

    def text(char: str) -> None:
        tagged.append((char, tuple(b for _, b in open_brackets)))

    def resolve(kind: str, factor: float) -> bool:
        innermost = [b for k, b in open_brackets if k == kind]
        if not innermost:
            return False
        open_brackets.remove((kind, innermost[-1]))
        factors[innermost[-1]] = (len(factors), factor)
        return True

    while i < len(prompt):
        char, rest = prompt[i], prompt[i:]
        if char == "\\":
            if rest[1:2] and rest[1] in "()[]\\":
                text(rest[1])
            i += 2 if rest[1:2] in tuple("()[]\\") else 1
            continue
        if char in "([":
            open_brackets.append((char, next_id))
            next_id += 1
        elif char == ":" and any(k == "(" for k, _ in open_brackets) and _WEIGHT_CLOSE.match(rest):
            match = _WEIGHT_CLOSE.match(rest)
            resolve("(", float(match[1]))
            i += match.end()
            continue
        elif char in _CLOSING and resolve(_CLOSING[char], FACTORS[_CLOSING[char]]):
            pass
        elif rest.startswith("BREAK") and not re.match(r"\w", prompt[i - 1:i] or " ") \
                and not re.match(r"\w", prompt[i + 5:i + 6] or " "):
            tagged.append(None)
            i += 5
            continue
        else:
            text(char)
        i += 1
    for kind in "([":
        for k, b in list(open_brackets):
            if k == kind:
                factors[b] = (len(factors), FACTORS[kind])
    runs: list[list | None] = []
    for item in tagged:
        if item is None:
            runs.append(None)
            continue
        weight = 1.0
        for _, factor in sorted(factors[b] for b in item[1]):
            weight *= factor
        if runs and runs[-1] is not None and runs[-1][1] == weight:
            runs[-1][0] += item[0]
        else:
            runs.append([item[0], weight])
    return [None if r is None else (r[0], r[1]) for r in runs]


def reference_chunks(tokens: list[tuple[int, float] | None]) -> list[list[tuple[int, float]]]:
    """Split at BREAKs, then cut each part window by window: 75 tokens, or up to and including the last comma
    when it is among the window's last 20 and the token after the window is not itself a comma."""
    parts, part = [], []
    for token in tokens:
        if token is None:
            parts.append(part)
            part = []
        else:
            part.append(token)
    chunks = []
    for n, part in enumerate([*parts, part]):
        is_last = n == len(parts)
        if not part and (not is_last or not chunks):
            chunks.append([])
        while part:
            cut = min(CHUNK, len(part))
            if len(part) > CHUNK and part[CHUNK][0] != COMMA:
                commas = [j for j in range(CHUNK) if part[j][0] == COMMA]
                if commas and commas[-1] >= CHUNK - BACKTRACK:
                    cut = commas[-1] + 1
            chunks.append(part[:cut])
            part = part[cut:]
    return chunks


def reference_batch(tokenizer: ClipTokenizer, prompts: list[str], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    per_prompt = []
    for prompt in prompts:
        tokens = []
        for fragment in reference_fragments(prompt):
            tokens += [None] if fragment is None else [(t, fragment[1]) for t in tokenizer.encode(fragment[0])]
        per_prompt.append(reference_chunks(tokens))
    count = max(len(c) for c in per_prompt)
    ids, weights = [], []
    for chunks in per_prompt:
        row_ids, row_weights = [], []
        for chunk in chunks + [[]] * (count - len(chunks)):
            pad = CHUNK - len(chunk)
            row_ids += [START, *(t for t, _ in chunk), END, *[pad_id] * pad]
            row_weights += [1.0, *(w for _, w in chunk), 1.0, *[1.0] * pad]
        ids.append(row_ids)
        weights.append(row_weights)
    return np.array(ids), np.array(weights)


@pytest.mark.parametrize("pad_id", [END, 0], ids=["end_token", "zero"])
def test_chunk_ids_and_weights_match_the_web_ui_rule(tokenizer, pad_id):
    batch = tokenizer(CORPUS, pad_id=pad_id)
    ids, weights = reference_batch(tokenizer, CORPUS, pad_id)
    np.testing.assert_array_equal(batch.ids, ids)
    np.testing.assert_allclose(batch.weights, weights, rtol=1e-6)
    assert batch.chunks == tuple(len(reference_chunks_of(tokenizer, p)) for p in CORPUS)


def reference_chunks_of(tokenizer: ClipTokenizer, prompt: str) -> list:
    tokens = []
    for fragment in reference_fragments(prompt):
        tokens += [None] if fragment is None else [(t, fragment[1]) for t in tokenizer.encode(fragment[0])]
    return reference_chunks(tokens)


def test_corpus_exercises_every_rule(tokenizer):
    """The corpus reaches the cases it is meant to: comma backtracking, BREAK, four-chunk prompts, weights."""
    counts = {p: len(reference_chunks_of(tokenizer, p)) for p in CORPUS}
    assert counts[words(300)] == 4
    assert counts["x BREAK BREAK y"] == 3 and counts["last chunk BREAK"] == 1
    moved = reference_chunks_of(tokenizer, f"{words(60)}, {words(20, 'cat')}")
    assert len(moved[0]) == 61 and moved[0][-1][0] == COMMA
    kept = reference_chunks_of(tokenizer, f"{words(54)}, {words(26, 'cat')}")
    assert len(kept[0]) == CHUNK
    weighted = reference_chunks_of(tokenizer, ("a (cat:1.2), " * 30) + "end")
    assert len(weighted) >= 2 and any(abs(w - 1.2) < 1e-12 for _, w in weighted[1])
