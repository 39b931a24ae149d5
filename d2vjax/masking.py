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


# ---- text (BERT and span masking)
# Token-level masks for data2vec 1.0 text (fairseq MaskTokensDataset, fairseq-spec §2.3; data2vec
# §4.3). They return the corrupted ids as well as the loss mask, both with the input's fixed shape.


def _row_choice(rng: np.random.Generator, candidates: np.ndarray, rate: float) -> np.ndarray:
  """fairseq's count ``floor(rate · n + u)`` (probabilistic rounding) of distinct picks from
  ``candidates`` (n of them), uniformly without replacement."""
  n = candidates.size
  num = min(n, int(rate * n + rng.random()))
  return rng.choice(candidates, num, replace=False) if num else candidates[:0]


def bert_mask(rng: np.random.Generator, tokens, padding_mask, *, mask_prob: float = 0.15,
              mask_token_id: int, vocab_size: int, special_ids, leave_unmasked_prob: float = 0.1,
              random_token_prob: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """BERT / RoBERTa masking (data2vec §4.3: 15 % of the tokens, 80 % ``<mask>``, 10 % random,
  10 % unchanged), with fairseq MaskTokensDataset's draws (spec §2.3).

  Per row: ``num = floor(mask_prob · n + u)`` positions are chosen without replacement among the
  n candidates (not padding, not a special id: BOS/EOS/pad/unk/mask are never chosen, as in BERT;
  fairseq would also pick ``<s>``/``</s>``). Each chosen position is, with probability
  ``leave_unmasked_prob + random_token_prob``, either left unchanged or (in the ratio of the two
  probabilities) replaced by a uniformly drawn regular (non-special) id; otherwise by
  ``mask_token_id``. Every chosen position is in the loss, as in BERT (fairseq's data2vec model
  would find only the ``<mask>`` ones, ``src == <mask>``; its span config never leaves any out).

  Args:
    rng: the only source of randomness.
    tokens: int ``[B, T]``; padding_mask: bool ``[B, T]`` (True = pad).
    mask_prob: share of candidate tokens chosen (0.15).
    mask_token_id: id of ``<mask>``; vocab_size: ids are ``[0, vocab_size)``.
    special_ids: ids never chosen and never drawn as random replacements.
    leave_unmasked_prob, random_token_prob: shares of the chosen positions (0.1 each).
  Returns:
    ``(masked_tokens int32 [B, T], mask bool [B, T])``.
  """
  tokens = np.asarray(tokens)
  pad = np.asarray(padding_mask, bool)
  special = np.asarray(sorted(set(int(s) for s in special_ids)), np.int64)
  regular = np.setdiff1d(np.arange(int(vocab_size)), special)
  cand = ~pad & ~np.isin(tokens, special)
  chosen = np.zeros(tokens.shape, bool)
  for r in range(tokens.shape[0]):
    chosen[r, _row_choice(rng, np.flatnonzero(cand[r]), mask_prob)] = True
  out = tokens.astype(np.int32, copy=True)
  rand_or_unmask_prob = leave_unmasked_prob + random_token_prob
  unmask = rand = np.zeros(tokens.shape, bool)
  if rand_or_unmask_prob > 0:
    rand_or_unmask = chosen & (rng.random(tokens.shape) < rand_or_unmask_prob)
    if random_token_prob == 0:
      unmask = rand_or_unmask
    elif leave_unmasked_prob == 0:
      rand = rand_or_unmask
    else:
      decision = rng.random(tokens.shape) < leave_unmasked_prob / rand_or_unmask_prob
      unmask, rand = rand_or_unmask & decision, rand_or_unmask & ~decision
  out[chosen & ~unmask & ~rand] = mask_token_id
  if rand.any():
    out[rand] = rng.choice(regular, int(rand.sum()))
  return out, chosen


def span_text_mask(rng: np.random.Generator, tokens, padding_mask, *, mask_prob: float = 0.35,
                   span_length: int = 4, mask_token_id: int, special_ids=(),
                   mask_special: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Span masking of token ids, fairseq MaskTokensDataset with ``mask_multiple_length`` (spec §2.3;
  data2vec §4.3 "wav2vec 2.0 masking": spans of 4, mask_prob 0.35, nothing left unmasked).

  Per row with ``sz`` valid (non-pad) positions: ``num = floor(mask_prob · sz / span_length + u)``
  distinct starts uniformly from ``[0, sz)``; each masks ``span_length`` positions, indices past
  the row's end are dropped and overlaps merge (so fewer than ``mask_prob`` of the ids end up
  masked). Every masked position becomes ``mask_token_id``. With ``mask_special`` (fairseq) the
  spans also cover ``<s>``/``</s>``; with False, special ids are taken out of the mask afterwards.

  Args:
    tokens: int ``[B, T]``; padding_mask: bool ``[B, T]`` (True = pad, never masked).
  Returns:
    ``(masked_tokens int32 [B, T], mask bool [B, T])``.
  """
  if span_length < 1:
    raise ValueError(f"span_text_mask: span_length must be >= 1, got {span_length}")
  tokens = np.asarray(tokens)
  pad = np.asarray(padding_mask, bool)
  mask = np.zeros(tokens.shape, bool)
  for r in range(tokens.shape[0]):
    valid = np.flatnonzero(~pad[r])
    sz = valid.size
    if sz == 0:
      continue
    num = min(sz, int(mask_prob * sz / float(span_length) + rng.random()))
    starts = rng.choice(sz, num, replace=False)
    idx = (starts[:, None] + np.arange(span_length)[None, :]).reshape(-1)
    mask[r, valid[idx[idx < sz]]] = True
  if not mask_special:
    mask &= ~np.isin(tokens, np.asarray(list(special_ids), np.int64))
  out = np.where(mask, mask_token_id, tokens).astype(np.int32)
  return out, mask


__all__ += ["bert_mask", "span_text_mask"]
