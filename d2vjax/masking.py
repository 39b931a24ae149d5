"""Host-side masks in pure NumPy (never JAX: masks are built in data workers, see jax-style §4).

Every function takes a ``numpy.random.Generator`` and returns fixed-shape boolean arrays, so the
jitted step sees one shape per bucket and never recompiles.

Semantics follow fairseq's ``compute_mask_indices`` (fairseq-spec §2.1, pitfalls §11.1–3).
"""

from __future__ import annotations

import numpy as np

__all__ = ["span_mask", "expected_span_starts"]


def expected_span_starts(length: int, mask_prob: float, mask_length: int) -> float:
  """Expected number of spans for a row of ``length`` valid frames (before ``min_masks``).

  ``mask_prob`` is a span-START rate per frame divided by ``mask_length`` (fairseq semantics):
  p=0.65, L=10 gives 0.065 starts per frame and about 49 % of frames masked after overlaps merge.
  """
  return mask_prob * length / mask_length


def _row_span_mask(rng: np.random.Generator, size: int, mask_prob: float, mask_length: int,
                   min_masks: int) -> np.ndarray:
  """Masked frame indices (sorted, unique) for one row with ``size`` valid frames."""
  if size <= 0:
    return np.zeros((0,), np.int64)
  # Probabilistic rounding of the expected number of spans (spec §2.1 step 2).
  num_spans = int(mask_prob * size / float(mask_length) + rng.random())
  num_spans = max(min_masks, num_spans)
  if num_spans == 0:
    return np.zeros((0,), np.int64)
  span_len = mask_length
  start_range = size - span_len
  if start_range <= num_spans:
    # fairseq's short-input path: starts come from [0, num_spans + 1) and spans are truncated.
    start_range = num_spans + 1
  num_spans = min(num_spans, start_range)
  starts = rng.choice(start_range, num_spans, replace=False)
  idx = (starts[:, None] + np.arange(span_len)[None, :]).reshape(-1)
  # The last valid frame is never masked: guaranteed by the start range in the regular path, and
  # enforced here for the short-input path (which fairseq leaves to an assertion).
  idx = idx[idx < size - 1]
  return np.unique(idx)


def span_mask(rng: np.random.Generator, lengths, num_frames: int, *, mask_prob: float,
              mask_length: int, min_masks: int = 1, require_same_masks: bool = True,
              mask_dropout: float = 0.0) -> np.ndarray:
  """Span mask over frames, fairseq ``compute_mask_indices`` (static lengths, overlaps merged).

  Args:
    rng: the only source of randomness; the same generator state gives the same mask.
    lengths: int ``[B]``, valid (unpadded) frames of each row; frames ``>= lengths[i]`` are
      padding and are never masked.
    num_frames: T, the static (bucketed) number of frames of the batch.
    mask_prob: span-start rate times ``mask_length`` (fairseq ``mask_prob``; 0.65 → ≈49 % masked
      for ``mask_length`` 10). Not the masked fraction.
    mask_length: span length in frames.
    min_masks: lower bound on the number of spans per row (wav2vec 2.0: 2; data2vec: 1).
    require_same_masks: give every row the same number of masked frames by keeping a random
      subset of the larger rows' masked frames (fairseq default; spans get fragmented).
    mask_dropout: fraction of each row's masked frames to unmask afterwards (default 0).

  Returns:
    bool ``[B, num_frames]``, True = masked.
  """
  lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
  if np.any(lengths > num_frames):
    raise ValueError(f"span_mask: lengths {lengths.max()} exceed num_frames {num_frames}")
  if mask_length < 1:
    raise ValueError(f"span_mask: mask_length must be >= 1, got {mask_length}")
  rows = [_row_span_mask(rng, int(n), mask_prob, mask_length, min_masks) for n in lengths]
  if require_same_masks and rows:
    target = min(len(r) for r in rows)
    rows = [r if len(r) == target else np.sort(rng.choice(r, target, replace=False)) for r in rows]
  if mask_dropout > 0:
    rows = [np.sort(rng.choice(r, len(r) - int(round(len(r) * mask_dropout)), replace=False))
            for r in rows]
  mask = np.zeros((len(lengths), num_frames), dtype=bool)
  for i, r in enumerate(rows):
    mask[i, r] = True
  return mask
