"""The generated shapes data and the pixel rule that judges images of it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest

from benchmarks.shapes.data import COLOURS, IMAGE_SIZE, PALETTE, PHRASINGS, SHAPES, caption, samples
from benchmarks.shapes.judge import judge
from sdrun.tokenizer import CONTEXT_LENGTH, VOCAB_FILENAME, ClipTokenizer

JUDGED_SAMPLES = 500
JUDGE_MIN_ACCURACY = 0.99  # fraction of samples whose background, colour and shape are all read right
NOISE_STD = 25.0  # RGB units of Gaussian noise the judge must see through


@pytest.fixture(scope="module")
def drawn():
    return samples(np.random.default_rng(3), JUDGED_SAMPLES)


def test_same_seed_same_samples_other_seed_other_samples():
    first, second, other = (samples(np.random.default_rng(seed), 20) for seed in (5, 5, 6))
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1:] == second[1:]
    assert not np.array_equal(first[0], other[0])


def test_images_are_uint8_rgb_of_exactly_two_palette_colours(drawn):
    images, _, labels = drawn
    assert images.shape == (JUDGED_SAMPLES, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    for image, label in zip(images[:50], labels):
        present = {tuple(p) for p in image.reshape(-1, 3)}
        assert present == {PALETTE[label.colour], PALETTE[label.background]}


def test_every_shape_colour_and_phrasing_appears_and_shape_differs_from_background(drawn):
    _, captions, labels = drawn
    assert {label.shape for label in labels} == set(SHAPES)
    assert {label.colour for label in labels} == {label.background for label in labels} == set(COLOURS)
    assert all(label.colour != label.background for label in labels)
    phrasings = {caption(label.shape, label.colour, label.background, i): i
                 for label in labels for i in range(len(PHRASINGS))}
    assert {phrasings[text] for text in captions} == set(range(len(PHRASINGS)))


def test_captions_name_what_is_drawn(drawn):
    _, captions, labels = drawn
    for text, label in zip(captions, labels):
        words = text.replace(",", "").split()
        assert label.shape in words and label.colour in words and label.background in words


def test_shape_lies_inside_the_image_with_a_background_border(drawn):
    _, _, labels = drawn
    for label in labels:
        left, top, right, bottom = label.box
        assert 0 < left <= right < IMAGE_SIZE - 1 and 0 < top <= bottom < IMAGE_SIZE - 1


def _accuracy(images, labels) -> float:
    verdicts = [judge(image) for image in images]
    right = [(v.background, v.colour, v.shape) == (l.background, l.colour, l.shape) for v, l in zip(verdicts, labels)]
    return float(np.mean(right))


def test_judge_reads_generated_samples(drawn):
    images, _, labels = drawn
    accuracy = _accuracy(images, labels)
    assert accuracy >= JUDGE_MIN_ACCURACY, f"judge right on {accuracy:.3f} of samples, needs {JUDGE_MIN_ACCURACY}"


def test_judge_reads_noisy_samples(drawn):
    images, _, labels = drawn
    noise = np.random.default_rng(4).normal(0.0, NOISE_STD, images.shape)
    noisy = np.clip(images + noise, 0, 255).astype(np.uint8)
    accuracy = _accuracy(noisy, labels)
    assert accuracy >= JUDGE_MIN_ACCURACY, f"judge right on {accuracy:.3f} of noisy samples, needs {JUDGE_MIN_ACCURACY}"


def test_judge_finds_no_shape_in_a_plain_image():
    plain = np.broadcast_to(np.array(PALETTE["green"], np.uint8), (IMAGE_SIZE, IMAGE_SIZE, 3))
    verdict = judge(plain)
    assert (verdict.background, verdict.colour, verdict.shape) == ("green", None, None)


def test_every_caption_fits_the_context_without_unknown_words():
    tokenizer = ClipTokenizer.from_file(Path(open_clip.__file__).parent / VOCAB_FILENAME)
    texts = [caption(shape, colour, background, i) for shape in SHAPES for colour in COLOURS
             for background in COLOURS if background != colour for i in range(len(PHRASINGS))]
    batch = tokenizer(texts, tokenizer.end_id)
    assert batch.chunks == (1,) * len(texts) and (batch.weights == 1).all()
    lengths = [len(tokenizer.encode(text)) + 2 for text in texts]
    assert max(lengths) <= CONTEXT_LENGTH
    for word in (*SHAPES, *COLOURS):
        assert len(tokenizer.encode(word)) == 1, f"{word!r} is more than one token"

