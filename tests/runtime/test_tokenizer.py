"""CLIP tokenizer: parity with open_clip (SD2) and transformers' CLIPTokenizer (SD1 padding), framing and chunks."""
from __future__ import annotations

import gzip
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import open_clip
import pytest

from sdrun.errors import MissingDependencyError, UserError
from sdrun.tokenizer import (CONTEXT_LENGTH, VOCAB_FILENAME, VOCAB_SIZE, ClipTokenizer, TextRepair,
                             byte_alphabet, clean_text, pack_chunks, read_merges, split_words)


START, END = 49406, 49407
SD1_PAD, SD2_PAD = END, 0

CORPUS = [
    "a photograph of an astronaut riding a horse",
    "A Painting, by Greg Rutkowski; trending on ArtStation!!! (masterpiece) [sharp] {4k} #art",
    "café naïve façade Ångström crème brûlée",
    "cafe\u0301 with a combining accent",
    "東京の夜景, 北京烤鸭, 서울",
    "Москва зимой, Αθήνα, القاهرة, मुंबई",
    "a cat 🐱 on a rocket 🚀 👩‍👩‍👧 🇯🇵",
    "salt &amp; pepper, it&#39;s &lt;b&gt; &amp;amp;",
    "  multiple   spaces\n\nand\tnewlines \r\n  ",
    "",
    "   ",
    "numbers 3.14159 1,000,000 2024-01-01 x² ½ Ⅻ",
    "don't stop, it's fine, we're here, they've gone, I'm ok, we'll see, he'd go",
    "DON'T SHOUT IT'S LOUD",
    "don’t curly quotes ‘single’ “double”",
    "mojibake cafÃ© naÃ¯ve",
    "ﬁne ligature, ＦＵＬＬ width",
    "snake_case-and-kebab-case, e-mail: someone@example.com",
    "literal <start_of_text> and <END_OF_TEXT> markers",
    "long s: 'ſ Greek ypogegrammeni \u0345 alone",
    "zero\u200bwidth space",
    "word " * 120,
    "supercalifragilisticexpialidocious " * 30,
]


@pytest.fixture(scope="module")
def vocab_path() -> Path:
    return Path(open_clip.__file__).parent / VOCAB_FILENAME


@pytest.fixture(scope="module")
def tokenizer(vocab_path) -> ClipTokenizer:
    import ftfy  # noqa: F401 - the default repair, as in CLIP's own tokenizer; never a silent fallback
    return ClipTokenizer.from_file(vocab_path)


def open_clip_ids(texts: list[str]) -> np.ndarray:
    return open_clip.tokenize(texts, context_length=CONTEXT_LENGTH).numpy()


def one_window(tokenizer: ClipTokenizer, texts: list[str], pad_id: int) -> np.ndarray:
    """open_clip's framing of our BPE ids: start, tokens cut to 75, end, padding (no emphasis, one window)."""
    ids = np.full((len(texts), CONTEXT_LENGTH), pad_id, dtype=np.int32)
    for row, text in enumerate(texts):
        framed = [START, *tokenizer.encode(text)[:CONTEXT_LENGTH - 2], END]
        ids[row, :len(framed)] = framed
    return ids


def zeros_after_end_to_end(ids: np.ndarray) -> np.ndarray:
    """open_clip ids with the padding after the end token set to the end token (SD1 padding)."""
    padded = ids.copy()
    for row in padded:
        end = int(np.flatnonzero(row == END)[-1])
        row[end + 1:] = END
    return padded


def test_vocabulary_layout(tokenizer):
    assert tokenizer.vocab_size == VOCAB_SIZE == 49408
    assert (tokenizer.start_id, tokenizer.end_id) == (START, END)
    assert len(byte_alphabet()) == 256 == len(set(byte_alphabet().values()))
    assert tokenizer.encode("!") == [256]  # "!" is byte 33, the first printable byte, with </w>


def test_matches_open_clip_with_zero_padding(tokenizer):
    np.testing.assert_array_equal(one_window(tokenizer, CORPUS, SD2_PAD), open_clip_ids(CORPUS))


def test_end_token_padding_matches_open_clip_with_padding_replaced(tokenizer):
    np.testing.assert_array_equal(one_window(tokenizer, CORPUS, SD1_PAD), zeros_after_end_to_end(open_clip_ids(CORPUS)))


def test_plain_short_prompts_are_one_window(tokenizer):
    """A prompt of at most 75 tokens without emphasis syntax gives the ids it gave before chunking existed."""
    texts = [t for t in CORPUS if len(tokenizer.encode(t)) <= CONTEXT_LENGTH - 2 and not set(t) & set("()[]\\")]
    for pad_id in (SD1_PAD, SD2_PAD):
        batch = tokenizer(texts, pad_id=pad_id)
        assert batch.ids.dtype == np.int32 and batch.chunks == (1,) * len(texts)
        np.testing.assert_array_equal(batch.ids, one_window(tokenizer, texts, pad_id))
        assert (batch.weights == 1).all()


def test_end_token_padding_matches_transformers_clip_tokenizer(tokenizer, vocab_path):
    """transformers' tokenizer (SD1) has no ftfy/HTML step: compare on text those leave alone."""
    import transformers
    merges = read_merges(vocab_path)
    alphabet = list(byte_alphabet().values())
    symbols = [*alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in merges),
               "<|startoftext|>", "<|endoftext|>"]
    reference = transformers.CLIPTokenizer(vocab={s: i for i, s in enumerate(symbols)},
                                           merges=list(merges))
    texts = [t for t in CORPUS if "&" not in t and "<" not in t and t.isascii()]
    texts += ["café naïve", "東京の夜景", "a cat 🐱 on a rocket 🚀"]
    expected = reference(texts, padding="max_length", max_length=CONTEXT_LENGTH,
                         truncation=True)["input_ids"]
    np.testing.assert_array_equal(one_window(tokenizer, texts, SD1_PAD), np.array(expected))


def test_long_prompts_fill_chunks_and_nothing_is_cut(tokenizer):
    # "word" is one token, so n words give n tokens; 75 fit between start and end.
    texts = ["word " * 75, "word " * 76, "word " * 120, "a cat"]
    batch = tokenizer(texts, pad_id=SD2_PAD)
    assert batch.chunks == (1, 2, 2, 1) and batch.chunk_count == 2
    windows = batch.ids.reshape(len(texts), 2, CONTEXT_LENGTH)
    assert [(row[:, 1:-1] == 2653).sum() for row in windows] == [75, 76, 120, 0]  # 2653: "word</w>"
    np.testing.assert_array_equal(windows[:, 0], open_clip_ids(texts))
    np.testing.assert_array_equal(windows[3, 1], one_window(tokenizer, [""], SD2_PAD)[0])  # an empty chunk


def test_encode_has_no_special_tokens(tokenizer):
    assert tokenizer.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tokenizer.encode("") == []


def test_empty_batch_and_context_length(tokenizer):
    assert tokenizer([], pad_id=0).ids.shape == (0, CONTEXT_LENGTH)
    short = tokenizer(["a photo of a cat"], pad_id=0, context_length=4)
    np.testing.assert_array_equal(short.ids, [[START, 320, 1125, END, START, 539, 320, END, START, 2368, END, 0]])
    assert short.chunks == (3,)


def test_pack_chunks_frames_pads_and_fills_missing_chunks():
    batch = pack_chunks([[[(5, 1.0), (6, 1.5)]], [[(8, 1.0)], [(7, 0.5)]]], start_id=1, end_id=2, pad_id=9,
                        context_length=4)
    np.testing.assert_array_equal(batch.ids, [[1, 5, 6, 2, 1, 2, 9, 9], [1, 8, 2, 9, 1, 7, 2, 9]])
    np.testing.assert_array_equal(batch.weights, [[1, 1, 1.5, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0.5, 1, 1]])
    assert batch.chunks == (1, 2)


def test_single_string_is_rejected(tokenizer):
    with pytest.raises(TypeError):
        tokenizer("a cat", pad_id=0)


def test_split_words_matches_clip_pattern_on_every_code_point():
    """One string of every code point this Python's Unicode database assigns, cleaned."""
    import regex
    pattern = regex.compile(r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|"
                            r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
    chars = (chr(c) for c in range(sys.maxunicode + 1))
    text = clean_text("".join(c for c in chars if unicodedata.category(c) not in ("Cn", "Cs")),
                      fix_text=None)
    text += " 'ſ 'ſt <ſtart_of_text> x'll'd a\u0345b 1'2"
    assert split_words(text) == pattern.findall(text)


def test_literal_markers_become_special_tokens(tokenizer):
    assert tokenizer.encode("<end_of_text>") == [END]
    assert tokenizer.encode("a<START_OF_TEXT>") == [320, START]


def test_no_repair_leaves_plain_text_unchanged_and_skips_ftfy(vocab_path, tokenizer):
    plain = ClipTokenizer.from_file(vocab_path, repair=TextRepair.NONE)
    assert plain.repair is TextRepair.NONE
    ascii_texts = [t for t in CORPUS if t.isascii()]
    np.testing.assert_array_equal(plain(ascii_texts, pad_id=0).ids,
                                  tokenizer(ascii_texts, pad_id=0).ids)
    assert plain.encode("don’t") != tokenizer.encode("don’t") == tokenizer.encode("don't")


def test_default_repair_falls_back_without_ftfy(vocab_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ftfy", None)  # makes `import ftfy` fail
    assert ClipTokenizer.from_file(vocab_path).repair is TextRepair.NONE
    with pytest.raises(MissingDependencyError, match="ftfy"):
        ClipTokenizer.from_file(vocab_path, repair=TextRepair.FTFY)


def test_missing_vocabulary_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="missing"):
        ClipTokenizer.from_file(tmp_path / VOCAB_FILENAME)


@pytest.mark.parametrize("content", [b"not gzip", gzip.compress(b"#version: 0.2\ni n\n")])
def test_unreadable_vocabulary_file_is_a_user_error(tmp_path, content):
    path = tmp_path / VOCAB_FILENAME
    path.write_bytes(content)
    with pytest.raises(UserError) as error:
        ClipTokenizer.from_file(path)
    assert error.value.fix is not None


def test_lone_surrogate_is_a_user_error(vocab_path):
    plain = ClipTokenizer.from_file(vocab_path, repair=TextRepair.NONE)
    with pytest.raises(UserError, match="Unicode"):
        plain.encode("bad \udc80 byte")


def test_module_imports_neither_torch_nor_sdcompile():
    code = ("import sys, sdrun.tokenizer; "
            "assert not {'torch', 'sdcompile', 'regex'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
