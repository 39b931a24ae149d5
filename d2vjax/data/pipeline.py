"""Grain speech pipeline: length buckets, budgeted static batch shapes, host masks, resumable state.

Pure NumPy on the host (user-needs B3); JAX only ever sees the numpy batches this yields.

Config fields read from ``data_cfg`` (an ml_collections ConfigDict, a dict or any attribute
object)::

  source           'embedded' | 'manifest' | 'folder' | 'tfds'    (see sources.SOURCES)
  manifest         train tsv (fairseq manifest; a sibling .wrd gives transcripts)   [manifest]
  valid_manifest   valid tsv                                                        [manifest]
  folder           root folder of audio files                                       [folder]
  tfds_name        tfds builder name, default 'd2v_speech_folder'                   [tfds]
  tfds_data_dir    tfds data_dir                                                    [tfds]
  train_split      split name / subfolder for 'train' ('' = folder root)       [folder, tfds]
  valid_split      split name / subfolder for 'valid'                          [folder, tfds]
  sample_rate      16000 (only 16 kHz is supported by the model; other file rates are resampled)
  normalize        bool: zero-mean/unit-variance per utterance (fairseq task.normalize)
  min_sample_size  int samples: shorter utterances are dropped and counted (fairseq: 32000)
  max_sample_size  int samples: upper bound for the buckets (fairseq: 320000 in pre-training)
  buckets          sorted list of batch lengths in samples, e.g.
                   [32000, 64000, 96000, 128000, 160000, 192000, 250000]
  mode             'crop' (pre-training: each clip goes to the largest bucket <= its length and is
                   randomly cropped to it; no padding) | 'pad' (fine-tuning: smallest bucket >= its
                   length, zero-padded; longer clips are cropped to the largest bucket, counted)
  budget_samples   audio samples per GLOBAL batch (fairseq max_tokens x number of GPUs)
  max_rows         cap on rows per global batch (0 = no cap)
  num_workers      grain worker processes (0 = load in this process with num_threads threads)
  num_threads      optional, default 2: loader threads per process
  prefetch         optional, default 4: batches buffered per process / worker
  seed             int: data order, crops and masks are pure functions of (seed, epoch, batch)

Rows per global batch for a bucket of length S:
``max(m, (budget_samples // S) // m * m)`` with m = ``batch_multiple`` (number of data-parallel
devices), then capped by ``max_rows``; so there is one batch shape (rows, S) per bucket.

Multi-host sharding (user-needs D1/J2/FM14). Every process walks the same global plan (a pure
function of seed and epoch: shuffle each bucket, cut it into full batches, drop the remainder,
shuffle the batch order, put a batch of the longest bucket first so an OOM shows at step 0), and
process p of P loads rows ``[p*R/P, (p+1)*R/P)`` of each global batch of R rows. Hence every host
runs exactly the same number of steps, each host reads only its share, and concatenating the
processes' batches in process order gives exactly the single-process global batch (crop offsets
are drawn per global row, the hook's generator per global batch, neither from the process index).

Batch contract (numpy): ``audio`` float32 ``[B, S]``; ``padding_mask`` bool ``[B, S]`` (True =
padded; all False in crop mode); plus what ``batch_fn`` adds (``speech_mask_fn``: ``mask`` bool
``[B, T]``, T = num_frames(S)). B = R / P local rows. Host-side metadata keys start with ``_``
(the trainer strips them): ``_bad`` {reason: count} of bad clips replaced in this batch,
``_valid_samples`` int64 [B], ``_global_valid_samples`` int64 [R] (planned), ``_row_offset``,
``_keys``, ``_transcripts``, ``_epoch``, ``_index`` (batch index within the epoch).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import sys
import threading
from typing import Any, Callable, Sequence

from absl import logging
import grain
import numpy as np

from d2vjax import masking
from d2vjax.data import audio_io, sources
from d2vjax.data.audio_io import RECEPTIVE_FIELD, BadAudioError, num_frames
from d2vjax.data.sources import Example, examples_from_config

__all__ = ["BucketPlan", "plan_buckets", "plan_fingerprint", "batch_rows", "epoch_batches",
           "batch_shapes",
           "describe_shapes", "plan_from_config", "make_speech_dataset", "make_speech_iterator",
           "speech_mask_fn",
           "SpeechMaskFn", "examples_from_config", "MODES"]

MODES = ("crop", "pad")
# SeedSequence stream tags, placed FIRST and nonzero: SeedSequence ignores trailing zeros
# ([1, 2] and [1, 2, 0] give the same stream), so a tag at the end could not separate streams.
_PLAN, _CROP, _HOOK = 1, 2, 3

_get = sources._get


def batch_rows(bucket_len: int, budget_samples: int, batch_multiple: int = 1,
               max_rows: int = 0) -> int:
  """Rows of a global batch of bucket length ``bucket_len`` samples under ``budget_samples``.

  Always a positive multiple of ``batch_multiple`` (so it splits evenly over devices); at least
  ``batch_multiple`` rows even if that exceeds the budget.
  """
  m = int(batch_multiple)
  rows = max(m, (int(budget_samples) // int(bucket_len)) // m * m)
  if max_rows and max_rows > 0:
    rows = min(rows, max(m, int(max_rows) // m * m))
  return rows


@dataclasses.dataclass(frozen=True)
class BucketPlan:
  """The epoch-independent part of the batching plan.

  Attributes:
    mode: 'crop' or 'pad'.
    buckets: batch lengths S in samples, ascending.
    rows: global rows R per batch of each bucket.
    members: example indices (into the examples list) of each bucket, in list order.
    num_batches: full global batches per epoch of each bucket.
    counts: planning-time counts: ``below_smallest_bucket`` (crop mode, skipped),
      ``cropped`` (pad mode, longer than the largest bucket), ``dropped_remainder`` (examples left
      out of each epoch by dropping incomplete batches).
  """
  mode: str
  buckets: tuple[int, ...]
  rows: tuple[int, ...]
  members: tuple[np.ndarray, ...]
  num_batches: tuple[int, ...]
  counts: dict

  @property
  def total_batches(self) -> int:
    """Global batches per epoch (identical on every process)."""
    return int(sum(self.num_batches))

  def shapes(self) -> dict[tuple[int, int], int]:
    """``{(R, S): global batches per epoch}`` for the buckets that yield batches."""
    return {(r, s): n for r, s, n in zip(self.rows, self.buckets, self.num_batches) if n}


def _check_buckets(buckets: Sequence[int], mode: str, max_sample_size: int | None):
  buckets = tuple(int(b) for b in buckets)
  if not buckets:
    raise ValueError("data.buckets is empty")
  if any(b2 <= b1 for b1, b2 in zip(buckets, buckets[1:])):
    raise ValueError(f"data.buckets must be strictly increasing, got {buckets}")
  if buckets[0] < RECEPTIVE_FIELD:
    raise ValueError(f"data.buckets[0]={buckets[0]} is below the {RECEPTIVE_FIELD}-sample "
                     "receptive field of the CNN")
  if max_sample_size and buckets[-1] > max_sample_size:
    raise ValueError(f"data.buckets[-1]={buckets[-1]} exceeds max_sample_size={max_sample_size}")
  if mode not in MODES:
    raise ValueError(f"data.mode must be one of {MODES}, got {mode!r}")
  return buckets


def plan_buckets(lengths, buckets: Sequence[int], *, mode: str, budget_samples: int,
                 batch_multiple: int = 1, max_rows: int = 0,
                 max_sample_size: int | None = None) -> BucketPlan:
  """Assigns examples (by length in samples, ``[N]``) to buckets and sizes the batches."""
  buckets = _check_buckets(buckets, mode, max_sample_size)
  lengths = np.asarray(lengths, np.int64).reshape(-1)
  edges = np.asarray(buckets, np.int64)
  counts = collections.Counter()
  if mode == "crop":
    # Largest bucket <= length; shorter than the smallest bucket → skipped.
    idx = np.searchsorted(edges, lengths, side="right") - 1
    counts["below_smallest_bucket"] = int(np.sum(idx < 0))
  else:
    # Smallest bucket >= length; longer than the largest → cropped into the largest.
    idx = np.searchsorted(edges, lengths, side="left")
    counts["cropped"] = int(np.sum(idx >= len(buckets)))
    idx = np.minimum(idx, len(buckets) - 1)
  rows = tuple(batch_rows(b, budget_samples, batch_multiple, max_rows) for b in buckets)
  members = tuple(np.flatnonzero(idx == k) for k in range(len(buckets)))
  num_batches = tuple(len(m) // r for m, r in zip(members, rows))
  counts["dropped_remainder"] = int(sum(len(m) - n * r for m, n, r in
                                        zip(members, num_batches, rows)))
  return BucketPlan(mode, buckets, rows, members, num_batches,
                    {k: v for k, v in counts.items() if v})


def epoch_batches(plan: BucketPlan, seed: int, epoch: int):
  """Global batch order of one epoch, a pure function of ``(seed, epoch)``.

  Returns:
    ``(batches, orders)``: ``batches[j] = (bucket, start)`` means global batch j holds
    ``orders[bucket][start:start + rows[bucket]]`` (example indices); ``orders[bucket]`` is the
    bucket's shuffled member list, also used to pick deterministic replacements for bad clips.
  """
  rng = np.random.default_rng([_PLAN, int(seed) % 2**64, int(epoch)])
  orders = [m[rng.permutation(len(m))] for m in plan.members]
  batches = [(k, i * r) for k, (n, r) in enumerate(zip(plan.num_batches, plan.rows))
             for i in range(n)]
  batches = [batches[i] for i in rng.permutation(len(batches))]
  # Longest bucket first: the most memory-hungry shape runs at step 0 (user-needs B4).
  longest = max((k for k, _ in batches), default=None)
  if longest is not None:
    first = next(j for j, (k, _) in enumerate(batches) if k == longest)
    batches.insert(0, batches.pop(first))
  return batches, orders


def plan_fingerprint(data_cfg, examples: Sequence[Example], batch_multiple: int = 1) -> str:
  """Hex digest of everything the global batch plan depends on (examples, lengths, buckets, rows,
  mode, seed). Hosts that disagree would cut different batches; compare it across processes at
  start (user-needs D1)."""
  plan = plan_from_config(data_cfg, examples, batch_multiple)
  h = hashlib.sha256()
  h.update(repr((plan.mode, plan.buckets, plan.rows, _get(data_cfg, "seed", 0),
                 bool(_get(data_cfg, "normalize", False)))).encode())
  for e in examples:
    h.update(f"{e.path}\t{e.num_samples}\n".encode())
  return h.hexdigest()[:16]


def plan_from_config(data_cfg, examples: Sequence[Example], batch_multiple: int) -> BucketPlan:
  """The ``BucketPlan`` (static batch shapes, batches per epoch) for ``data_cfg`` and ``examples``."""
  return plan_buckets(
      [e.num_samples for e in examples], _get(data_cfg, "buckets"),
      mode=_get(data_cfg, "mode", "crop"), budget_samples=int(_get(data_cfg, "budget_samples")),
      batch_multiple=batch_multiple, max_rows=int(_get(data_cfg, "max_rows", 0) or 0),
      max_sample_size=_get(data_cfg, "max_sample_size"))


def batch_shapes(data_cfg, examples: Sequence[Example], batch_multiple: int = 1
                 ) -> dict[tuple[int, int], int]:
  """Distinct GLOBAL batch shapes ``{(rows, samples): batches per epoch}``; at most one per bucket.

  The trainer prints these at start and can bound its compile count with ``len(...)`` (C1).
  """
  return plan_from_config(data_cfg, examples, batch_multiple).shapes()


def describe_shapes(data_cfg, examples: Sequence[Example], batch_multiple: int = 1) -> str:
  """Human-readable summary of the batch shapes and planning counts (one line per shape)."""
  plan = plan_from_config(data_cfg, examples, batch_multiple)
  lines = [f"{len(plan.shapes())} batch shapes, {plan.total_batches} global batches/epoch, "
           f"mode={plan.mode}, counts={plan.counts}"]
  for (r, s), n in sorted(plan.shapes().items(), key=lambda kv: -kv[0][1]):
    lines.append(f"  [{r}, {s}] ({s / audio_io.SAMPLE_RATE:.2f} s, {num_frames(s)} frames): "
                 f"{n} batches/epoch")
  return "\n".join(lines)


class _BatchLoader:
  """Global-batch index → this process's rows of that batch (a grain ``map`` function).

  Picklable (grain spawns workers and cloudpickles the dataset); caches are per process.
  """

  def __init__(self, examples: Sequence[Example], plan: BucketPlan, *, seed: int,
               start_epoch: int, process_index: int, process_count: int, normalize: bool,
               min_sample_size: int, sample_rate: int, batch_fn):
    self.paths = [e.path for e in examples]
    self.keys = [e.key for e in examples]
    self.texts = [e.transcript for e in examples]
    self.lengths = np.asarray([e.num_samples for e in examples], np.int64)
    self.plan = plan
    self.seed, self.start_epoch = int(seed) % 2**64, int(start_epoch)  # SeedSequence: >= 0
    self.p, self.P = int(process_index), int(process_count)
    self.normalize, self.min_sample_size = bool(normalize), int(min_sample_size or 0)
    self.sample_rate = int(sample_rate)
    self.batch_fn = batch_fn
    self._init_caches()

  def _init_caches(self):
    self._lock = threading.Lock()
    self._epoch_cache: dict[int, Any] = {}
    self._known_bad: dict[int, str] = {}  # example index → reason; bad files stay bad

  def __getstate__(self):
    state = dict(self.__dict__)
    for k in ("_lock", "_epoch_cache", "_known_bad"):
      state.pop(k)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_caches()

  def _epoch(self, epoch: int):
    with self._lock:
      if epoch not in self._epoch_cache:
        if len(self._epoch_cache) >= 2:
          self._epoch_cache.pop(min(self._epoch_cache))
        self._epoch_cache[epoch] = epoch_batches(self.plan, self.seed, epoch)
      return self._epoch_cache[epoch]

  def _load(self, idx: int, min_samples: int) -> np.ndarray:
    reason = self._known_bad.get(idx)
    if reason is not None:
      raise BadAudioError(self.paths[idx], reason, "cached")
    try:
      return sources.load_waveform(self.paths[idx], target_sr=self.sample_rate,
                                   min_samples=min_samples)
    except BadAudioError as e:
      self._known_bad[idx] = e.reason
      raise

  def __call__(self, i: int) -> dict:
    total = self.plan.total_batches
    epoch, j = self.start_epoch + int(i) // total, int(i) % total
    batches, orders = self._epoch(epoch)
    k, start = batches[j]
    s, r_global, order = self.plan.buckets[k], self.plan.rows[k], orders[k]
    n, crop = len(order), self.plan.mode == "crop"
    b = r_global // self.P
    row0 = self.p * b
    # Crop mode: the clip must cover the bucket; pad mode: the configured minimum.
    min_samples = s if crop else self.min_sample_size
    audio = np.zeros((b, s), np.float32)
    valid = np.zeros((b,), np.int64)
    bad = collections.Counter()
    keys, texts = [], []
    for r in range(b):
      g = row0 + r
      rng = np.random.default_rng([_CROP, self.seed, epoch, j, g])
      for attempt in range(n):
        # A bad clip is replaced by the next clip of the same bucket's shuffled list (wrapping),
        # so the batch keeps its shape and the choice is the same on every run.
        idx = int(order[(start + g + attempt) % n])
        try:
          wav = self._load(idx, min_samples)
          break
        except BadAudioError as e:
          bad[e.reason] += 1
      else:
        raise RuntimeError(f"every clip of bucket {s} failed to load: {dict(bad)}")
      if self.normalize:
        wav = audio_io.normalize_waveform(wav)  # whole utterance, before cropping (fairseq)
      if wav.size > s:
        off = int(rng.integers(0, wav.size - s + 1))
        wav = wav[off:off + s]
      audio[r, :wav.size] = wav
      valid[r] = wav.size
      keys.append(self.keys[idx])
      texts.append(self.texts[idx])
    rows = order[(start + np.arange(r_global)) % n]
    planned = np.full((r_global,), s, np.int64) if crop else np.minimum(self.lengths[rows], s)
    batch = {
        "audio": audio,
        "padding_mask": np.arange(s)[None, :] >= valid[:, None],
        "_bad": dict(bad),
        "_valid_samples": valid,
        "_global_valid_samples": planned,
        "_row_offset": row0,
        "_keys": keys,
        "_transcripts": texts,
        "_epoch": epoch,
        "_index": j,
    }
    if self.batch_fn is not None:
      # Same generator on every process (no process index): hooks draw for all global rows and
      # keep theirs, so the assembled global batch does not depend on the process count.
      batch = self.batch_fn(np.random.default_rng([_HOOK, self.seed, epoch, j]), batch)
    return batch


@dataclasses.dataclass(frozen=True)
class SpeechMaskFn:
  """``batch_fn`` adding ``mask`` bool ``[B, T]`` (span mask, fairseq-spec §2.1; True = masked).

  Masks are drawn for the whole global batch from the planned valid lengths
  (``_global_valid_samples``) and this process keeps its rows, so every process agrees on the
  per-row masked count (``require_same_masks``, needed for the static d2v2 student gather). Frames
  beyond a row's actual valid length are never masked (a replaced clip in pad mode can be shorter
  than planned; only then can counts differ).
  """
  mask_prob: float
  mask_length: int
  min_masks: int = 1
  require_same_masks: bool = True
  mask_dropout: float = 0.0

  def __call__(self, rng: np.random.Generator, batch: dict) -> dict:
    audio = batch["audio"]
    b, s = audio.shape
    t = num_frames(s)
    local = batch.get("_valid_samples")
    if local is None:
      local = s - batch["padding_mask"].sum(axis=1)
    planned = batch.get("_global_valid_samples", local)
    off = int(batch.get("_row_offset", 0))
    mask = masking.span_mask(rng, num_frames(np.asarray(planned)), t, mask_prob=self.mask_prob,
                             mask_length=self.mask_length, min_masks=self.min_masks,
                             require_same_masks=self.require_same_masks,
                             mask_dropout=self.mask_dropout)[off:off + b]
    mask &= np.arange(t)[None, :] < num_frames(np.asarray(local))[:, None]
    return {**batch, "mask": mask}


def speech_mask_fn(mask_cfg) -> SpeechMaskFn:
  """Builds the pre-training mask hook from any object/dict with ``mask_prob``, ``mask_length``
  and optionally ``min_masks`` (1), ``require_same_masks`` (True), ``mask_dropout`` (0)."""
  return SpeechMaskFn(
      mask_prob=float(_get(mask_cfg, "mask_prob")), mask_length=int(_get(mask_cfg, "mask_length")),
      min_masks=int(_get(mask_cfg, "min_masks", 1)),
      require_same_masks=bool(_get(mask_cfg, "require_same_masks", True)),
      mask_dropout=float(_get(mask_cfg, "mask_dropout", 0.0) or 0.0))


def make_speech_dataset(data_cfg, *, examples: Sequence[Example], seed: int | None = None,
                        batch_multiple: int = 1, process_index: int = 0, process_count: int = 1,
                        batch_fn: Callable[[np.random.Generator, dict], dict] | None = None,
                        num_epochs: int | None = None, start_epoch: int = 0
                        ) -> grain.IterDataset:
  """The pipeline as a grain ``IterDataset`` (see ``make_speech_iterator`` for the arguments)."""
  if batch_multiple % process_count:
    raise ValueError(f"batch_multiple={batch_multiple} (data-parallel devices) must be a multiple "
                     f"of process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  seed = int(_get(data_cfg, "seed", 0) if seed is None else seed)
  plan = plan_from_config(data_cfg, examples, batch_multiple)
  if plan.total_batches == 0:
    raise ValueError(
        f"no complete batch: {len(examples)} examples, bucket sizes "
        f"{[len(m) for m in plan.members]} for rows {list(plan.rows)} per batch "
        f"(buckets {list(plan.buckets)}, budget_samples {_get(data_cfg, 'budget_samples')}); "
        "lower budget_samples/max_rows or add data")
  sample_rate = int(_get(data_cfg, "sample_rate", audio_io.SAMPLE_RATE) or audio_io.SAMPLE_RATE)
  if sample_rate != audio_io.SAMPLE_RATE:
    raise ValueError(f"data.sample_rate={sample_rate}: the model expects {audio_io.SAMPLE_RATE}")
  loader = _BatchLoader(
      examples, plan, seed=seed, start_epoch=start_epoch, process_index=process_index,
      process_count=process_count, normalize=bool(_get(data_cfg, "normalize", False)),
      min_sample_size=int(_get(data_cfg, "min_sample_size", 0) or 0), sample_rate=sample_rate,
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
  logging.info("speech pipeline: %s", describe_shapes(data_cfg, examples, batch_multiple))
  return ids


def make_speech_iterator(data_cfg, *, examples: Sequence[Example], seed: int | None = None,
                         batch_multiple: int = 1, process_index: int = 0, process_count: int = 1,
                         batch_fn: Callable[[np.random.Generator, dict], dict] | None = None,
                         num_epochs: int | None = None, start_epoch: int = 0):
  """Iterator over this process's share of the global speech batches.

  Args:
    data_cfg: see the module docstring for the fields.
    examples: from ``examples_from_config`` (must be the same list, in the same order, on every
      process).
    seed: data seed (default ``data_cfg.seed``); order, crops and hook randomness are pure
      functions of ``(seed, epoch, batch index, global row)``.
    batch_multiple: data-parallel device count; rows per batch are multiples of it.
    process_index, process_count: this host's slice of each global batch (rows
      ``[p*R/P, (p+1)*R/P)``); ``batch_multiple`` must be a multiple of ``process_count``.
    batch_fn: ``(rng: np.random.Generator, batch: dict) -> dict`` hook, e.g.
      ``speech_mask_fn(cfg.model)``; must be picklable when ``num_workers > 0``.
    num_epochs: None = endless, else stop after that many epochs.
    start_epoch: epoch of the first element (element i is epoch ``start_epoch + i // n``).

  Returns:
    A grain ``DatasetIterator`` yielding batch dicts (module docstring); ``get_state()`` /
    ``set_state()`` resume at exactly the next batch, and the iterator can be saved with orbax
    via ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``.
  Remember the iterator of a multi-worker pipeline holds processes: call ``close()`` when done.
  """
  return iter(make_speech_dataset(
      data_cfg, examples=examples, seed=seed, batch_multiple=batch_multiple,
      process_index=process_index, process_count=process_count, batch_fn=batch_fn,
      num_epochs=num_epochs, start_epoch=start_epoch))
