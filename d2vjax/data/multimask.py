"""data2vec 2.0 multi-mask batch hook: M masks per sample, drawn on the host (fairseq-spec §2.4,
§2.5, §6.3).

``MultiMaskFn`` adds ``mask`` bool ``[B, M, T]`` (True = masked): M = ``clones`` masks per row over
the row's T positions (CNN frames, patches or tokens; the modality's ``positions`` function gives T
from the batch). The clone axis stays inside each sample's row so the batch keeps one leading
axis (device sharding and micro-batching split samples with their masks); the objective flattens
it sample-major to ``[B·M, T]``, fairseq's ``repeat_interleave`` order.

Every row of one batch has exactly the same masked count (``masking.num_kept``), because the mask
is computed on the batch's final (cropped) length: the fix spec §6.3 recommends for fairseq's
audio crop quirk. Each global row draws from its own generator, so the masks do not depend on the
process count.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from d2vjax import masking
from d2vjax.data.sources import _get

__all__ = ["MultiMaskFn", "multi_mask_fn", "is_multi_mask"]

_TAG = 21


@dataclasses.dataclass(frozen=True)
class MultiMaskFn:
  """``batch_fn`` adding ``mask`` bool ``[B, M, T]``.

  Attributes:
    positions: picklable ``batch -> (B, T)``, rows and maskable positions of a host batch.
    kind: ``masking.V2_KINDS`` ('block_1d' audio, 'block_2d' images, 'random' text).
    clones: M masks per sample (``clone_batch``).
    mask_prob, mask_length, mask_prob_adjust, inverse: see ``masking.multi_mask``.
  """
  positions: Callable[[dict], tuple[int, int]]
  kind: str
  clones: int
  mask_prob: float
  mask_length: int = 1
  mask_prob_adjust: float = 0.0
  inverse: bool = False

  def __post_init__(self):
    if self.kind not in masking.V2_KINDS:
      raise ValueError(f"masking.kind must be one of {masking.V2_KINDS}, got {self.kind!r}")
    if self.clones < 1:
      raise ValueError(f"masking.clones must be >= 1, got {self.clones}")

  def __call__(self, rng: np.random.Generator, batch: dict) -> dict:
    b, t = self.positions(batch)
    base = int(rng.integers(0, 2**63))
    off = int(batch.get("_row_offset", 0))
    mask = np.empty((b, self.clones, t), bool)
    for r in range(b):
      mask[r] = masking.multi_mask(
          np.random.default_rng([_TAG, base, off + r]), self.kind, self.clones, t,
          mask_prob=self.mask_prob, mask_length=self.mask_length,
          mask_prob_adjust=self.mask_prob_adjust, inverse=self.inverse)
    return {**batch, "mask": mask}


def is_multi_mask(mask_cfg) -> bool:
  """Whether a masking section asks for data2vec 2.0 multi-masks (``kind`` in V2_KINDS)."""
  return _get(mask_cfg, "kind") in masking.V2_KINDS


def multi_mask_fn(mask_cfg, positions: Callable[[dict], tuple[int, int]]) -> MultiMaskFn:
  """``MultiMaskFn`` from a masking section with ``kind``, ``clones``, ``mask_prob`` and
  optionally ``mask_length`` (1), ``mask_prob_adjust`` (0), ``inverse`` (False)."""
  return MultiMaskFn(
      positions=positions, kind=str(_get(mask_cfg, "kind")), clones=int(_get(mask_cfg, "clones")),
      mask_prob=float(_get(mask_cfg, "mask_prob")),
      mask_length=int(_get(mask_cfg, "mask_length", 1) or 1),
      mask_prob_adjust=float(_get(mask_cfg, "mask_prob_adjust", 0.0) or 0.0),
      inverse=bool(_get(mask_cfg, "inverse", False)))
