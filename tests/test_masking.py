"""Span masking (d2vjax.masking.span_mask) against fairseq's compute_mask_indices
(fairseq-spec §2.1, pitfalls §11.1-3) and the edge cases of user-needs B1/B2.

Pure NumPy: no JAX, every test runs in well under a second.
"""

import numpy as np
import pytest

from d2vjax import masking


def _runs(row: np.ndarray) -> np.ndarray:
  """Lengths of the maximal runs of True in a 1-D bool array."""
  d = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
  return np.flatnonzero(d == -1) - np.flatnonzero(d == 1)


def _fairseq_compute_mask_indices(rng, lengths, num_frames, mask_prob, mask_length, min_masks,
                                  require_same_masks):
  """Independent re-implementation of fairseq ``compute_mask_indices`` (static spans, no_overlap
  False, mask_dropout 0, add_masks False), written from fairseq-spec §2.1, one row at a time.

  It draws from ``rng`` in fairseq's order: per row one uniform for the probabilistic rounding and
  one ``choice`` without replacement for the span starts; then, after all rows, one ``choice`` per
  row that has more masked frames than the minimum.
  """
  mask_idcs = []
  for sz in lengths:
    num_mask = int(mask_prob * sz / float(mask_length) + rng.random())
    num_mask = max(min_masks, num_mask)
    span_lengths = np.full(num_mask, mask_length)
    min_len = min(span_lengths)
    if sz - min_len <= num_mask:
      min_len = sz - num_mask - 1
    mask_idc = rng.choice(sz - min_len, num_mask, replace=False)
    mask_idc = np.asarray([mask_idc[j] + offset for j in range(len(mask_idc))
                           for offset in range(span_lengths[j])])
    mask_idcs.append(np.unique(mask_idc[mask_idc < sz]))
  min_len = min(len(m) for m in mask_idcs)
  mask = np.zeros((len(lengths), num_frames), bool)
  for i, mask_idc in enumerate(mask_idcs):
    if len(mask_idc) > min_len and require_same_masks:
      mask_idc = rng.choice(mask_idc, min_len, replace=False)
    mask[i, mask_idc] = True
  return mask


def test_masked_fraction_and_span_length_statistics():
  # p=0.65, L=10 is a span-START rate: ~50.8 starts over 771 positions for T=781, spans overlap and
  # merge, so ~49 % of the frames end up masked (spec §2.1 "Expected coverage", pitfall §11.1) and
  # the merged runs average ~14.7 frames.
  # require_same_masks=False: with it, all 1000 rows would be trimmed to the smallest row's count
  # (individual frames dropped at random, spans fragmented), which biases both statistics down.
  rng = np.random.default_rng(0)
  t = 781
  mask = masking.span_mask(rng, np.full(1000, t), t, mask_prob=0.65, mask_length=10,
                           require_same_masks=False)
  assert mask.shape == (1000, t) and mask.dtype == bool
  assert abs(mask.mean() - 0.49) < 0.01, mask.mean()
  runs = np.concatenate([_runs(r) for r in mask])
  assert abs(runs.mean() - 14.7) < 0.4, runs.mean()
  # Number of spans per row = floor(50.765 + u) before merging: 50 or 51 starts, so every row has
  # between 10 (all merged) and 510 masked frames; the count is never below one span.
  assert mask.sum(1).min() >= 10 and mask.sum(1).max() <= 510


@pytest.mark.parametrize("require_same_masks", [True, False])
def test_never_masks_padding(require_same_masks):
  rng = np.random.default_rng(1)
  t = 200
  for mask_prob in (0.0, 0.3, 0.65, 1.0):
    lengths = rng.integers(1, t + 1, size=64)
    lengths[:3] = (t, 1, 11)
    mask = masking.span_mask(rng, lengths, t, mask_prob=mask_prob, mask_length=10,
                             require_same_masks=require_same_masks)
    pad = np.arange(t)[None, :] >= lengths[:, None]
    assert not np.any(mask & pad)
    if not require_same_masks:
      # The full-length row does get masked (min_masks=1). With require_same_masks the 1-frame
      # row (which can never be masked) trims every row to 0 frames, so nothing is asserted then.
      assert mask[0].sum() >= 10


def test_never_masks_last_valid_frame_and_never_raises():
  # User-needs B2: lengths 1..30 (short-input path) and longer, mask_prob 0..1, several span lengths
  # and min_masks: no exception, nothing at or beyond the last valid frame.
  rng = np.random.default_rng(2)
  t = 64
  short = np.arange(1, 31)
  long = rng.integers(31, t + 1, size=34)
  lengths = np.concatenate([short, long])
  checked = 0
  for mask_prob in np.linspace(0.0, 1.0, 11):
    for mask_length in (1, 2, 5, 10):
      for min_masks in (0, 1, 2):
        for same in (True, False):
          for _ in range(2):
            mask = masking.span_mask(rng, lengths, t, mask_prob=float(mask_prob),
                                     mask_length=mask_length, min_masks=min_masks,
                                     require_same_masks=same)
            assert mask.shape == (len(lengths), t)
            valid_or_last = np.arange(t)[None, :] >= (lengths[:, None] - 1)
            assert not np.any(mask & valid_or_last)
            checked += 1
  assert checked == 11 * 4 * 3 * 2 * 2


def test_require_same_masks_equal_counts_subset_of_spans():
  t = 300
  lengths = np.array([300, 280, 250, 200, 120, 300, 90, 150])
  free = masking.span_mask(np.random.default_rng(3), lengths, t, mask_prob=0.65, mask_length=10,
                           require_same_masks=False)
  same = masking.span_mask(np.random.default_rng(3), lengths, t, mask_prob=0.65, mask_length=10,
                           require_same_masks=True)
  counts = same.sum(1)
  assert np.all(counts == counts[0])
  # The span draws come first from the same stream, so equalising only drops frames: the equalised
  # row is a subset of the unequalised one and the common count is the smallest row's count.
  assert not np.any(same & ~free)
  assert counts[0] == free.sum(1).min()
  assert len(set(free.sum(1))) > 1  # the test is not vacuous


def test_min_masks():
  rng = np.random.default_rng(4)
  t = 120
  lengths = np.full(200, 100)
  # mask_prob 0: the span count is floor(0 + u) = 0, raised to min_masks.
  m1 = masking.span_mask(rng, lengths, t, mask_prob=0.0, mask_length=10, min_masks=1,
                         require_same_masks=False)
  assert np.all(m1.sum(1) == 10)
  assert all(list(_runs(r)) == [10] for r in m1)  # exactly one contiguous span
  m2 = masking.span_mask(rng, lengths, t, mask_prob=0.0, mask_length=10, min_masks=2,
                         require_same_masks=False)
  assert np.all(m2.sum(1) >= 10) and np.all(m2.sum(1) <= 20)
  assert np.mean(m2.sum(1) == 20) > 0.5  # two distinct starts mostly give two disjoint spans
  m0 = masking.span_mask(rng, lengths, t, mask_prob=0.0, mask_length=10, min_masks=0)
  assert not m0.any()


def test_mask_dropout_unmasks_rounded_fraction():
  lengths = np.array([200, 180, 150])
  full = masking.span_mask(np.random.default_rng(5), lengths, 200, mask_prob=0.65, mask_length=10)
  drop = masking.span_mask(np.random.default_rng(5), lengths, 200, mask_prob=0.65, mask_length=10,
                           mask_dropout=0.25)
  n = full.sum(1)
  np.testing.assert_array_equal(drop.sum(1), n - np.round(n * 0.25).astype(int))
  assert not np.any(drop & ~full)


def test_reproducible_per_seed():
  lengths = np.array([150, 120, 99, 60])
  kw = dict(mask_prob=0.65, mask_length=10)
  a = masking.span_mask(np.random.default_rng(7), lengths, 150, **kw)
  b = masking.span_mask(np.random.default_rng(7), lengths, 150, **kw)
  c = masking.span_mask(np.random.default_rng(8), lengths, 150, **kw)
  np.testing.assert_array_equal(a, b)
  assert np.any(a != c)


@pytest.mark.parametrize("mask_prob,min_masks,require_same_masks",
                         [(0.65, 1, True), (0.65, 1, False), (0.3, 2, True), (1.0, 1, True),
                          (0.05, 2, False)])
def test_matches_fairseq_reference_regular_path(mask_prob, min_masks, require_same_masks):
  rng = np.random.default_rng(9)
  t = 300
  lengths = rng.integers(60, t + 1, size=32)
  # Regular path only: sz - L > number of spans for every row (at most floor(p*sz/L + 1) spans).
  assert np.all(lengths - 10 > np.maximum(min_masks, mask_prob * lengths / 10 + 1))
  for seed in range(5):
    got = masking.span_mask(np.random.default_rng(seed), lengths, t, mask_prob=mask_prob,
                            mask_length=10, min_masks=min_masks,
                            require_same_masks=require_same_masks)
    want = _fairseq_compute_mask_indices(np.random.default_rng(seed), lengths, t, mask_prob, 10,
                                         min_masks, require_same_masks)
    np.testing.assert_array_equal(got, want)


def test_short_path_is_fairseq_minus_last_frame():
  # Short rows (sz - L <= #spans): fairseq draws starts from [0, #spans + 1) and truncates spans at
  # sz, which can mask the last valid frame (or the whole row). d2vjax documents one deliberate
  # difference: it also drops the last valid frame. Everything else is draw-for-draw identical.
  lengths = np.array([1, 2, 3, 5, 8, 10, 11, 12, 15])
  t = 20
  for seed in range(20):
    got = masking.span_mask(np.random.default_rng(seed), lengths, t, mask_prob=0.65,
                            mask_length=10, require_same_masks=False)
    want = _fairseq_compute_mask_indices(np.random.default_rng(seed), lengths, t, 0.65, 10, 1,
                                         False)
    want[np.arange(len(lengths)), lengths - 1] = False
    np.testing.assert_array_equal(got, want)


def test_rejects_bad_arguments():
  with pytest.raises(ValueError):
    masking.span_mask(np.random.default_rng(0), [10, 30], 20, mask_prob=0.5, mask_length=5)
  with pytest.raises(ValueError):
    masking.span_mask(np.random.default_rng(0), [10], 20, mask_prob=0.5, mask_length=0)
