"""Text modality (data2vec 1.0 text, RoBERTa layout): token embeddings, masking of token ids in
the data pipeline, teacher re-embedding the original sequence (fairseq-spec §2.3, §4.2)."""

from __future__ import annotations

import numpy as np

from d2vjax import registry
from d2vjax.modalities.base import Modality
from d2vjax.models import text


@registry.register("modality", "text")
class Text(Modality):
  """Text: batches hold ``tokens`` int32 ``[B, T]`` (original ids), ``masked_tokens`` int32
  ``[B, T]`` (the student's corrupted ids), ``padding_mask`` bool ``[B, T]`` and ``mask`` bool
  ``[B, T]`` (positions in the loss)."""

  name = "text"
  unit = "tokens"  # throughput unit: unpadded tokens per second
  # Masking corrupts the ids in the data pipeline; the teacher re-embeds the original ids.
  feature_masking = False

  @staticmethod
  def frontend(model_cfg, dim: int, dtype):
    """The embedding module: ``TextEmbedding`` (tokens + positions → LayerNorm)."""
    return text.TextEmbedding(dim, vocab_size=int(model_cfg.vocab_size),
                              max_positions=int(model_cfg.max_positions),
                              padding_idx=int(model_cfg.padding_idx),
                              teacher_view=model_cfg.get("teacher_input", "full"),
                              # One epsilon for every LayerNorm, as in fairseq and HF RoBERTa.
                              norm_eps=float(model_cfg.encoder.get("norm_eps", 1e-5)), dtype=dtype)

  @staticmethod
  def student_inputs(batch: dict) -> dict:
    """The corrupted sequence (``<mask>`` / random / unchanged ids at chosen positions)."""
    return {"tokens": batch["masked_tokens"], "padding_mask": batch["padding_mask"]}

  @staticmethod
  def teacher_inputs(batch: dict) -> dict:
    """The FULL original sequence (data2vec §3: the teacher encodes the unmasked input). The
    loss mask rides along for the opt-in ``model.teacher_input='fairseq_bug4881'`` view, which
    the frontend applies; by default it is ignored."""
    return {"tokens": batch["tokens"], "padding_mask": batch["padding_mask"],
            "teacher_mask": batch["mask"]}

  @staticmethod
  def dummy_batch(data_cfg, batch_size: int = 1) -> dict:
    """An all-``<s>`` batch of the shortest bucket with the pre-training keys (shapes only)."""
    length = min(data_cfg.buckets)
    ids = np.zeros((batch_size, length), np.int32)
    return {"tokens": ids, "masked_tokens": ids.copy(),
            "padding_mask": np.zeros((batch_size, length), bool),
            "mask": np.zeros((batch_size, length), bool)}

  @staticmethod
  def mask_fn(mask_cfg):
    """Host masking policy (picklable): ``masking.kind`` 'bert' (15 %, 80/10/10) or 'span'
    (spans of 4, p 0.35); adds ``masked_tokens`` and ``mask`` (``data.text.TextMaskFn``)."""
    from d2vjax.data import multimask  # pylint: disable=g-import-not-at-top
    from d2vjax.data import text as text_data  # pylint: disable=g-import-not-at-top
    if multimask.is_multi_mask(mask_cfg):
      # data2vec 2.0: M MAE random masks per block, ``mask`` bool [B, M, T] (spec §2.5).
      return multimask.multi_mask_fn(mask_cfg, token_positions)
    return text_data.text_mask_fn(mask_cfg)

  @staticmethod
  def examples(data_cfg, split: str):
    """``(blocks, skipped_counts)`` of a split, from ``data_cfg.source``."""
    from d2vjax.data import text as text_data  # pylint: disable=g-import-not-at-top
    return text_data.examples_from_config(data_cfg, split)

  @staticmethod
  def batch_plan(data_cfg, examples, batch_multiple: int):
    """The bucket plan: static batch shapes ``(rows, tokens)`` and steps per epoch."""
    from d2vjax.data import text as text_data  # pylint: disable=g-import-not-at-top
    return text_data.plan_from_config(data_cfg, examples, batch_multiple)

  @staticmethod
  def make_iterator(data_cfg, **kw):
    """Grain iterator over this process's share of the batches (see ``make_text_iterator``)."""
    from d2vjax.data import text as text_data  # pylint: disable=g-import-not-at-top
    return text_data.make_text_iterator(data_cfg, **kw)

  @staticmethod
  def batch_units(batch: dict) -> float:
    """Unpadded tokens (``<s>``/``</s>`` included) in a host batch."""
    return float((~batch["padding_mask"]).sum())


def token_positions(batch: dict) -> tuple[int, int]:
  """(rows, tokens) of a host batch: the maskable positions of data2vec 2.0."""
  return tuple(batch["tokens"].shape)
