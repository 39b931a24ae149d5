r"""Byte-level BPE tokenizers (Hugging Face ``tokenizers`` JSON) with fairseq's dictionary layout.

RoBERTa and data2vec text use GPT-2's byte-level BPE behind a fairseq dictionary whose first four
entries are ``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3 and whose last entry is the
``<mask>`` symbol added by the masked-LM task (fairseq-spec §4.2; vocabulary 50,265 for RoBERTa).
Every tokenizer used here must have exactly that layout: the text frontend's learned positions
start at ``padding_idx + 1`` = 2 (spec §4.2), and the maskers find ``<mask>`` at ``vocab_size - 1``
without reading the tokenizer. ``TextTokenizer`` checks the layout on load.

Three ways to get one:

* the embedded default (``load()`` / ``load('')``): a 4,096-entry BPE trained on the standard
  library's ``pydoc_data.topics`` text, shipped as ``d2vjax/data/embedded/text/tokenizer.json``
  (provenance and the regeneration command in ``PROVENANCE.md`` beside it);
* the RoBERTa vocabulary, from its ``vocab.json`` + ``merges.txt`` (the files fairseq and Hugging
  Face distribute; HF's ``vocab.json`` already uses fairseq's ids)::

    python -m d2vjax.data.tokenizer --vocab=vocab.json --merges=merges.txt --out=roberta.json

  or directly a RoBERTa ``tokenizer.json`` saved by Hugging Face (same layout, 50,265 entries);
* a new BPE trained on your text files (fairseq format: one sentence or paragraph per line)::

    python -m d2vjax.data.tokenizer --files=a.txt,b.txt --vocab_size=32768 --out=tok.json

Ids never include BOS/EOS: the data pipeline adds them where fairseq does (``d2vjax/data/text.py``).
Special-token strings inside the text (a literal ``"<mask>"``) are encoded as ordinary bytes, as
GPT-2's BPE does in fairseq, so raw text can never inject control tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["BOS", "PAD", "EOS", "UNK", "MASK", "BOS_ID", "PAD_ID", "EOS_ID", "UNK_ID",
           "EMBEDDED_PATH", "EMBEDDED_VOCAB_SIZE", "TextTokenizer", "special_ids", "load",
           "train_bpe", "from_vocab_merges", "embedded_training_text"]

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
# fairseq Dictionary order (spec §4.2): the four specials first, <mask> appended last.
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_LEADING = (BOS, PAD, EOS, UNK)

EMBEDDED_PATH = pathlib.Path(__file__).resolve().parent / "embedded" / "text" / "tokenizer.json"
# Size of the shipped tokenizer (model.vocab_size of the :cpu/:test presets; checked by a test).
EMBEDDED_VOCAB_SIZE = 4096


def special_ids(vocab_size: int) -> tuple[int, ...]:
  """Ids of ``<s>``, ``<pad>``, ``</s>``, ``<unk>``, ``<mask>`` for a vocabulary of ``vocab_size``
  entries in fairseq's layout (``<mask>`` = ``vocab_size - 1``)."""
  return (BOS_ID, PAD_ID, EOS_ID, UNK_ID, int(vocab_size) - 1)


class TextTokenizer:
  """A ``tokenizers.Tokenizer`` checked for fairseq's layout; picklable (grain workers).

  Attributes:
    vocab_size: number of ids, ``<mask>`` included.
    mask_id: ``vocab_size - 1``.
    path: the file it was loaded from ('' when built in memory).
  """

  def __init__(self, tok: Tokenizer, path: str = ""):
    self._tok = tok
    # Literal "<mask>" / "</s>" in the text must stay text (fairseq's GPT-2 BPE never sees ids).
    self._tok.encode_special_tokens = True
    self.path = os.fspath(path)
    self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
    self.mask_id = self.vocab_size - 1
    want = dict(zip(_LEADING, (BOS_ID, PAD_ID, EOS_ID, UNK_ID)))
    want[MASK] = self.mask_id
    got = {name: tok.token_to_id(name) for name in want}
    if got != want:
      raise ValueError(
          f"tokenizer {self.path or '(in memory)'}: special ids {got} do not follow fairseq's "
          f"dictionary layout {want} (<s>,<pad>,</s>,<unk> = 0..3, <mask> last); build it with "
          "`python -m d2vjax.data.tokenizer` (see d2vjax/data/tokenizer.py)")

  @property
  def special_ids(self) -> tuple[int, ...]:
    """``(bos, pad, eos, unk, mask)`` ids."""
    return special_ids(self.vocab_size)

  @property
  def vocab_sha256(self) -> str:
    """sha256 of the token → id map: identifies the ids a prepared corpus was written with
    (independent of the JSON formatting of the ``tokenizers`` version that saved it)."""
    vocab = self._tok.get_vocab(with_added_tokens=True)
    return hashlib.sha256(json.dumps(vocab, sort_keys=True).encode("utf-8")).hexdigest()

  def encode(self, text: str) -> np.ndarray:
    """BPE ids of ``text`` (no BOS/EOS), int32 ``[N]``."""
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """``encode`` over many texts at once (parallel inside ``tokenizers``)."""
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encs]

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    """Text of ``ids`` (bytes re-assembled by the byte-level decoder)."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def id_to_token(self, i: int) -> str | None:
    return self._tok.id_to_token(int(i))

  def save(self, path) -> str:
    """Writes the ``tokenizers`` JSON to ``path``; returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._tok.save(path, pretty=False)
    return path

  def __getstate__(self):
    return {"json": self._tok.to_str(), "path": self.path}

  def __setstate__(self, state):
    self.__init__(Tokenizer.from_str(state["json"]), state["path"])


def load(path: str | os.PathLike | None = None) -> TextTokenizer:
  """The tokenizer stored at ``path`` (a ``tokenizers`` JSON); None or '' → the embedded one.

  Raises:
    FileNotFoundError: naming the path when it does not exist.
    ValueError: the special tokens do not follow fairseq's layout.
  """
  path = os.fspath(path) if path else str(EMBEDDED_PATH)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file not found: {path!r}")
  return TextTokenizer(Tokenizer.from_file(path), path)


def _byte_level(tok: Tokenizer) -> Tokenizer:
  # GPT-2 / RoBERTa: no prefix space, bytes mapped to printable unicode (fairseq's gpt2 bpe).
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  return tok


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> TextTokenizer:
  """Trains a byte-level BPE of at most ``vocab_size`` ids (``<mask>`` included) on ``texts``.

  The 256 byte symbols are always in the alphabet, so nothing is ever ``<unk>``. A small corpus may
  run out of merges that occur ``min_frequency`` times before reaching ``vocab_size``; the result is
  then smaller (check ``vocab_size`` of the returned tokenizer).
  """
  if vocab_size < 256 + len(_LEADING) + 1:
    raise ValueError(f"vocab_size={vocab_size} cannot hold the 256 byte symbols and 5 specials")
  tok = _byte_level(Tokenizer(models.BPE()))
  trainer = trainers.BpeTrainer(
      vocab_size=int(vocab_size) - 1, min_frequency=int(min_frequency), show_progress=False,
      special_tokens=list(_LEADING), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  # Appended after training so <mask> is the last id, as fairseq's masked-LM task adds it.
  tok.add_special_tokens([MASK])
  return TextTokenizer(tok)


def from_vocab_merges(vocab_json, merges_txt) -> TextTokenizer:
  """A byte-level BPE from GPT-2/RoBERTa-style ``vocab.json`` + ``merges.txt`` files.

  RoBERTa's files already hold ``<s>``, ``<pad>``, ``</s>``, ``<unk>`` at 0..3 and ``<mask>`` last;
  they are registered as special tokens here (their ids do not change).
  """
  for p in (vocab_json, merges_txt):
    if not os.path.isfile(p):
      raise FileNotFoundError(f"tokenizer source file not found: {os.fspath(p)!r}")
  tok = _byte_level(Tokenizer(models.BPE.from_file(os.fspath(vocab_json), os.fspath(merges_txt))))
  tok.add_special_tokens(list(_LEADING) + [MASK])
  return TextTokenizer(tok)


def embedded_training_text() -> list[str]:
  """The text the embedded tokenizer was trained on: every paragraph of every
  ``pydoc_data.topics`` topic (all splits; see ``d2vjax.data.text.pydoc_documents``)."""
  from d2vjax.data import text  # pylint: disable=g-import-not-at-top
  return [s for doc in text.pydoc_documents(None) for s in doc.sentences]


def _cli() -> None:
  """Command line; flags are defined here so importing this module defines none."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  files = flags.DEFINE_list("files", [], "Text files to train on (one sentence/paragraph a line).")
  embedded = flags.DEFINE_bool("embedded", False,
                               "Train on the embedded pydoc_data.topics corpus instead of files.")
  vocab_size = flags.DEFINE_integer("vocab_size", 32768, "Ids in the result, <mask> included.")
  min_frequency = flags.DEFINE_integer("min_frequency", 2, "Minimum pair count for a merge.")
  vocab = flags.DEFINE_string("vocab", None, "GPT-2/RoBERTa vocab.json (convert, no training).")
  merges = flags.DEFINE_string("merges", None, "GPT-2/RoBERTa merges.txt (with --vocab).")
  out = flags.DEFINE_string("out", None, "Output tokenizer JSON.")

  def main(argv):
    del argv
    if not out.value:
      raise app.UsageError("--out is required")
    if vocab.value or merges.value:
      if not (vocab.value and merges.value):
        raise app.UsageError("--vocab and --merges go together")
      tok = from_vocab_merges(vocab.value, merges.value)
    elif embedded.value:
      tok = train_bpe(embedded_training_text(), vocab_size.value,
                      min_frequency=min_frequency.value)
    elif files.value:
      from d2vjax.data import text  # pylint: disable=g-import-not-at-top
      docs, counts = text.read_text_files(files.value)
      tok = train_bpe((s for d in docs for s in d.sentences), vocab_size.value,
                      min_frequency=min_frequency.value)
      if counts:
        print(f"skipped while reading: {counts}")
    else:
      raise app.UsageError("give --files, --embedded, or --vocab with --merges")
    tok.save(out.value)
    print(f"wrote {out.value}: vocab_size={tok.vocab_size} mask_id={tok.mask_id} "
          f"vocab_sha256={tok.vocab_sha256[:16]}")

  app.run(main)


if __name__ == "__main__":
  _cli()
