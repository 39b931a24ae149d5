"""data2vec 2.0 host masks (fairseq-spec §2.4, §2.5, §6.3) against NumPy references: exact masked
counts per row, the block structure (centred, border-clamped spans/squares), inverse masks that
keep 39 of 196 patches, MAE random masks keeping floor(T·0.52), and the batch hook's [B, M, T]
layout (process-count invariant). Pure NumPy, well under a second each."""

import numpy as np
import pytest

from d2vjax import masking
from d2vjax.data import multimask
from d2vjax.modalities import speech, text, vision


def _np_block_1d(rng, length, p, k, adjust):
  """Reference written from spec §2.4 for one row (same draw order as the implementation)."""
  centres = int(length * (p + adjust) / k)
  c = rng.integers(0, length, size=centres)
  row = np.zeros(length, bool)
  for ci in c:
    for o in range(-(k // 2), k - k // 2):
      row[min(max(ci + o, 0), length - 1)] = True
  final = int(length * p)
  on = np.flatnonzero(row)
  if on.size > final:
    row[rng.choice(on, on.size - final, replace=False)] = False
  elif on.size < final:
    row[rng.choice(np.flatnonzero(~row), final - on.size, replace=False)] = True
  return row


def test_block_1d_matches_reference_and_counts():
  for seed in range(5):
    got = masking.block_mask_1d(np.random.default_rng(seed), 3, 999, mask_prob=0.5, mask_length=5,
                                mask_prob_adjust=0.05)
    r = np.random.default_rng(seed)
    want = np.stack([_np_block_1d(r, 999, 0.5, 5, 0.05) for _ in range(3)])
    np.testing.assert_array_equal(got, want)
    assert (got.sum(1) == 499).all()  # floor(0.5·999), spec §2.4 table
  assert masking.num_kept("block_1d", 999, mask_prob=0.5) == 500
  # Large: p 0.55 → floor(0.55·T) masked.
  m = masking.block_mask_1d(np.random.default_rng(0), 4, 250, mask_prob=0.55, mask_length=5,
                            mask_prob_adjust=0.1)
  assert (m.sum(1) == int(250 * 0.55)).all()
  assert masking.num_kept("block_1d", 250, mask_prob=0.55) == 250 - int(250 * 0.55)


def test_block_1d_structure_is_spans():
  # Without the adjust the centred spans cover less than p (1 - e^-0.5 ≈ 39 % < 50 %), so most
  # masked frames sit in runs of >= 5 and the top-up adds isolated frames (spec §2.4 note).
  m = masking.block_mask_1d(np.random.default_rng(1), 200, 999, mask_prob=0.5, mask_length=5,
                            mask_prob_adjust=0.05)
  d = np.diff(np.concatenate([np.zeros((200, 1), np.int8), m.astype(np.int8),
                              np.zeros((200, 1), np.int8)], axis=1), axis=1)
  runs = np.concatenate([np.flatnonzero(r == -1) - np.flatnonzero(r == 1) for r in d])
  in_long = runs[runs >= 5].sum() / runs.sum()
  assert in_long > 0.8, in_long
  # Frames in masked regions are spatially correlated far above an i.i.d. mask's 50 %.
  assert (m[:, 1:] & m[:, :-1]).sum() / m[:, :-1].sum() > 0.75


def _np_block_2d_marks(centres, side, k):
  row = np.zeros((side, side), bool)
  for c in centres:
    i, j = divmod(int(c), side)
    for a in range(-(k // 2), k - k // 2):
      for b in range(-(k // 2), k - k // 2):
        row[min(max(i + a, 0), side - 1), min(max(j + b, 0), side - 1)] = True
  return row.reshape(-1)


def test_block_2d_inverse_keeps_39_of_196():
  got = masking.block_mask_2d(np.random.default_rng(3), 50, 14, mask_prob=0.8, mask_length=3,
                              mask_prob_adjust=0.07, inverse=True)
  assert got.shape == (50, 196)
  assert ((~got).sum(1) == 39).all()  # spec §2.4: keep 39, mask 157
  assert masking.num_kept("block_2d", 196, mask_prob=0.8, inverse=True) == 39
  assert masking.num_kept("block_2d", 196, mask_prob=0.75, inverse=True) == 49  # large
  # Reference for the marks: 5 centres (floor(196·0.27/9)), 3×3 squares clamped to the grid.
  r = np.random.default_rng(3)
  centres = r.integers(0, 196, size=int(196 * (0.2 + 0.07) / 9))
  assert len(centres) == 5
  marks = _np_block_2d_marks(centres, 14, 3)
  kept = ~got[0]
  # The kept set is the marks trimmed to 39 (5 squares of 9 mark <= 45), or marks + top-up.
  if marks.sum() >= 39:
    assert (kept <= marks).all()
  else:
    assert (marks <= kept).all()


def test_random_mask_keeps_floor_t_052():
  m = masking.random_mask(np.random.default_rng(0), 8, 512, mask_prob=0.48)
  assert ((~m).sum(1) == 266).all()  # spec §2.5: keep floor(512·0.52) = 266
  assert masking.num_kept("random", 512, mask_prob=0.48) == 266
  assert masking.num_kept("random", 512, mask_prob=0.5) == 256
  # Reference: the keep positions are the argmin of the same uniforms.
  u = np.random.default_rng(0).random((8, 512))
  want = np.ones((8, 512), bool)
  for r in range(8):
    want[r, np.argsort(u[r], kind="stable")[:266]] = False
  np.testing.assert_array_equal(m, want)


def test_bad_kind_is_named():
  with pytest.raises(ValueError, match="masking.kind"):
    masking.multi_mask(np.random.default_rng(0), "beit", 1, 10, mask_prob=0.5)
  with pytest.raises(ValueError, match="square"):
    masking.multi_mask(np.random.default_rng(0), "block_2d", 1, 10, mask_prob=0.5)


def test_hook_shapes_counts_and_process_invariance():
  cfg = dict(kind="block_1d", clones=4, mask_prob=0.5, mask_length=5, mask_prob_adjust=0.05)
  fn = multimask.multi_mask_fn(cfg, speech.frame_positions)
  audio = np.zeros((6, 32000), np.float32)
  out = fn(np.random.default_rng(7), {"audio": audio})
  t = 99  # num_frames(32000)
  assert out["mask"].shape == (6, 4, t)
  assert (out["mask"].sum(-1) == int(t * 0.5)).all()
  # Clones differ; process p of 2 (rows 3..5, _row_offset 3) gets the same rows.
  assert not (out["mask"][:, 0] == out["mask"][:, 1]).all()
  half = fn(np.random.default_rng(7), {"audio": audio[3:], "_row_offset": 3})
  np.testing.assert_array_equal(half["mask"], out["mask"][3:])
  # Vision and text hooks through the modalities.
  vfn = vision.Vision.mask_fn(dict(kind="block_2d", clones=3, mask_prob=0.8, mask_length=3,
                                   mask_prob_adjust=0.07, inverse=True, patch_size=16))
  v = vfn(np.random.default_rng(0), {"image": np.zeros((2, 224, 224, 3), np.float32)})
  assert v["mask"].shape == (2, 3, 196) and ((~v["mask"]).sum(-1) == 39).all()
  tfn = text.Text.mask_fn(dict(kind="random", clones=2, mask_prob=0.48))
  tt = tfn(np.random.default_rng(0), {"tokens": np.zeros((2, 64), np.int32)})
  assert tt["mask"].shape == (2, 2, 64) and ((~tt["mask"]).sum(-1) == int(64 * 0.52)).all()
