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


# ---- images (BEiT block masking)


def beit_block_mask(rng: np.random.Generator, grid=(14, 14), num_masking_patches: int = 120,
                    min_num_patches: int = 16, max_num_patches: int | None = None,
                    min_aspect: float = 0.3, max_aspect: float | None = None, *,
                    return_blocks: bool = False):
  """BEiT block mask over a patch grid with EXACTLY ``num_masking_patches`` patches masked.

  The block loop is BEiT's ``MaskingGenerator`` (fairseq-spec §2.7; data2vec §4.1): while patches
  remain, up to 10 attempts per block draw a target area uniformly in
  ``[min_num_patches, min(remaining, max_num_patches)]`` and an aspect ratio log-uniformly in
  ``[min_aspect, max_aspect]`` (``max_aspect`` None → ``1 / min_aspect``), round
  ``h = round(sqrt(area·ratio))``, ``w = round(sqrt(area/ratio))``, keep only blocks strictly
  smaller than the grid on both sides, place the block at a uniform top-left corner, and accept it
  when it adds ``1 … remaining`` new patches; the loop ends when an attempt series adds nothing.

  Two deliberate differences (docs/semantics.md, vision), measured on 14×14 / 120 over 2000
  masks: the count is exact here and BEiT's mean is 119.5; the loop statistics are otherwise
  BEiT's (mean 0.5 patches topped up, 1.06 vs 1.14 regions per mask).
  1. BEiT also accepts isolated blocks smaller than ``min_num_patches`` (a rounded 2×7 for a target
     of 16, or areas in ``[remaining, min]`` near the end): 8.6 % of its masks have a region under
     16 patches. Here a block below the minimum is accepted only where it overlaps or borders
     the masked region, so it extends an existing region instead of starting a new one.
  2. BEiT stops when 10 attempts in a row add nothing, under-filling 32 % of the masks by a few
     patches (the count varies per image; PyTorch tolerates that, static shapes do not). Here the
     remainder is grown from the masked region one 4-neighbouring patch at a time (uniform among
     the border patches), so the count is exact and no isolated fragment appears.
  Hence every 4-connected masked region has ``>= min(num_masking_patches, min_num_patches)``
  patches: the first accepted block has the minimum area, later small blocks and grown patches
  attach to a region (when no block fits at all, the mask grows from one random patch).

  Args:
    rng: the only source of randomness (same state → same mask).
    grid: ``(Gh, Gw)`` patches (14×14 for 224-px images and 16-px patches).
    num_masking_patches: patches to mask (data2vec recipe: 120 of 196).
    min_num_patches: smallest block (data2vec recipe: 16).
    max_num_patches: largest block (None → ``num_masking_patches``; the recipe passes 196).
    min_aspect, max_aspect: aspect-ratio range of the blocks (BEiT: 0.3 … 1/0.3).
    return_blocks: also return the accepted blocks ``[(top, left, h, w), ...]`` and the number
      of patches added by growing.

  Returns:
    bool ``[Gh, Gw]`` (True = masked), or ``(mask, blocks, grown)`` with ``return_blocks``.
  """
  gh, gw = (int(g) for g in grid)
  n = int(num_masking_patches)
  if not 0 <= n <= gh * gw:
    raise ValueError(f"beit_block_mask: num_masking_patches={n} not in [0, {gh * gw}]")
  if min_num_patches < 1 or min_aspect <= 0:
    raise ValueError("beit_block_mask: min_num_patches must be >= 1 and min_aspect > 0")
  max_block = n if max_num_patches is None else int(max_num_patches)
  max_aspect = max_aspect or 1.0 / min_aspect
  log_lo, log_hi = float(np.log(min_aspect)), float(np.log(max_aspect))
  mask = np.zeros((gh, gw), bool)
  blocks = []
  count = 0
  while count < n:
    budget = min(n - count, max_block)
    added = 0
    for _ in range(10):
      # lo + (hi - lo)·U like Python's random.uniform, which BEiT relies on when budget < min.
      area = min_num_patches + (budget - min_num_patches) * rng.random()
      ratio = float(np.exp(log_lo + (log_hi - log_lo) * rng.random()))
      # Python's round (half to even), as BEiT.
      h = int(round(float(np.sqrt(area * ratio))))
      w = int(round(float(np.sqrt(area / ratio))))
      if not (w < gw and h < gh):
        continue
      top = int(rng.integers(0, gh - h + 1))
      left = int(rng.integers(0, gw - w + 1))
      new = h * w - int(mask[top:top + h, left:left + w].sum())
      if 0 < new <= budget and (h * w >= min_num_patches
                                or _touches(mask, top, left, h, w)):
        mask[top:top + h, left:left + w] = True
        blocks.append((top, left, h, w))
        added = new
        break
    if added == 0:
      break
    count += added
  grown = n - count
  if grown:
    _grow_mask(rng, mask, grown)
  if return_blocks:
    return mask, blocks, grown
  return mask


def _touches(mask: np.ndarray, top: int, left: int, h: int, w: int) -> bool:
  """Whether the block overlaps or 4-borders an already masked patch."""
  if mask[top:top + h, left:left + w].any():
    return True
  gh, gw = mask.shape
  return bool((top > 0 and mask[top - 1, left:left + w].any())
              or (top + h < gh and mask[top + h, left:left + w].any())
              or (left > 0 and mask[top:top + h, left - 1].any())
              or (left + w < gw and mask[top:top + h, left + w].any()))


def _grow_mask(rng: np.random.Generator, mask: np.ndarray, k: int) -> None:
  """Masks ``k`` more patches in place, each a uniform pick among the unmasked patches that touch
  a masked one (4-neighbourhood); an empty mask starts from a uniform random patch."""
  for _ in range(k):
    if not mask.any():
      border = ~mask
    else:
      near = np.zeros_like(mask)
      near[1:] |= mask[:-1]
      near[:-1] |= mask[1:]
      near[:, 1:] |= mask[:, :-1]
      near[:, :-1] |= mask[:, 1:]
      border = near & ~mask
    cand = np.flatnonzero(border)
    mask.flat[cand[int(rng.integers(0, cand.size))]] = True


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


# ---- data2vec 2.0 multi-masks (fairseq-spec §2.4, §2.5)
# One row per (sample, clone); every row of one kind and length has EXACTLY the same number of
# masked positions, so the student's gather of kept tokens has one static shape (spec §6.3).

V2_KINDS = ("block_1d", "block_2d", "random")


def _exact_count(rng: np.random.Generator, marked: np.ndarray, final: int) -> np.ndarray:
  """Trims/tops up a bool row in place to exactly ``final`` True entries: random excess marks are
  cleared (uniform over the marked), missing ones added uniformly among the unmarked (spec §2.4
  step 4; these extras are isolated positions, not blocks)."""
  on = np.flatnonzero(marked)
  if on.size > final:
    marked[rng.choice(on, on.size - final, replace=False)] = False
  elif on.size < final:
    off = np.flatnonzero(~marked)
    marked[rng.choice(off, final - on.size, replace=False)] = True
  return marked


def _block_prob(mask_prob: float, inverse: bool) -> float:
  """The fraction the blocks mark: the masked share, or with ``inverse`` the KEPT share."""
  return 1.0 - mask_prob if inverse else mask_prob


def block_mask_1d(rng: np.random.Generator, num_rows: int, length: int, *, mask_prob: float,
                  mask_length: int, mask_prob_adjust: float = 0.0,
                  inverse: bool = False) -> np.ndarray:
  """data2vec 2.0 1-D block mask (fairseq ``compute_block_mask_1d``, spec §2.4), one per row.

  With ``p = mask_prob`` (``1 - mask_prob`` if ``inverse``: blocks then mark what is KEPT):
  ``floor(length·(p + mask_prob_adjust) / mask_length)`` centres uniform WITH replacement in
  ``[0, length)``; each marks offsets ``-⌊k/2⌋ … k-1-⌊k/2⌋`` clamped into ``[0, length-1]``; then
  exactly ``floor(length·p)`` marks per row (random trim / single-position top-up); ``inverse``
  flips the result. Audio Base: p 0.5, k 5, adjust 0.05 → ``floor(0.11·T)`` centres,
  ``floor(T/2)`` masked frames.

  Returns:
    bool ``[num_rows, length]``, True = masked.
  """
  if mask_length < 1:
    raise ValueError(f"block_mask_1d: mask_length must be >= 1, got {mask_length}")
  p = _block_prob(mask_prob, inverse)
  centres = int(length * (p + mask_prob_adjust) / mask_length)
  final = int(length * p)
  offsets = np.arange(mask_length) - mask_length // 2
  out = np.zeros((num_rows, length), bool)
  for r in range(num_rows):
    c = rng.integers(0, length, size=centres)
    idx = np.clip(c[:, None] + offsets[None, :], 0, length - 1).reshape(-1)
    out[r, idx] = True
    _exact_count(rng, out[r], final)
  return ~out if inverse else out


def block_mask_2d(rng: np.random.Generator, num_rows: int, side: int, *, mask_prob: float,
                  mask_length: int, mask_prob_adjust: float = 0.0,
                  inverse: bool = True) -> np.ndarray:
  """data2vec 2.0 2-D block mask on a ``side × side`` grid (``compute_block_mask_2d``, spec §2.4).

  As ``block_mask_1d`` with ``floor(L·(p + adjust) / k²)`` centres (L = side²), each marking the
  ``k × k`` square at offsets ``-⌊k/2⌋ … k-1-⌊k/2⌋``, row and column clamped independently into
  the grid, then exactly ``floor(L·p)`` marks. Image Base (``inverse``, mask_prob 0.8, k 3,
  adjust 0.07): 5 centres, 39 of 196 patches KEPT, 157 masked.

  Returns:
    bool ``[num_rows, side·side]`` in row-major grid order, True = masked.
  """
  if mask_length < 1:
    raise ValueError(f"block_mask_2d: mask_length must be >= 1, got {mask_length}")
  length = side * side
  p = _block_prob(mask_prob, inverse)
  centres = int(length * (p + mask_prob_adjust) / mask_length ** 2)
  final = int(length * p)
  off = np.arange(mask_length) - mask_length // 2
  out = np.zeros((num_rows, length), bool)
  for r in range(num_rows):
    c = rng.integers(0, length, size=centres)
    rows = np.clip((c // side)[:, None, None] + off[None, :, None], 0, side - 1)
    cols = np.clip((c % side)[:, None, None] + off[None, None, :], 0, side - 1)
    out[r, (rows * side + cols).reshape(-1)] = True
    _exact_count(rng, out[r], final)
  return ~out if inverse else out


def random_mask(rng: np.random.Generator, num_rows: int, length: int, *,
                mask_prob: float) -> np.ndarray:
  """MAE random masking (fairseq ``random_masking``, spec §2.5): per row the
  ``floor(length·(1 - mask_prob))`` positions with the smallest U(0, 1) noise are kept, the rest
  masked (padding and BOS/EOS are not excluded, as in fairseq). Text Base: 512 → 266 kept.

  Returns:
    bool ``[num_rows, length]``, True = masked.
  """
  keep = int(length * (1.0 - mask_prob))
  order = np.argsort(rng.random((num_rows, length)), axis=1, kind="stable")
  out = np.ones((num_rows, length), bool)
  np.put_along_axis(out, order[:, :keep], False, axis=1)
  return out


def multi_mask(rng: np.random.Generator, kind: str, num_rows: int, length: int, *,
               mask_prob: float, mask_length: int = 1, mask_prob_adjust: float = 0.0,
               inverse: bool = False) -> np.ndarray:
  """``num_rows`` data2vec 2.0 masks of ``kind`` ∈ ``V2_KINDS`` over ``length`` positions
  (``block_2d`` needs a square ``length``). bool ``[num_rows, length]``, True = masked."""
  if kind == "block_1d":
    return block_mask_1d(rng, num_rows, length, mask_prob=mask_prob, mask_length=mask_length,
                         mask_prob_adjust=mask_prob_adjust, inverse=inverse)
  if kind == "block_2d":
    side = int(round(length ** 0.5))
    if side * side != length:
      raise ValueError(f"block_2d masks need a square grid, got {length} positions")
    return block_mask_2d(rng, num_rows, side, mask_prob=mask_prob, mask_length=mask_length,
                         mask_prob_adjust=mask_prob_adjust, inverse=inverse)
  if kind == "random":
    return random_mask(rng, num_rows, length, mask_prob=mask_prob)
  raise ValueError(f"masking.kind must be one of {V2_KINDS}, got {kind!r}")


def num_kept(kind: str, length: int, *, mask_prob: float, inverse: bool = False) -> int:
  """Positions every ``multi_mask`` row of ``kind`` leaves unmasked (a static shape: the
  student's ``T_keep``). block: ``length - floor(length·p)``, or ``floor(length·(1-p))`` with
  ``inverse``; random: ``floor(length·(1-p))``."""
  if kind not in V2_KINDS:
    raise ValueError(f"masking.kind must be one of {V2_KINDS}, got {kind!r}")
  if kind == "random" or inverse:
    return int(length * (1.0 - mask_prob))
  return length - int(length * mask_prob)


__all__ += ["V2_KINDS", "block_mask_1d", "block_mask_2d", "random_mask", "multi_mask",
            "num_kept"]
