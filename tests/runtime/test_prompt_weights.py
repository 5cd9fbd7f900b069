"""Emphasis syntax as the web UI reads it, our refusal of non-numeric weights, and the mean-restoring weighting."""
from __future__ import annotations

import numpy as np
import pytest

from sdrun.errors import UserError
from sdrun.prompt_weights import Fragment, emphasize, parse_prompt


def fragments(prompt: str) -> list[tuple[str, float] | None]:
    return [None if f is None else (f.text, round(f.weight, 12)) for f in parse_prompt(prompt).fragments]


@pytest.mark.parametrize("prompt, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("a (cat)", [("a ", 1.0), ("cat", 1.1)]),
    ("((cat)) dog", [("cat", 1.21), (" dog", 1.0)]),
    ("[cat]", [("cat", round(1 / 1.1, 12))]),
    ("(cat:1.5), dog", [("cat", 1.5), (", dog", 1.0)]),
    ("(a [b] c:2)", [("a ", 2.0), ("b", round(2 / 1.1, 12)), (" c", 2.0)]),
    (r"a \(b\) \[c\] \\", [(r"a (b) [c] \ ".rstrip(), 1.0)]),
    ("x BREAK y", [("x", 1.0), None, ("y", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), None, ("b", 1.1)]),  # the weight carries into the next chunk
    ("(a) (b)", [("a", 1.1), (" ", 1.0), ("b", 1.1)]),
    ("(a)(b)", [("ab", 1.1)]),  # equal weights side by side are read as one text, as the web UI does
    ("BREAKING a:b", [("BREAKING a:b", 1.0)]),
])
def test_emphasis_syntax(prompt, expected):
    assert fragments(prompt) == expected
    assert parse_prompt(prompt).warnings == ()


@pytest.mark.parametrize("prompt, expected, warned", [
    ("a (b c", [("a ", 1.0), ("b c", 1.1)], "never closed"),
    ("a [b", [("a ", 1.0), ("b", round(1 / 1.1, 12))], "never closed"),
    ("a b) c", [("a b) c", 1.0)], "closes nothing"),
    ("a :1.5) b", [("a :1.5) b", 1.0)], "closes nothing"),
])
def test_unbalanced_brackets_are_text_with_a_warning(prompt, expected, warned):
    parsed = parse_prompt(prompt)
    assert fragments(prompt) == expected
    assert len(parsed.warnings) == 1 and warned in parsed.warnings[0]


@pytest.mark.parametrize("prompt, fragment", [
    ("a (word:abc) b", "(word:abc)"),
    ("(x:1.2.3)", "(x:1.2.3)"),
    ("(x:)", "(x:)"),
    ("(outer (inner:high))", "(inner:high)"),
])
def test_a_weight_that_is_not_a_number_is_refused_naming_the_fragment(prompt, fragment):
    with pytest.raises(UserError) as caught:
        parse_prompt(prompt)
    assert fragment in caught.value.message() and "not a number" in caught.value.message()


def test_colons_outside_brackets_and_before_the_weight_are_text():
    assert fragments("time 10:30 (a: b, c:1.3)") == [("time 10:30 ", 1.0), ("a: b, c", 1.3)]
    assert parse_prompt("").fragments == () and isinstance(parse_prompt("x").fragments[0], Fragment)


def test_emphasis_restores_each_rows_mean_and_leaves_unweighted_rows_alone():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((3, 77, 8), dtype=np.float32) + 0.5
    weights = np.ones((3, 77), np.float32)
    weights[1, 3:9] = 1.5
    weights[2, 10] = 0.5
    out = emphasize(hidden, weights)
    np.testing.assert_array_equal(out[0], hidden[0])
    for row in (1, 2):
        np.testing.assert_allclose(out[row].mean(dtype=np.float64), hidden[row].mean(dtype=np.float64), rtol=1e-5)
        scale = out[row, 0, 0] / hidden[row, 0, 0]
        np.testing.assert_allclose(out[row] / hidden[row], scale * weights[row, :, None] * np.ones(8), rtol=1e-5)
    assert out is not hidden and out.dtype == np.float32
