r"""Text data: documents → byte-level BPE ids → fairseq ``complete_doc`` blocks → length buckets →
grain batches with host-side BERT or span masks. Pure NumPy on the host; JAX never runs here.

Input format (fairseq's raw masked-LM format, fairseq-spec §2.3): UTF-8 text files with one
sentence or paragraph per line; ``doc_mode='blank_line'`` (default) ends a document at a blank
line (and at the end of each file), ``doc_mode='file'`` makes each file one document. The embedded
corpus is the standard library's ``pydoc_data.topics``: one document per topic, one "line" per
paragraph (``pydoc_documents``).

Blocks, exactly as fairseq builds them (``fairseq-preprocess`` appends ``</s>`` to every line;
``TokenBlockDataset(break_mode='complete_doc', block_size=tokens_per_sample - 1)`` packs whole
lines greedily, never across a document boundary; ``PrependTokenDataset`` adds ``<s>``)::

  <s> line_1 </s> line_2 </s> ... line_k </s>      (at most tokens_per_sample ids)

So ``</s>`` ends every sentence, not only the block. One difference: a single line longer than
``tokens_per_sample - 1`` becomes an over-long block in fairseq, which its batch sampler then drops
(``ignore_invalid_inputs``); here it is cut into pieces of ``tokens_per_sample - 1`` ids (the last
piece keeps its ``</s>``) and counted as ``long_sentence_split``.

Config fields read from ``data_cfg`` (ConfigDict, dict or attribute object)::

  source            'embedded' | 'files' | 'tfds'                 (see SOURCES)
  tokenizer         tokenizers JSON path ('' = the embedded 4,096-id BPE; d2vjax/data/tokenizer.py)
  vocab_size        ids the model embeds; must equal the tokenizer's (checked at start)
  files             train text files: comma-separated string or list, globs allowed   [files]
  valid_files       valid text files                                                  [files]
  doc_mode          'blank_line' | 'file'                                             [files]
  tfds_name         tfds builder name, default 'd2v_text_files'                       [tfds]
  tfds_data_dir     tfds data_dir                                                     [tfds]
  train_split, valid_split   split names for 'train' / 'valid'                        [tfds]
  tokens_per_sample 512 (fairseq task.tokens_per_sample): the longest block, <s> included
  buckets           sorted padded lengths, e.g. [64, 128, 256, 512]; the last must be
                    >= tokens_per_sample (each block goes to the smallest bucket that holds it)
  budget_tokens     padded tokens per GLOBAL batch (fairseq max_tokens × GPUs: 8192 × 16)
  max_rows          cap on rows per global batch (0 = none)
  num_workers, num_threads, prefetch, seed   as in the speech pipeline (pipeline.py)

Rows per global batch of a bucket of length T: ``pipeline.batch_rows(T, budget_tokens, m,
max_rows)`` (m = data-parallel devices), so there is one static batch shape per bucket. The
per-epoch plan, the multi-host row slices and the resumable grain state are the speech pipeline's
(``pipeline.epoch_batches``; process p of P loads rows ``[p·R/P, (p+1)·R/P)``).

Batch contract (numpy): ``tokens`` int32 ``[B, T]`` (``<pad>``-padded), ``padding_mask`` bool
``[B, T]`` (True = pad), plus what ``batch_fn`` adds (``TextMaskFn``: ``masked_tokens`` int32
``[B, T]``, ``mask`` bool ``[B, T]``). Host metadata (stripped by the trainer): ``_bad`` {reason:
count} of unreadable blocks replaced in this batch, ``_valid_tokens`` int64 [B], ``_row_offset``,
``_global_rows``, ``_keys`` (``doc@offset``), ``_epoch``, ``_index``, and ``_labels`` float64
``[B]`` when the examples carry ``labels`` (``data.labelled.SentenceExamples``).

Bad inputs are counted, never fatal: lines that are not UTF-8 (``invalid_utf8``, skipped), blank
lines that separate nothing (``empty_line``), files without text (``empty_file``), over-long lines
(``long_sentence_split``); they are returned by ``examples_from_config`` and logged by the trainer
as ``bad/<reason>``.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import os
import sys
import threading
from typing import Any, Callable, Iterable, Sequence

from absl import logging
import grain
import numpy as np

from d2vjax import masking
from d2vjax.data import pipeline
from d2vjax.data import tokenizer as tokenizer_lib
from d2vjax.data.sources import _get
from d2vjax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

__all__ = ["Document", "DOC_MODES", "parse_lines", "read_text_files", "expand_paths",
           "pydoc_documents", "complete_doc_blocks", "BadRecordError", "InMemoryBlocks",
           "blocks_from_documents", "SOURCES", "examples_from_config", "plan_text_buckets",
           "plan_from_config", "describe_shapes", "make_text_dataset", "make_text_iterator",
           "TextMaskFn", "MASKERS", "text_mask_fn"]

DOC_MODES = ("blank_line", "file")
# Embedded corpus: share of pydoc topics (by md5 of the topic name) held out as 'valid'.
EMBEDDED_VALID_FRACTION = 0.05
# SeedSequence tag of the batch hook's generator, first and nonzero like pipeline.py's tags.
_HOOK = 3


# ---------------------------------------------------------------------------------------------
# Documents.


@dataclasses.dataclass(frozen=True)
class Document:
  """One document: ``sentences`` are its lines (fairseq: one ``</s>``-terminated unit each)."""
  key: str
  sentences: tuple[str, ...]


def parse_lines(lines: Iterable[bytes], *, source: str, doc_mode: str = "blank_line",
                counts: collections.Counter | None = None) -> list[Document]:
  """Splits raw lines of one file into documents (see the module docstring for the format).

  Args:
    lines: the file's lines as bytes, without line terminators.
    source: a name for keys (``source:line`` of each document's first line).
    doc_mode: 'blank_line' or 'file'.
    counts: incremented in place with ``invalid_utf8`` / ``empty_line`` / ``empty_file``.
  Returns:
    Documents in file order; never an empty one.
  """
  if doc_mode not in DOC_MODES:
    raise ValueError(f"data.doc_mode must be one of {DOC_MODES}, got {doc_mode!r}")
  counts = collections.Counter() if counts is None else counts
  docs, cur, first = [], [], 0
  for lineno, raw in enumerate(lines, start=1):
    try:
      line = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
      # Skipped rather than decoded with replacement characters: U+FFFD runs would be learned
      # as content.
      counts["invalid_utf8"] += 1
      continue
    if not line:
      if doc_mode == "blank_line" and cur:
        docs.append(Document(f"{source}:{first}", tuple(cur)))
        cur = []
      else:
        counts["empty_line"] += 1  # separates nothing
      continue
    if not cur:
      first = lineno
    cur.append(line)
  if cur:
    docs.append(Document(f"{source}:{first}", tuple(cur)))
  if not docs:
    counts["empty_file"] += 1
  return docs


def expand_paths(spec) -> list[str]:
  """Files named by ``spec``: a comma-separated string or a list; each item a path or a glob.

  Raises FileNotFoundError naming an item that matches nothing, IsADirectoryError for folders.
  """
  items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
  out = []
  for item in (i for i in items if i):
    matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
    if not matches or not os.path.exists(matches[0]):
      raise FileNotFoundError(f"text file not found: {item!r}")
    for m in matches:
      if os.path.isdir(m):
        raise IsADirectoryError(f"{m!r} is a directory; give files or a glob such as {m}/*.txt")
      out.append(m)
  if not out:
    raise FileNotFoundError(f"no text files given: {spec!r}")
  return out


def read_text_files(spec, doc_mode: str = "blank_line") -> tuple[list[Document], dict[str, int]]:
  """Documents of every file in ``spec`` (see ``expand_paths``) and the counts of skipped input."""
  counts: collections.Counter = collections.Counter()
  docs = []
  for path in expand_paths(spec):
    with open(path, "rb") as f:
      docs += parse_lines(f.read().splitlines(), source=path, doc_mode=doc_mode, counts=counts)
  return docs, dict(counts)


def _is_rule(line: str) -> bool:
  # reST heading underlines ("******", "======") carry no language.
  return len(line) >= 3 and len(set(line)) == 1 and line[0] in "*=-~^"


def pydoc_documents(split: str | None = "train") -> list[Document]:
  """The embedded English corpus: the standard library's ``pydoc_data.topics`` help texts.

  One document per topic (sorted by name); the topic's blank-line-separated paragraphs become its
  lines, with their hard line wraps joined by single spaces and heading underlines dropped.
  ``split``: 'train', 'valid' (topics whose md5 falls below ``EMBEDDED_VALID_FRACTION``), or None
  for all topics.
  """
  if split not in ("train", "valid", None):
    raise ValueError(f"unknown embedded text split {split!r}; valid splits: train, valid")
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  docs = []
  for name in sorted(topics.topics):
    if split is not None:
      u = int(hashlib.md5(name.encode("utf-8")).hexdigest()[:8], 16) / 2.0**32
      if (u < EMBEDDED_VALID_FRACTION) != (split == "valid"):
        continue
    paragraphs = []
    for block in topics.topics[name].split("\n\n"):
      lines = [l.strip() for l in block.splitlines() if l.strip() and not _is_rule(l.strip())]
      if lines:
        paragraphs.append(" ".join(lines))
    if paragraphs:
      docs.append(Document(f"pydoc:{name}", tuple(paragraphs)))
  return docs


# ---------------------------------------------------------------------------------------------
# Blocks.


def complete_doc_blocks(sentence_lengths, doc_offsets, block_size: int
                        ) -> tuple[np.ndarray, dict[str, int]]:
  """fairseq ``TokenBlockDataset(break_mode='complete_doc')`` slice indices.

  Args:
    sentence_lengths: int ``[S]``, ids per sentence INCLUDING its ``</s>``.
    doc_offsets: int ``[D + 1]``: document d owns sentences ``[doc_offsets[d], doc_offsets[d+1])``.
    block_size: most ids per block (``tokens_per_sample - 1``: ``<s>`` is prepended later).
  Returns:
    ``(blocks, counts)``: int64 ``[N, 3]`` rows ``(doc, start, end)``, token offsets within the
    document's id stream (the concatenation of its sentences); ``counts['long_sentence_split']``.
  """
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}")
  lens = np.asarray(sentence_lengths, np.int64)
  offs = np.asarray(doc_offsets, np.int64)
  out, split = [], 0
  for d in range(len(offs) - 1):
    start, cur = 0, 0
    for n in lens[offs[d]:offs[d + 1]].tolist():
      if n > block_size:
        split += 1
        pieces = [block_size] * (n // block_size) + ([n % block_size] if n % block_size else [])
      else:
        pieces = [n]
      for p in pieces:
        # Greedy: close the block when the next whole sentence (piece) would not fit.
        if cur + p > block_size and cur > 0:
          out.append((d, start, start + cur))
          start, cur = start + cur, 0
        cur += p
    if cur > 0:
      out.append((d, start, start + cur))
  blocks = np.asarray(out, np.int64).reshape(-1, 3)
  return blocks, ({"long_sentence_split": split} if split else {})


class BadRecordError(ValueError):
  """A block that cannot be read (a corrupt or missing tfds record); the pipeline replaces it."""

  def __init__(self, key: str, reason: str = "unreadable", detail: str = ""):
    self.key, self.reason, self.detail = key, reason, detail
    super().__init__(f"{key}: {reason}" + (f" ({detail})" if detail else ""))

  def __reduce__(self):
    return (BadRecordError, (self.key, self.reason, self.detail))


@dataclasses.dataclass(frozen=True, eq=False)
class InMemoryBlocks:
  """Blocks over documents tokenized in memory (embedded corpus, text files).

  The block protocol shared with ``tfds_text.TfdsBlocks``: ``len()``, ``lengths`` (ids per block
  with ``<s>``), ``block_tokens(i)`` (int32 ids without ``<s>``), ``key(i)``.

  Attributes:
    tokens: int32 ``[N_tok]``, all documents' ids (each sentence followed by ``</s>``).
    doc_starts: int64 ``[D]``, offset of each document in ``tokens``.
    blocks: int64 ``[N, 3]`` ``(doc, start, end)`` from ``complete_doc_blocks``.
    doc_keys: key of each document.
  """
  tokens: np.ndarray
  doc_starts: np.ndarray
  blocks: np.ndarray
  doc_keys: tuple[str, ...]

  def __len__(self) -> int:
    return int(self.blocks.shape[0])

  @property
  def lengths(self) -> np.ndarray:
    return self.blocks[:, 2] - self.blocks[:, 1] + 1

  def block_tokens(self, i: int) -> np.ndarray:
    d, s, e = (int(v) for v in self.blocks[i])
    base = int(self.doc_starts[d])
    return self.tokens[base + s:base + e]

  def key(self, i: int) -> str:
    d, s, _ = (int(v) for v in self.blocks[i])
    return f"{self.doc_keys[d]}@{s}"


def tokenize_documents(tok: tokenizer_lib.TextTokenizer, docs: Sequence[Document]
                       ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Per document: its id stream (each sentence's ids followed by ``</s>``) and its sentence
  lengths (``</s>`` included), as fairseq-preprocess binarizes each line."""
  flat = [s for d in docs for s in d.sentences]
  ids = tok.encode_batch(flat) if flat else []
  streams, lengths, k = [], [], 0
  for d in docs:
    sent = ids[k:k + len(d.sentences)]
    k += len(d.sentences)
    eos = np.full((1,), EOS_ID, np.int32)
    streams.append(np.concatenate([x for s in sent for x in (s, eos)]).astype(np.int32))
    lengths.append(np.asarray([s.size + 1 for s in sent], np.int64))
  return streams, lengths


def blocks_from_documents(tok: tokenizer_lib.TextTokenizer, docs: Sequence[Document],
                          tokens_per_sample: int) -> tuple[InMemoryBlocks, dict[str, int]]:
  """Tokenizes ``docs`` and cuts them into ``complete_doc`` blocks of at most
  ``tokens_per_sample`` ids once ``<s>`` is prepended."""
  streams, lengths = tokenize_documents(tok, docs)
  sent_lengths = np.concatenate(lengths) if lengths else np.zeros((0,), np.int64)
  doc_offsets = np.concatenate([[0], np.cumsum([len(l) for l in lengths])]).astype(np.int64)
  blocks, counts = complete_doc_blocks(sent_lengths, doc_offsets, int(tokens_per_sample) - 1)
  tokens = np.concatenate(streams) if streams else np.zeros((0,), np.int32)
  doc_starts = np.concatenate([[0], np.cumsum([s.size for s in streams])[:-1]]).astype(np.int64) \
      if streams else np.zeros((0,), np.int64)
  return InMemoryBlocks(tokens, doc_starts, blocks, tuple(d.key for d in docs)), counts


# ---------------------------------------------------------------------------------------------
# Sources (config dispatch).


def _tokenizer(cfg) -> tokenizer_lib.TextTokenizer:
  tok = tokenizer_lib.load(_get(cfg, "tokenizer") or None)
  want = _get(cfg, "vocab_size")
  if want is not None and int(want) != tok.vocab_size:
    raise ValueError(
        f"tokenizer {tok.path!r} has {tok.vocab_size} ids but vocab_size is {want} (model."
        "vocab_size): point data.tokenizer at a tokenizer of that size (RoBERTa: 50,265; see "
        "d2vjax/data/tokenizer.py) or set model.vocab_size to the tokenizer's")
  return tok


def _split_files(cfg, split: str):
  field = "valid_files" if split == "valid" else "files"
  spec = _get(cfg, field)
  if not spec:
    raise FileNotFoundError(f"data.{field} is not set (source='files', split={split!r})")
  return spec


def _from_embedded(cfg, split: str, tok):
  return blocks_from_documents(tok, pydoc_documents(split), int(_get(cfg, "tokens_per_sample")))


def _from_files(cfg, split: str, tok):
  docs, counts = read_text_files(_split_files(cfg, split), _get(cfg, "doc_mode", "blank_line"))
  blocks, block_counts = blocks_from_documents(tok, docs, int(_get(cfg, "tokens_per_sample")))
  return blocks, {**counts, **block_counts}


def _from_tfds(cfg, split: str, tok):
  from d2vjax.data import tfds_text  # Lazy: tfds import costs ~0.5 s.
  name = _get(cfg, "tfds_name") or tfds_text.NAME
  split_name = _get(cfg, f"{split}_split", split) if split in ("train", "valid") else split
  return tfds_text.list_blocks(name, split_name or split, _get(cfg, "tfds_data_dir") or None,
                               tokenizer=tok, tokens_per_sample=int(_get(cfg, "tokens_per_sample")))


SOURCES: dict[str, Callable[[Any, str, tokenizer_lib.TextTokenizer], tuple[Any, dict]]] = {
    "embedded": _from_embedded,
    "files": _from_files,
    "tfds": _from_tfds,
}


def examples_from_config(data_cfg, split: str = "train") -> tuple[Any, dict[str, int]]:
  """The blocks of ``split`` ('train' / 'valid') from ``data_cfg.source`` and the counts of
  skipped or repaired input (reason → count)."""
  source = _get(data_cfg, "source", "embedded")
  if source not in SOURCES:
    raise ValueError(f"unknown data.source {source!r}; expected one of {sorted(SOURCES)}")
  tok = _tokenizer(data_cfg)
  blocks, counts = SOURCES[source](data_cfg, split, tok)
  logging.info("text %s/%s: %d blocks, %d ids, skipped/repaired %s", source, split, len(blocks),
               int(np.sum(blocks.lengths)) if len(blocks) else 0, counts)
  return blocks, counts


# ---------------------------------------------------------------------------------------------
# Batching plan.


def plan_text_buckets(lengths, buckets: Sequence[int], *, budget_tokens: int,
                      batch_multiple: int = 1, max_rows: int = 0) -> pipeline.BucketPlan:
  """Each block (``lengths`` ``[N]``, ``<s>`` included) goes to the smallest bucket that holds it;
  rows per bucket from ``budget_tokens`` (``pipeline.batch_rows``). Pad mode, never cropped."""
  buckets = tuple(int(b) for b in buckets)
  if not buckets or buckets[0] < 1 or any(b2 <= b1 for b1, b2 in zip(buckets, buckets[1:])):
    raise ValueError(f"data.buckets must be positive and strictly increasing, got {buckets}")
  lengths = np.asarray(lengths, np.int64).reshape(-1)
  idx = np.searchsorted(np.asarray(buckets), lengths, side="left")
  if np.any(idx >= len(buckets)):
    raise ValueError(f"blocks of {int(lengths.max())} ids exceed the largest bucket {buckets[-1]}"
                     " (data.buckets[-1] must be >= data.tokens_per_sample)")
  rows = tuple(pipeline.batch_rows(b, budget_tokens, batch_multiple, max_rows) for b in buckets)
  members = tuple(np.flatnonzero(idx == k) for k in range(len(buckets)))
  num_batches = tuple(len(m) // r for m, r in zip(members, rows))
  dropped = int(sum(len(m) - n * r for m, n, r in zip(members, num_batches, rows)))
  return pipeline.BucketPlan("pad", buckets, rows, members, num_batches,
                             {"dropped_remainder": dropped} if dropped else {})


def plan_from_config(data_cfg, examples, batch_multiple: int) -> pipeline.BucketPlan:
  """The ``BucketPlan`` (static batch shapes, batches per epoch) of ``examples``."""
  buckets = list(_get(data_cfg, "buckets"))
  tps = int(_get(data_cfg, "tokens_per_sample"))
  if buckets and buckets[-1] < tps:
    raise ValueError(f"data.buckets[-1]={buckets[-1]} < data.tokens_per_sample={tps}")
  return plan_text_buckets(examples.lengths, buckets,
                           budget_tokens=int(_get(data_cfg, "budget_tokens")),
                           batch_multiple=batch_multiple,
                           max_rows=int(_get(data_cfg, "max_rows", 0) or 0))


def describe_shapes(plan: pipeline.BucketPlan) -> str:
  """One line per batch shape, for the log."""
  lines = [f"{len(plan.shapes())} batch shapes, {plan.total_batches} global batches/epoch, "
           f"counts={plan.counts}"]
  for (r, t), n in sorted(plan.shapes().items(), key=lambda kv: -kv[0][1]):
    lines.append(f"  [{r}, {t}] ({r * t} padded tokens): {n} batches/epoch")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Loader.


class _TextBatchLoader:
  """Global-batch index → this process's rows of that batch (a grain ``map`` function)."""

  def __init__(self, examples, plan: pipeline.BucketPlan, *, seed: int, start_epoch: int,
               process_index: int, process_count: int, batch_fn):
    self.examples = examples
    self.plan = plan
    self.seed, self.start_epoch = int(seed) % 2**64, int(start_epoch)
    self.p, self.P = int(process_index), int(process_count)
    self.batch_fn = batch_fn
    self._init_caches()

  def _init_caches(self):
    self._lock = threading.Lock()
    self._epoch_cache: dict[int, Any] = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    state.pop("_lock")
    state.pop("_epoch_cache")
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_caches()

  def _epoch(self, epoch: int):
    with self._lock:
      if epoch not in self._epoch_cache:
        if len(self._epoch_cache) >= 2:
          self._epoch_cache.pop(min(self._epoch_cache))
        self._epoch_cache[epoch] = pipeline.epoch_batches(self.plan, self.seed, epoch)
      return self._epoch_cache[epoch]

  def __call__(self, i: int) -> dict:
    total = self.plan.total_batches
    epoch, j = self.start_epoch + int(i) // total, int(i) % total
    batches, orders = self._epoch(epoch)
    k, start = batches[j]
    t, r_global, order = self.plan.buckets[k], self.plan.rows[k], orders[k]
    n = len(order)
    b = r_global // self.P
    row0 = self.p * b
    tokens = np.full((b, t), PAD_ID, np.int32)
    valid = np.zeros((b,), np.int64)
    bad, keys = collections.Counter(), []
    # Labelled examples (fine-tuning, ``data.labelled.SentenceExamples``) carry one label each.
    label_of = getattr(self.examples, "labels", None)
    labels = np.zeros((b,), np.float64)
    for r in range(b):
      g = row0 + r
      for attempt in range(n):
        # An unreadable block is replaced by the next block of the same bucket's shuffled list,
        # so the batch keeps its shape and the choice is the same on every run.
        idx = int(order[(start + g + attempt) % n])
        try:
          ids = self.examples.block_tokens(idx)
          break
        except BadRecordError as e:
          bad[e.reason] += 1
      else:
        raise RuntimeError(f"every block of bucket {t} failed to load: {dict(bad)}")
      tokens[r, 0] = BOS_ID
      tokens[r, 1:ids.size + 1] = ids
      valid[r] = ids.size + 1
      keys.append(self.examples.key(idx))
      if label_of is not None:
        labels[r] = label_of[idx]
    batch = {
        "tokens": tokens,
        "padding_mask": np.arange(t)[None, :] >= valid[:, None],
        "_bad": dict(bad),
        "_valid_tokens": valid,
        "_row_offset": row0,
        "_global_rows": r_global,
        "_keys": keys,
        "_epoch": epoch,
        "_index": j,
    }
    if label_of is not None:
      batch["_labels"] = labels
    if self.batch_fn is not None:
      # The same generator on every process: hooks draw for all global rows and keep theirs.
      batch = self.batch_fn(np.random.default_rng([_HOOK, self.seed, epoch, j]), batch)
    return batch


def make_text_dataset(data_cfg, *, examples, seed: int | None = None, batch_multiple: int = 1,
                      process_index: int = 0, process_count: int = 1,
                      batch_fn: Callable[[np.random.Generator, dict], dict] | None = None,
                      num_epochs: int | None = None, start_epoch: int = 0) -> grain.IterDataset:
  """The pipeline as a grain ``IterDataset`` (see ``make_text_iterator`` for the arguments)."""
  if batch_multiple % process_count:
    raise ValueError(f"batch_multiple={batch_multiple} (data-parallel devices) must be a multiple "
                     f"of process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  seed = int(_get(data_cfg, "seed", 0) if seed is None else seed)
  plan = plan_from_config(data_cfg, examples, batch_multiple)
  if plan.total_batches == 0:
    raise ValueError(
        f"no complete batch: {len(examples)} blocks, bucket sizes "
        f"{[len(m) for m in plan.members]} for rows {list(plan.rows)} per batch (buckets "
        f"{list(plan.buckets)}, budget_tokens {_get(data_cfg, 'budget_tokens')}); lower "
        "budget_tokens/max_rows or add data")
  loader = _TextBatchLoader(examples, plan, seed=seed, start_epoch=start_epoch,
                            process_index=process_index, process_count=process_count,
                            batch_fn=batch_fn)
  # sys.maxsize elements ≈ unbounded epochs; grain's MapDataset needs a length.
  length = sys.maxsize if num_epochs is None else int(num_epochs) * plan.total_batches
  ds = grain.MapDataset.range(length).map(loader)
  read = grain.ReadOptions(num_threads=int(_get(data_cfg, "num_threads", 2) or 0),
                           prefetch_buffer_size=int(_get(data_cfg, "prefetch", 4) or 1))
  ids = ds.to_iter_dataset(read)
  workers = int(_get(data_cfg, "num_workers", 0) or 0)
  if workers > 0:
    from absl import flags  # grain's worker start-up reads absl flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=int(_get(data_cfg, "prefetch", 4) or 1)))
  logging.info("text pipeline: %s", describe_shapes(plan))
  return ids


def make_text_iterator(data_cfg, *, examples, seed: int | None = None, batch_multiple: int = 1,
                       process_index: int = 0, process_count: int = 1,
                       batch_fn: Callable[[np.random.Generator, dict], dict] | None = None,
                       num_epochs: int | None = None, start_epoch: int = 0):
  """Iterator over this process's share of the global text batches.

  Args:
    data_cfg: see the module docstring for the fields.
    examples: blocks from ``examples_from_config`` (the same on every process).
    seed: data seed (default ``data_cfg.seed``); order and masks are pure functions of
      ``(seed, epoch, batch index, global row)``.
    batch_multiple: data-parallel device count; rows per batch are multiples of it.
    process_index, process_count: this host's rows ``[p·R/P, (p+1)·R/P)`` of each global batch.
    batch_fn: ``(rng, batch) -> batch`` hook, e.g. ``text_mask_fn(config.masking)``; picklable.
    num_epochs: None = endless, else stop after that many epochs.
    start_epoch: epoch of the first element.

  Returns:
    A grain ``DatasetIterator`` of batch dicts (module docstring) with ``get_state()`` /
    ``set_state()``; call ``close()`` when ``num_workers > 0``.
  """
  return iter(make_text_dataset(
      data_cfg, examples=examples, seed=seed, batch_multiple=batch_multiple,
      process_index=process_index, process_count=process_count, batch_fn=batch_fn,
      num_epochs=num_epochs, start_epoch=start_epoch))


# ---------------------------------------------------------------------------------------------
# Masking hook.


def _bert(fn: "TextMaskFn", rng, tokens, pad):
  return masking.bert_mask(rng, tokens, pad, mask_prob=fn.mask_prob,
                           mask_token_id=fn.vocab_size - 1, vocab_size=fn.vocab_size,
                           special_ids=tokenizer_lib.special_ids(fn.vocab_size),
                           leave_unmasked_prob=fn.leave_unmasked_prob,
                           random_token_prob=fn.random_token_prob)


def _span(fn: "TextMaskFn", rng, tokens, pad):
  return masking.span_text_mask(rng, tokens, pad, mask_prob=fn.mask_prob,
                                span_length=fn.span_length, mask_token_id=fn.vocab_size - 1,
                                special_ids=tokenizer_lib.special_ids(fn.vocab_size),
                                mask_special=fn.mask_special)


MASKERS = {"bert": _bert, "span": _span}


@dataclasses.dataclass(frozen=True)
class TextMaskFn:
  """``batch_fn`` adding ``masked_tokens`` int32 ``[B, T]`` (the student's corrupted input) and
  ``mask`` bool ``[B, T]`` (positions in the loss) with ``masking.bert_mask`` or
  ``masking.span_text_mask``.

  Each global row gets its own generator, drawn from the batch generator for ALL global rows, so a
  row's mask does not depend on the number of processes. Special ids follow the fairseq layout of
  a ``vocab_size`` vocabulary (``<mask>`` = ``vocab_size - 1``; ``tokenizer.special_ids``).
  """
  kind: str
  vocab_size: int
  mask_prob: float
  leave_unmasked_prob: float = 0.0
  random_token_prob: float = 0.0
  span_length: int = 4
  mask_special: bool = True

  def __post_init__(self):
    if self.kind not in MASKERS:
      raise ValueError(f"masking.kind must be one of {sorted(MASKERS)}, got {self.kind!r}")

  def __call__(self, rng: np.random.Generator, batch: dict) -> dict:
    tokens, pad = batch["tokens"], batch["padding_mask"]
    b = tokens.shape[0]
    off = int(batch.get("_row_offset", 0))
    seeds = rng.integers(0, 2**63 - 1, size=int(batch.get("_global_rows", b)))
    masked = np.empty_like(tokens)
    mask = np.zeros(tokens.shape, bool)
    for r in range(b):
      masked[r:r + 1], mask[r:r + 1] = MASKERS[self.kind](
          self, np.random.default_rng(seeds[off + r]), tokens[r:r + 1], pad[r:r + 1])
    return {**batch, "masked_tokens": masked, "mask": mask}


def text_mask_fn(mask_cfg) -> TextMaskFn:
  """The pre-training mask hook from ``mask_cfg``: ``kind`` ('bert' | 'span'), ``vocab_size``,
  and the chosen kind's sub-section (``bert``: mask_prob, leave_unmasked_prob, random_token_prob;
  ``span``: mask_prob, span_length, mask_special)."""
  kind = _get(mask_cfg, "kind")
  if kind not in MASKERS:
    raise ValueError(f"masking.kind must be one of {sorted(MASKERS)}, got {kind!r}")
  sub = _get(mask_cfg, kind)
  if sub is None:
    raise ValueError(f"masking.{kind} section is missing")
  kw = {"mask_prob": float(_get(sub, "mask_prob"))}
  if kind == "bert":
    kw.update(leave_unmasked_prob=float(_get(sub, "leave_unmasked_prob", 0.1)),
              random_token_prob=float(_get(sub, "random_token_prob", 0.1)))
  else:
    kw.update(span_length=int(_get(sub, "span_length", 4)),
              mask_special=bool(_get(sub, "mask_special", True)))
  return TextMaskFn(kind=kind, vocab_size=int(_get(mask_cfg, "vocab_size")), **kw)
