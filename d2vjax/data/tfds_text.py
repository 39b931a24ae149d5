r"""A TensorFlow-free tfds builder that turns local text files into pre-training blocks.

Prepare once, offline (tokenizing a large corpus at every start would cost minutes)::

  from d2vjax.data import tfds_text
  tfds_text.prepare("/data/wiki_books", "/data/tfds", tokenizer="/data/roberta.json",
                    tokens_per_sample=512, split_files={"train": ["train/*.txt"],
                                                        "valid": ["valid.txt"]})

then train with ``--config.data.source=tfds --config.data.tfds_data_dir=/data/tfds``, or read the
records directly with random access and no TensorFlow::

  ds = tfds.data_source("d2v_text_files", data_dir="/data/tfds", split="train")
  ds[0]  # {'tokens': int32[N], 'num_tokens': N, 'doc': b'train/a.txt:1'}

Input files follow ``d2vjax/data/text.py`` (one sentence or paragraph per line; ``doc_mode=
'blank_line'`` ends a document at a blank line and at the end of a file, ``'file'`` makes each
file one document). One record is one fairseq ``complete_doc`` block WITHOUT its leading ``<s>``
(the pipeline prepends it): whole lines, each followed by ``</s>``, at most ``tokens_per_sample -
1`` ids, never across documents. Records are therefore tied to a tokenizer and a block length;
both are stored in ``d2vjax_index/meta.json`` and checked when the data is listed.

Features: ``tokens`` int32 ``[N]`` (zlib-compressed ``tfds.features.Tensor``), ``num_tokens``
int64, ``doc`` text (``file:first_line`` of the document; the hash split uses it).
What works without TF (tfds 4.9.10) is summarised in ``tfds_speech.py``; the same rules apply.
"""

from __future__ import annotations

import collections
import inspect
import json
import os
import threading
from typing import Mapping, Sequence

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from d2vjax.data import text as text_lib
from d2vjax.data import tokenizer as tokenizer_lib
from d2vjax.data.tfds_speech import _hash_unit

__all__ = ["NAME", "D2vTextFiles", "prepare", "list_blocks", "TfdsBlocks"]

NAME = "d2v_text_files"
_INDEX_DIR = "d2vjax_index"  # per-split lengths + meta.json, written beside the records


class D2vTextFiles(tfds.core.GeneratorBasedBuilder):
  """Token blocks from the text files under ``manual_dir``.

  Builder arguments (beyond tfds' ``data_dir``/``file_format``/...):
    tokenizer: tokenizers JSON path ('' = the embedded BPE).
    tokens_per_sample: block length with ``<s>`` (fairseq task.tokens_per_sample, 512).
    split_files: ``{split: [path or glob relative to manual_dir, ...]}`` (a str is one item).
      None: every ``*.txt`` under ``manual_dir``, documents split into ``train``/``valid`` by a
      hash of their key (``valid_fraction`` of the documents go to valid).
    valid_fraction: share of documents in the hash ``valid`` split.
    doc_mode: 'blank_line' or 'file'.

  Skipped input (``invalid_utf8`` / ``empty_line`` / ``empty_file`` lines or files,
  ``long_sentence_split``) is counted in ``bad_counts``.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "complete_doc blocks of BPE ids, array_record, TF-free."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Point manual_dir at a folder of UTF-8 .txt files: one sentence or paragraph per line, "
      "documents separated by blank lines.")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # As in tfds_speech: tfds' default probes an optional backport for builders inside packages.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, tokenizer: str = "", tokens_per_sample: int = 512,
               split_files: Mapping[str, str | Sequence[str]] | None = None,
               valid_fraction: float = 0.05, doc_mode: str = "blank_line", **kwargs):
    self._tok = tokenizer_lib.load(tokenizer or None)
    self._tokens_per_sample = int(tokens_per_sample)
    self._split_files = split_files
    self._valid_fraction = float(valid_fraction)
    self._doc_mode = doc_mode
    self.bad_counts: collections.Counter = collections.Counter()
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="fairseq complete_doc blocks of byte-level BPE ids, for d2vjax text.",
        features=tfds.features.FeaturesDict({
            "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32,
                                           encoding=tfds.features.Encoding.ZLIB),
            "num_tokens": np.int64,
            "doc": tfds.features.Text(),
        }),
        # Generation order is kept, so record i is the i-th block and matches the index.
        disable_shuffling=True,
    )

  def _read(self, root: str, items) -> list[text_lib.Document]:
    items = [items] if isinstance(items, str) else list(items)
    paths = text_lib.expand_paths([os.path.join(root, i) for i in items])
    docs = []
    for path in paths:
      with open(path, "rb") as f:
        docs += text_lib.parse_lines(f.read().splitlines(), source=os.path.relpath(path, root),
                                     doc_mode=self._doc_mode, counts=self.bad_counts)
    return docs

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    if self._split_files is None:
      paths = sorted(os.path.relpath(os.path.join(d, f), root)
                     for d, _, files in os.walk(root) for f in files if f.endswith(".txt"))
      docs = self._read(root, paths)
      by_split = collections.defaultdict(list)
      for doc in docs:
        by_split["valid" if _hash_unit(doc.key) < self._valid_fraction else "train"].append(doc)
      return {name: self._generate_examples(d) for name, d in sorted(by_split.items())}
    return {name: self._generate_examples(self._read(root, items))
            for name, items in self._split_files.items()}

  def _generate_examples(self, docs):
    # Tokenized a few hundred documents at a time: parallel inside `tokenizers`, bounded memory.
    for lo in range(0, len(docs), 256):
      chunk = docs[lo:lo + 256]
      store, counts = text_lib.blocks_from_documents(self._tok, chunk, self._tokens_per_sample)
      self.bad_counts.update(counts)
      for i in range(len(store)):
        ids = store.block_tokens(i)
        doc = chunk[int(store.blocks[i, 0])].key
        yield store.key(i), {"tokens": ids, "num_tokens": int(ids.size), "doc": doc}


def _index_dir(builder) -> str:
  return os.path.join(os.fspath(builder.data_dir), _INDEX_DIR)


def prepare(manual_dir, data_dir, *, tokenizer: str = "", tokens_per_sample: int = 512,
            split_files=None, valid_fraction: float = 0.05, doc_mode: str = "blank_line") -> dict:
  """Builds the array_record dataset from the text files in ``manual_dir`` (no TensorFlow) and a
  per-split index of block lengths, so ``list_blocks`` reads no record at start-up.

  Returns:
    ``{"dir": dataset version dir, "splits": {name: num_blocks}, "bad": {reason: count}}``.
  """
  manual_dir = os.fspath(manual_dir)
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"manual_dir not found: {manual_dir!r}")
  builder = D2vTextFiles(data_dir=os.fspath(data_dir), file_format="array_record",
                         tokenizer=tokenizer, tokens_per_sample=tokens_per_sample,
                         split_files=split_files, valid_fraction=valid_fraction,
                         doc_mode=doc_mode)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  index = _index_dir(builder)
  os.makedirs(index, exist_ok=True)
  splits = {}
  for name in builder.info.splits:
    lengths = _scan_lengths(builder.name, name, os.fspath(data_dir))
    np.save(os.path.join(index, f"{name}.npy"), lengths)
    splits[name] = int(lengths.size)
  meta = {"tokenizer_vocab_sha256": builder._tok.vocab_sha256,  # pylint: disable=protected-access
          "vocab_size": builder._tok.vocab_size,  # pylint: disable=protected-access
          "tokens_per_sample": int(tokens_per_sample), "doc_mode": doc_mode,
          "bad": dict(builder.bad_counts)}
  with open(os.path.join(index, "meta.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)
  return {"dir": os.fspath(builder.data_dir), "splits": splits, "bad": dict(builder.bad_counts)}


def _scan_lengths(name: str, split: str, data_dir) -> np.ndarray:
  ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                        decoders={"tokens": tfds.decode.SkipDecoding()})
  return np.asarray([int(ds[i]["num_tokens"]) for i in range(len(ds))], np.int64)


_SOURCES: dict = {}
_SOURCES_LOCK = threading.Lock()


def _data_source(name: str, split: str, data_dir):
  # One open data source per (process, dataset, split): grain workers each open their own.
  key = (name, split, data_dir, os.getpid())
  with _SOURCES_LOCK:
    if key not in _SOURCES:
      _SOURCES[key] = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    return _SOURCES[key]


class TfdsBlocks:
  """The block protocol of ``text.InMemoryBlocks`` over a prepared split (records read lazily,
  per process; picklable for grain workers)."""

  def __init__(self, name: str, split: str, data_dir, num_tokens: np.ndarray):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.num_tokens = np.asarray(num_tokens, np.int64)

  def __len__(self) -> int:
    return int(self.num_tokens.size)

  @property
  def lengths(self) -> np.ndarray:
    return self.num_tokens + 1  # <s> is prepended by the pipeline

  def _record(self, i: int) -> dict:
    try:
      return _data_source(self.name, self.split, self.data_dir)[int(i)]
    except Exception as e:  # array_record / decoding errors come in several types
      raise text_lib.BadRecordError(f"{self.name}/{self.split}[{i}]", "unreadable",
                                    str(e)) from None

  def block_tokens(self, i: int) -> np.ndarray:
    ids = np.asarray(self._record(i)["tokens"], np.int32)
    if ids.size != self.num_tokens[i]:
      raise text_lib.BadRecordError(f"{self.name}/{self.split}[{i}]", "unreadable",
                                    f"{ids.size} ids, index says {int(self.num_tokens[i])}")
    return ids

  def key(self, i: int) -> str:
    return f"{self.name}/{self.split}[{int(i)}]"


def list_blocks(name: str = NAME, split: str = "train", data_dir=None, *,
                tokenizer: tokenizer_lib.TextTokenizer | None = None,
                tokens_per_sample: int | None = None) -> tuple[TfdsBlocks, dict[str, int]]:
  """The blocks of a prepared split, and the counts of input skipped when it was prepared.

  ``tokenizer`` / ``tokens_per_sample``, when given, must match what the data was prepared with
  (ids and block lengths are baked into the records).

  Raises:
    FileNotFoundError: ``data_dir`` or the prepared dataset/split is missing (path in message).
    ValueError: the tokenizer or the block length differ from the prepared data's.
  """
  if data_dir and not os.path.exists(data_dir):
    raise FileNotFoundError(f"tfds data_dir not found: {data_dir!r}")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:
    raise FileNotFoundError(f"tfds dataset {name!r} not found in data_dir {data_dir!r}: {e}") from e
  if not builder.is_prepared():
    raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in "
                            f"{os.fspath(builder.data_dir)!r} (run tfds_text.prepare first)")
  if split not in builder.info.splits:
    raise FileNotFoundError(f"split {split!r} not in {os.fspath(builder.data_dir)!r}; "
                            f"available: {sorted(builder.info.splits)}")
  index = _index_dir(builder)
  meta_path = os.path.join(index, "meta.json")
  meta = {}
  if os.path.exists(meta_path):
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  if tokenizer is not None and meta.get("tokenizer_vocab_sha256") not in (
      None, tokenizer.vocab_sha256):
    raise ValueError(f"{os.fspath(builder.data_dir)!r} was prepared with another tokenizer "
                     f"(vocab {meta.get('vocab_size')} ids) than data.tokenizer {tokenizer.path!r}"
                     f" ({tokenizer.vocab_size} ids); prepare it again with this tokenizer")
  if tokens_per_sample is not None and meta.get("tokens_per_sample") not in (
      None, int(tokens_per_sample)):
    raise ValueError(f"{os.fspath(builder.data_dir)!r} holds blocks of tokens_per_sample="
                     f"{meta['tokens_per_sample']}, the config asks for {tokens_per_sample}")
  path = os.path.join(index, f"{split}.npy")
  if os.path.exists(path):
    lengths = np.load(path)
  else:
    logging.info("tfds %s/%s: no index at %s, reading every record once", name, split, path)
    lengths = _scan_lengths(name, split, data_dir)
  return TfdsBlocks(name, split, data_dir, lengths), dict(meta.get("bad", {}))
