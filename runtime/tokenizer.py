"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), read from `bpe_simple_vocab_16e6.txt.gz`.

Produces the ids of `open_clip.tokenize` (SD 2.x) and, with `pad_id=49407`, of the Hugging Face
`CLIPTokenizer` SD 1.x uses (same vocabulary, padding with the end token).

Stages: clean the text, split it into words, map each word's UTF-8 bytes to printable characters,
merge them with the ranked BPE merges, look the symbols up in the vocabulary. A prompt is first read
for emphasis (`sdrun.prompt_weights`: `(text)`, `[text]`, `(text:1.5)`, `BREAK`); its tokens are split
into chunks of context length − 2 as the AUTOMATIC1111 web UI splits them (`split_chunks`), and each
chunk is framed with start/end tokens and padded to the context length. Nothing is truncated.

Text cleaning uses `ftfy.fix_text` when ftfy is installed (`TextRepair.FTFY`, what CLIP was
trained with). Without it (`TextRepair.NONE`) prompts are not repaired: mojibake ("cafÃ©") stays,
curly quotes are not straightened ("don’t" splits as don / ’ / t instead of don / 't), Latin
ligatures and full-width characters are not expanded, control characters are kept and no NFC
normalisation happens, so such prompts can give other ids. Plain ASCII prompts are unaffected.

Word splitting follows CLIP's pattern `<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|
[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+` (case-insensitive) with the standard library's
`unicodedata`, so the `regex` package is not needed. Two consequences: characters assigned after
the Unicode version of this Python's `unicodedata` count as symbols, where a newer `regex` may see
letters or digits; and, like open_clip, the literal texts `<start_of_text>` / `<end_of_text>` in a
prompt become the special tokens.
"""
from __future__ import annotations

import dataclasses
import enum
import gzip
import html
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from sdrun.errors import MissingDependencyError, UserError
from sdrun.prompt_weights import parse_prompt
from sdrun.recipe import TokenizerPadding

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
END_OF_WORD = "</w>"
# CLIP keeps the first 49152 - 256 - 2 merges of the file (line 0 is a version header), so that
# 256 bytes + 256 bytes-with-</w> + merges + 2 specials = 49408 ids.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2
# The web UI's `comma_padding_backtrack`: a full chunk whose last comma is among its last 20 tokens ends
# after that comma, and the tokens after it start the next chunk.
COMMA_BACKTRACK = 20

_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# CLIP's pattern is case-insensitive: after lower-casing, the long s is the only character that
# case-folds onto a letter of the specials or contractions.
_CASE_FOLD = str.maketrans({"\u017f": "s"})
# U+0345 (combining ypogegrammeni) case-folds to a Greek letter, so the case-insensitive pattern
# matches it in none of its branches and skips it, like whitespace.
_SKIPPED = frozenset("\u0345")


class TextRepair(enum.Enum):
    """How prompt text is repaired before tokenizing."""

    FTFY = "ftfy"  # ftfy.fix_text, as CLIP's own tokenizer
    NONE = "none"  # no repair (see the module docstring for what differs)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedBatch:
    """Token ids ready for the text encoder: one window of the context length per prompt chunk."""

    ids: np.ndarray  # (B, chunks·context_length) int32: per chunk start, prompt tokens, end, padding
    weights: np.ndarray  # (B, chunks·context_length) float32: each token's emphasis; 1 at start, end, padding
    chunks: tuple[int, ...]  # per prompt: the chunks its text fills; the batch pads the rest with empty chunks
    warnings: tuple[str, ...] = ()  # what the prompts' emphasis syntax warns of (unbalanced brackets)

    @property
    def chunk_count(self) -> int:
        """Chunks per row of `ids` (the most any prompt of the batch fills, at least 1)."""
        return max((*self.chunks, 1))


WeightedTokens = list[tuple[int, float]]  # (token id, emphasis) in prompt order


class _CharClass(enum.Enum):
    LETTER = "letter"
    NUMBER = "number"
    SYMBOL = "symbol"
    SKIP = "skip"


def byte_alphabet() -> dict[int, str]:
    """Byte value -> printable character (GPT-2's reversible byte alphabet), in vocabulary order.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, NBSP, soft
    hyphen) take the code points 256, 257, ... in byte order.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = sorted(set(range(256)) - set(printable))
    alphabet = {byte: chr(byte) for byte in printable}
    alphabet.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return alphabet


def read_merges(path: str | Path) -> list[tuple[str, str]]:
    """The ranked BPE merges CLIP uses from a `bpe_simple_vocab_16e6.txt.gz` file."""
    path = Path(path)
    fix = f"re-export the bundle, or pass open_clip's {VOCAB_FILENAME}"
    if not path.is_file():
        raise UserError("The CLIP tokenizer vocabulary file is missing.",
                        expected=f"a gzip file {VOCAB_FILENAME}", got=str(path), fix=fix)
    try:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError("The CLIP tokenizer vocabulary file cannot be read.",
                        expected=f"a gzip file {VOCAB_FILENAME}", got=f"{path}: {error}",
                        fix=fix) from error
    merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]
    if len(merges) < NUM_MERGES or any(len(pair) != 2 for pair in merges):
        raise UserError("The CLIP tokenizer vocabulary file is not CLIP's BPE merge list.",
                        expected=f"{NUM_MERGES} lines of two symbols after a header line",
                        got=f"{path}", fix=fix)
    return merges


def load_text_fixer(repair: TextRepair | None) -> tuple[TextRepair, Callable[[str], str] | None]:
    """The repair actually used and its function; None picks FTFY when ftfy is installed."""
    if repair is TextRepair.NONE:
        return TextRepair.NONE, None
    try:
        import ftfy
    except ImportError:
        if repair is TextRepair.FTFY:
            raise MissingDependencyError("ftfy", "to repair prompts as CLIP's tokenizer does",
                                         "pip install ftfy") from None
        return TextRepair.NONE, None
    return TextRepair.FTFY, ftfy.fix_text


def clean_text(text: str, fix_text: Callable[[str], str] | None) -> str:
    """CLIP's cleaning: repair, unescape HTML twice, collapse whitespace, lower-case."""
    if fix_text is not None:
        text = fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def _char_class(char: str) -> _CharClass:
    if char.isspace() or char in _SKIPPED:
        return _CharClass.SKIP
    major = unicodedata.category(char)[0]
    if major == "L":
        return _CharClass.LETTER
    return _CharClass.NUMBER if major == "N" else _CharClass.SYMBOL


def _literal_at(text: str, start: int) -> str | None:
    """The special token or contraction CLIP's pattern matches first at `start`, if any."""
    for literal in (START_OF_TEXT, END_OF_TEXT, *_CONTRACTIONS):
        if text[start:start + len(literal)].translate(_CASE_FOLD) == literal:
            return literal
    return None


def split_words(text: str) -> list[str]:
    """Cleaned text -> words: specials, contractions, letter runs, single digits, symbol runs."""
    words, start = [], 0
    while start < len(text):
        literal = _literal_at(text, start)
        kind = _char_class(text[start])
        end = start + 1
        if literal is not None:
            end = start + len(literal)
        elif kind in (_CharClass.LETTER, _CharClass.SYMBOL):
            while end < len(text) and _char_class(text[end]) is kind:
                end += 1
        if literal is not None or kind is not _CharClass.SKIP:
            words.append(text[start:end])
        start = end
    return words


def merge_pair(symbols: list[str], first: str, second: str) -> list[str]:
    """Replace every (first, second) neighbour pair by first+second, scanning left to right."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
            merged.append(first + second)
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


class ClipTokenizer:
    """CLIP BPE tokenizer; `encode` caches each word's ids."""

    def __init__(self, merges: Sequence[tuple[str, str]], repair: TextRepair | None = None):
        byte_to_char = byte_alphabet()
        alphabet = list(byte_to_char.values())
        vocab = [*alphabet, *(char + END_OF_WORD for char in alphabet),
                 *(first + second for first, second in merges), START_OF_TEXT, END_OF_TEXT]
        self._ids = {symbol: i for i, symbol in enumerate(vocab)}
        self._ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self._to_printable = str.maketrans({chr(byte): char for byte, char in byte_to_char.items()})
        self._word_ids: dict[str, tuple[int, ...]] = {
            special: (self._ids[special],) for special in (START_OF_TEXT, END_OF_TEXT)}
        self.repair, self._fix_text = load_text_fixer(repair)
        self.start_id = self._ids[START_OF_TEXT]
        self.end_id = self._ids[END_OF_TEXT]
        self.comma_id = self._ids["," + END_OF_WORD]
        self.vocab_size = len(vocab)

    @classmethod
    def from_file(cls, path: str | Path, repair: TextRepair | None = None) -> ClipTokenizer:
        """Tokenizer from a `bpe_simple_vocab_16e6.txt.gz` file; None: ftfy repair if installed."""
        return cls(read_merges(path), repair)

    def pad_id(self, padding: TokenizerPadding) -> int:
        """The id an encoder trained with `padding` was padded with: the end token (HF CLIP) or 0 (open_clip)."""
        return self.end_id if padding is TokenizerPadding.END_TOKEN else 0

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, without start/end tokens."""
        ids: list[int] = []
        for word in split_words(clean_text(text, self._fix_text)):
            if word not in self._word_ids:
                self._word_ids[word] = self._encode_word(word)
            ids.extend(self._word_ids[word])
        return ids

    def weighted_pieces(self, prompt: str) -> tuple[list[WeightedTokens | None], tuple[str, ...]]:
        """A prompt's weighted tokens per emphasis fragment (None: a BREAK), and what its syntax warns of."""
        parsed = parse_prompt(prompt)
        pieces = [None if f is None else [(t, f.weight) for t in self.encode(f.text)] for f in parsed.fragments]
        return pieces, parsed.warnings

    def __call__(self, texts: Sequence[str], pad_id: int,
                 context_length: int = CONTEXT_LENGTH) -> TokenizedBatch:
        """(B, chunks·context_length) ids: per chunk start, prompt, end, then `pad_id` (SD1: 49407, SD2: 0)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of prompts, not one string")
        chunked, warnings = [], []
        for text in texts:
            pieces, warned = self.weighted_pieces(text)
            chunked.append(split_chunks(pieces, self.comma_id, context_length - 2))
            warnings += [w for w in warned if w not in warnings]
        return pack_chunks(chunked, self.start_id, self.end_id, pad_id, context_length, tuple(warnings))

    def _encode_word(self, word: str) -> tuple[int, ...]:
        try:
            printable = word.encode("utf-8").decode("latin-1").translate(self._to_printable)
        except UnicodeEncodeError as error:
            raise UserError("The prompt is not valid Unicode text.",
                            expected="a prompt of Unicode characters",
                            got=f"{word!r} ({error.reason})",
                            fix="remove the unprintable characters from the prompt") from None
        return tuple(self._ids[symbol] for symbol in self._bpe(printable))

    def _bpe(self, word: str) -> list[str]:
        """Apply the best-ranked merge until none applies (Sennrich et al. 2016)."""
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = zip(symbols, symbols[1:])
            rank, pair = min((self._ranks.get(pair, len(self._ranks)), pair) for pair in pairs)
            if rank == len(self._ranks):
                break
            symbols = merge_pair(symbols, *pair)
        return symbols


def split_chunks(pieces: Sequence[WeightedTokens | None], comma_id: int, length: int,
                 backtrack: int = COMMA_BACKTRACK) -> list[WeightedTokens]:
    """Weighted tokens (None: a BREAK) -> chunks of at most `length`, as the web UI splits them.

    A token that finds the chunk full starts a new one; unless that token is itself a comma, a full chunk
    whose last comma is among its last `backtrack` tokens ends after the comma, and the tokens after it
    move to the new chunk.
    BREAK ends the chunk wherever it is (an empty one too). A prompt always has at least one chunk.
    """
    chunks: list[WeightedTokens] = []
    chunk: WeightedTokens = []
    last_comma = None  # index in `chunk`
    for piece in pieces:
        if piece is None:
            chunks.append(chunk)
            chunk, last_comma = [], None
            continue
        for token, weight in piece:
            if len(chunk) == length:
                near = last_comma is not None and length - last_comma <= backtrack and token != comma_id
                cut = last_comma + 1 if near else length
                chunks.append(chunk[:cut])
                chunk, last_comma = chunk[cut:], None
            if token == comma_id:
                last_comma = len(chunk)
            chunk.append((token, weight))
    if chunk or not chunks:
        chunks.append(chunk)
    return chunks


def pack_chunks(prompts: Sequence[Sequence[WeightedTokens]], start_id: int, end_id: int, pad_id: int,
                context_length: int = CONTEXT_LENGTH, warnings: tuple[str, ...] = ()) -> TokenizedBatch:
    """Frame every chunk with start/end and pad it to `context_length`; every prompt gets as many chunks as
    the longest (empty ones: start, end, padding)."""
    if context_length < 2:
        raise ValueError(f"context_length must fit start and end tokens, got {context_length}")
    count = max((len(chunks) for chunks in prompts), default=1)
    ids = np.full((len(prompts), count, context_length), pad_id, dtype=np.int32)
    weights = np.ones((len(prompts), count, context_length), dtype=np.float32)
    for row, chunks in enumerate(prompts):
        for c, chunk in enumerate([*chunks, *[[]] * (count - len(chunks))]):
            if len(chunk) > context_length - 2:
                raise ValueError(f"a chunk of {len(chunk)} tokens does not fit {context_length} with start and end")
            ids[row, c, :len(chunk) + 2] = [start_id, *(t for t, _ in chunk), end_id]
            weights[row, c, 1:len(chunk) + 1] = [w for _, w in chunk]
    flat = (len(prompts), count * context_length)
    return TokenizedBatch(ids.reshape(flat), weights.reshape(flat),
                          tuple(len(chunks) for chunks in prompts), warnings)
