"""Character vocabulary, CTC labels, greedy CTC decoding and WER/CER for speech fine-tuning.

Host-side NumPy (data workers and the eval loop); nothing here runs under ``jit``.

Vocabulary layout follows fairseq's letter dictionary (fairseq-spec §9.1): ``<s>`` = 0 (the CTC
blank), ``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3, then the word separator ``|`` and the letters
of the training transcripts by descending count (ties alphabetical, so the order is a pure
function of the transcripts). A transcript ``HELLO WORLD`` becomes the units
``H E L L O | W O R L D |`` (fairseq ``.ltr``: a separator after every word).

Error rates use ``jiwer`` (the field's reference implementation of word/character edit
distances). CER counts characters including the single spaces between words, which matches
fairseq's unit error rate over letters and ``|`` separators up to the trailing separator.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, Sequence

import jiwer
import numpy as np

__all__ = ["BLANK", "PAD", "EOS", "UNK", "SPECIALS", "WORD_SEP", "Vocabulary", "normalize_text",
           "text_units", "ctc_collapse", "greedy_decode", "ErrorRates", "error_rates"]

BLANK, PAD, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
WORD_SEP = "|"


def normalize_text(text: str) -> str:
  """Upper-case, single spaces, no leading/trailing space: the form transcripts and hypotheses
  are compared in (LibriSpeech transcripts are upper case already)."""
  return " ".join(text.upper().split())


def text_units(text: str) -> list[str]:
  """Letter units of a word transcript: every character of every word, then ``|``."""
  units = []
  for word in normalize_text(text).split(" "):
    if word:
      units.extend(word)
      units.append(WORD_SEP)
  return units


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Immutable token list; index = id. Picklable (shipped to grain workers)."""
  tokens: tuple[str, ...]

  def __post_init__(self):
    if tuple(self.tokens[:len(SPECIALS)]) != SPECIALS:
      raise ValueError(f"vocabulary must start with {SPECIALS}, got {self.tokens[:4]}")
    if len(set(self.tokens)) != len(self.tokens):
      raise ValueError("vocabulary has duplicate tokens")

  @classmethod
  def build(cls, transcripts: Iterable[str | None]) -> "Vocabulary":
    """Letters of ``transcripts`` (None entries ignored), most frequent first, after the specials
    and ``|``."""
    counts: collections.Counter = collections.Counter()
    for t in transcripts:
      if t:
        counts.update(u for u in text_units(t) if u != WORD_SEP)
    letters = sorted(counts, key=lambda c: (-counts[c], c))
    return cls(SPECIALS + (WORD_SEP,) + tuple(letters))

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def index(self) -> dict[str, int]:
    return {t: i for i, t in enumerate(self.tokens)}

  def encode(self, text: str) -> np.ndarray:
    """int32 ``[L]`` label ids of a word transcript; unknown characters map to ``<unk>``."""
    index = self.index
    return np.asarray([index.get(u, UNK) for u in text_units(text)], np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of a collapsed id sequence: letters joined, ``|`` → space, special ids dropped (an
    ``<unk>`` in a hypothesis can only be wrong, so dropping it counts it as one deletion)."""
    chars = [self.tokens[int(i)] for i in ids if int(i) >= len(SPECIALS)]
    return normalize_text("".join(" " if c == WORD_SEP else c for c in chars))

  def to_fairseq_dict(self) -> str:
    """fairseq ``dict.ltr.txt`` text (non-special tokens, one ``token count`` line each; the
    count column is informational)."""
    return "".join(f"{t} 1\n" for t in self.tokens[len(SPECIALS):])


def ctc_collapse(ids: Sequence[int], blank: int = BLANK) -> list[int]:
  """Best-path post-processing: merge runs of the same id, then remove blanks
  (``a a <b> a b b`` → ``a a b``)."""
  out, prev = [], None
  for i in (int(x) for x in ids):
    if i != prev and i != blank:
      out.append(i)
    prev = i
  return out


def greedy_decode(frame_ids: np.ndarray, lengths: np.ndarray, vocab: Vocabulary) -> list[str]:
  """Greedy (best-path) CTC decoding of a batch.

  Args:
    frame_ids: int ``[B, T]`` argmax class per frame.
    lengths: int ``[B]`` valid frames per row (padded frames are ignored).
    vocab: the fine-tuning vocabulary.
  Returns:
    ``B`` hypothesis strings (normalised; empty when every frame is blank).
  """
  frame_ids = np.asarray(frame_ids)
  return [vocab.decode(ctc_collapse(frame_ids[b, :int(n)]))
          for b, n in enumerate(np.asarray(lengths))]


@dataclasses.dataclass(frozen=True)
class ErrorRates:
  """Corpus-level error rates with their counts (so several sets can be summed exactly).

  ``wer = word_errors / ref_words``; ``cer = char_errors / ref_chars`` (spaces count as
  characters).
  """
  wer: float
  cer: float
  word_errors: int
  ref_words: int
  char_errors: int
  ref_chars: int
  utterances: int


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> ErrorRates:
  """Corpus WER and CER (jiwer) of normalised references vs hypotheses, summed over utterances.

  References must be non-empty (fine-tuning filters empty transcripts); hypotheses may be empty.
  """
  if len(references) != len(hypotheses):
    raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
  refs = [normalize_text(r) for r in references]
  hyps = [normalize_text(h) for h in hypotheses]
  if not refs:
    return ErrorRates(float("nan"), float("nan"), 0, 0, 0, 0, 0)
  if any(not r for r in refs):
    raise ValueError("error_rates: empty reference transcript")
  words = jiwer.process_words(refs, hyps)
  chars = jiwer.process_characters(refs, hyps)
  w_err = words.substitutions + words.deletions + words.insertions
  c_err = chars.substitutions + chars.deletions + chars.insertions
  n_words = words.substitutions + words.deletions + words.hits
  n_chars = chars.substitutions + chars.deletions + chars.hits
  return ErrorRates(wer=w_err / n_words, cer=c_err / n_chars, word_errors=int(w_err),
                    ref_words=int(n_words), char_errors=int(c_err), ref_chars=int(n_chars),
                    utterances=len(refs))
