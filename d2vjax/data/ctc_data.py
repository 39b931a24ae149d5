"""Labelled speech for CTC fine-tuning: example filtering, static label shapes, the batch hook that
adds labels and fine-tuning masks, and complete (nothing dropped) evaluation batches.

Host-side NumPy. The training batches come from ``pipeline.make_speech_iterator`` in ``'pad'``
mode (each clip zero-padded to the smallest bucket that holds it) with ``CtcBatchFn`` as its
``batch_fn``; evaluation batches come from ``eval_batches``, which visits every utterance exactly
once (the training plan drops incomplete batches).

Batch keys added to the pipeline's contract (B rows, S samples, T = num_frames(S) frames,
L = the bucket's label length, D = model width):

  labels         int32 ``[B, L]``  label ids, right-padded with ``asr.BLANK``
  label_padding  bool ``[B, L]``   True = padding (optax ``label_paddings``)
  mask           bool ``[B, T]``   time mask (spec §2.1; all False in evaluation)
  channel_mask   bool ``[B, D]``   channel mask, broadcast over time (spec §2.2)
  row_valid      bool ``[B]``      False for the filler rows of a last evaluation batch
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from typing import Iterator, Sequence

import numpy as np

from d2vjax import asr, masking
from d2vjax.data import audio_io, pipeline, sources
from d2vjax.data.audio_io import num_frames
from d2vjax.data.sources import Example

__all__ = ["asr_examples", "label_lengths", "CtcBatchFn", "eval_batches", "LABEL_MULTIPLE"]

_get = sources._get
# Label lengths are rounded up to a multiple of this, so a corpus change of a few characters does
# not change the compiled shapes.
LABEL_MULTIPLE = 8


def asr_examples(data_cfg, split: str) -> tuple[list[Example], dict[str, int]]:
  """The usable labelled examples of ``split`` and the counts of the ones dropped, by reason.

  On top of ``examples_from_config``'s filters (unreadable, too short, below ``min_sample_size``):
  ``no_transcript`` (empty transcript), ``above_largest_bucket`` (a labelled clip cannot be cropped
  without breaking its transcript, so it is dropped; fairseq has no such limit because it pads to
  the batch's longest clip), and ``label_longer_than_frames`` (more label units than CNN frames:
  CTC cannot align them; fairseq would produce an infinite loss and zero it).

  Raises ValueError when the source has no transcripts at all (fine-tuning needs them).
  """
  examples, skipped = pipeline.examples_from_config(data_cfg, split)
  if examples and all(e.transcript is None for e in examples):
    raise ValueError(
        f"data split {split!r} (source {_get(data_cfg, 'source')!r}) has no transcripts: CTC "
        "fine-tuning needs a .wrd file beside the manifest (fairseq layout) or LibriSpeech "
        "*.trans.txt files in the folder")
  largest = max(int(b) for b in _get(data_cfg, "buckets"))
  counts = collections.Counter(skipped)
  kept = []
  for e in examples:
    n_units = len(asr.text_units(e.transcript or ""))
    if n_units == 0:
      counts["no_transcript"] += 1
    elif e.num_samples > largest:
      counts["above_largest_bucket"] += 1
    elif n_units > num_frames(e.num_samples):
      counts["label_longer_than_frames"] += 1
    else:
      kept.append(e)
  return kept, dict(counts)


def _bucket_of(num_samples: int, buckets: Sequence[int]) -> int:
  """Smallest bucket >= the clip (pad mode); clips above the largest were filtered."""
  i = int(np.searchsorted(np.asarray(buckets), num_samples, side="left"))
  return int(buckets[min(i, len(buckets) - 1)])


def label_lengths(data_cfg, example_lists: Sequence[Sequence[Example]]) -> dict[int, int]:
  """Static label length L per bucket: the longest label among the given examples (all splits
  that will be batched, so training and evaluation share shapes) in that bucket, rounded up to a
  multiple of ``LABEL_MULTIPLE`` and capped at the bucket's frame count; at least 8.

  A bucket of S samples can hold at most ``num_frames(S)`` units (longer labels were filtered),
  but characters run at ~15/s against 50 frames/s, so this is usually about a third of it, and
  CTC's ``[B, T, L]`` emission tensor shrinks accordingly.
  """
  buckets = [int(b) for b in _get(data_cfg, "buckets")]
  longest = {b: 0 for b in buckets}
  for examples in example_lists:
    for e in examples:
      b = _bucket_of(e.num_samples, buckets)
      longest[b] = max(longest[b], len(asr.text_units(e.transcript or "")))
  out = {}
  for b in buckets:
    want = -(-max(longest[b], 1) // LABEL_MULTIPLE) * LABEL_MULTIPLE
    out[b] = int(min(max(want, LABEL_MULTIPLE), num_frames(b)))
  return out


def _encode_labels(vocab: asr.Vocabulary, transcripts, length: int) -> tuple[np.ndarray,
                                                                              np.ndarray]:
  b = len(transcripts)
  labels = np.full((b, length), asr.BLANK, np.int32)
  padding = np.ones((b, length), bool)
  for i, t in enumerate(transcripts):
    ids = vocab.encode(t or "")[:length]  # never cut: longer labels were filtered
    labels[i, :ids.size] = ids
    padding[i, :ids.size] = False
  return labels, padding


@dataclasses.dataclass(frozen=True)
class CtcBatchFn:
  """``batch_fn`` for the speech pipeline: labels plus time and channel masks (picklable).

  Time masks: ``compute_mask_indices`` over each row's valid frames (spec §2.1) with the
  fine-tuning ``mask_prob``/``mask_length``/``min_masks``; channel masks: the same function over
  the D channels with ``min_masks=0`` (spec §2.2), one mask per row broadcast over time. Both are
  drawn for the whole global batch and sliced to this process's rows, like
  ``pipeline.SpeechMaskFn``, so the result does not depend on the process count.

  Attributes:
    vocab: label vocabulary.
    label_len: ``((bucket_samples, L), ...)`` static label lengths (``label_lengths``).
    dim: model width D (channel mask length).
    mask_prob, mask_length, min_masks, require_same_masks: time masks (0 prob = none).
    channel_prob, channel_length: channel masks (0 prob = none).
  """
  vocab: asr.Vocabulary
  label_len: tuple[tuple[int, int], ...]
  dim: int
  mask_prob: float = 0.0
  mask_length: int = 10
  min_masks: int = 1
  require_same_masks: bool = True
  channel_prob: float = 0.0
  channel_length: int = 64

  def __call__(self, rng: np.random.Generator, batch: dict) -> dict:
    audio = batch["audio"]
    b, s = audio.shape
    lengths = dict(self.label_len)
    if s not in lengths:
      raise ValueError(f"no label length for bucket {s}; known {sorted(lengths)}")
    labels, label_padding = _encode_labels(self.vocab, batch["_transcripts"], lengths[s])
    off = int(batch.get("_row_offset", 0))
    planned = np.asarray(batch.get("_global_valid_samples", batch["_valid_samples"]))
    t = num_frames(s)
    if self.mask_prob > 0:
      mask = masking.span_mask(rng, num_frames(planned), t, mask_prob=self.mask_prob,
                               mask_length=self.mask_length, min_masks=self.min_masks,
                               require_same_masks=self.require_same_masks)[off:off + b]
      # A replaced (bad) clip may be shorter than planned: never mask its padding.
      mask &= np.arange(t)[None, :] < num_frames(np.asarray(batch["_valid_samples"]))[:, None]
    else:
      mask = np.zeros((b, t), bool)
    if self.channel_prob > 0:
      rows = planned.shape[0]
      channel_mask = masking.span_mask(rng, np.full((rows,), self.dim), self.dim,
                                       mask_prob=self.channel_prob,
                                       mask_length=self.channel_length, min_masks=0,
                                       require_same_masks=True)[off:off + b]
    else:
      channel_mask = np.zeros((b, self.dim), bool)
    return {**batch, "labels": labels, "label_padding": label_padding, "mask": mask,
            "channel_mask": channel_mask, "row_valid": np.ones((b,), bool)}


def eval_batches(data_cfg, examples: Sequence[Example], batch_fn: CtcBatchFn, *,
                 batch_multiple: int = 1, process_index: int = 0, process_count: int = 1,
                 num_threads: int = 4) -> Iterator[dict]:
  """Every example exactly once, in bucket order, as fixed-shape batches (the training shapes).

  Each bucket's examples (in list order) are cut into batches of the training plan's rows; the
  last one is topped up with filler rows (zero audio, fully padded, ``row_valid`` False, empty
  transcript). Audio is decoded with ``num_threads`` threads and normalised as in training. A
  clip that fails to decode is counted in ``_bad`` and becomes a filler row (evaluation must not
  silently substitute another utterance). ``batch_fn`` should have zero mask probabilities.

  Yields host batches with the training keys plus ``row_valid``; ``_transcripts`` and ``_keys``
  hold this process's rows, ``_global_transcripts`` and ``_global_keys`` every row of the global
  batch (filler rows: ""), in the order of the gathered outputs.
  """
  plan = pipeline.plan_from_config(data_cfg, examples, batch_multiple)
  normalize = bool(_get(data_cfg, "normalize", False))
  sample_rate = int(_get(data_cfg, "sample_rate", audio_io.SAMPLE_RATE) or audio_io.SAMPLE_RATE)
  p, pc = int(process_index), int(process_count)

  def load(ex: Example):
    try:
      wav = sources.load_waveform(ex.path, target_sr=sample_rate)
    except audio_io.BadAudioError as e:
      return None, e.reason
    return (audio_io.normalize_waveform(wav) if normalize else wav), None

  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    for k, s in enumerate(plan.buckets):
      members = [examples[i] for i in plan.members[k]]
      rows = plan.rows[k]
      local = rows // pc
      for start in range(0, len(members), rows):
        chunk = members[start:start + rows]
        mine = chunk[p * local:(p + 1) * local]
        audio = np.zeros((local, s), np.float32)
        valid = np.zeros((local,), np.int64)
        row_valid = np.zeros((local,), bool)
        bad: collections.Counter = collections.Counter()
        texts, keys = [""] * local, [""] * local
        for r, (wav, reason) in enumerate(pool.map(load, mine)):
          if wav is None:
            bad[reason] += 1
            continue
          wav = wav[:s]
          audio[r, :wav.size] = wav
          valid[r] = wav.size
          row_valid[r] = True
          texts[r], keys[r] = mine[r].transcript, mine[r].key
        planned = np.zeros((rows,), np.int64)
        planned[:len(chunk)] = [min(e.num_samples, s) for e in chunk]
        filler = [""] * (rows - len(chunk))
        batch = {"audio": audio, "padding_mask": np.arange(s)[None, :] >= valid[:, None],
                 "_valid_samples": valid, "_global_valid_samples": planned,
                 "_row_offset": p * local, "_transcripts": texts, "_keys": keys,
                 "_global_keys": [e.key for e in chunk] + filler,
                 "_global_transcripts": [e.transcript for e in chunk] + filler,
                 "_bad": dict(bad)}
        batch = batch_fn(np.random.default_rng(0), batch)
        batch["row_valid"] = row_valid
        yield batch
