"""Speech modality: waveform CNN feature encoder + span masking on CNN frames (fairseq-spec §1.2, §2.1)."""

from __future__ import annotations

import numpy as np

from d2vjax import registry
from d2vjax.modalities.base import Modality
from d2vjax.models import audio


@registry.register("modality", "speech")
class Speech(Modality):
  """Speech: inputs ``audio`` float32 ``[B, S]`` (16 kHz) and ``padding_mask`` bool ``[B, S]``."""

  name = "speech"
  unit = "audio_s"  # throughput unit: seconds of audio per second

  @staticmethod
  def frontend(model_cfg, dim: int, dtype):
    """The feature encoder module: ``AudioFeatureEncoder`` (CNN → LN → Linear)."""
    return audio.AudioFeatureEncoder(dim, extractor_mode=model_cfg.extractor_mode,
                                     conv_bias=model_cfg.conv_bias,
                                     feature_grad_mult=model_cfg.feature_grad_mult,
                                     conv_channels=model_cfg.conv_channels, dtype=dtype)

  @staticmethod
  def frozen_patterns(model_cfg) -> tuple[str, ...]:
    """Params that get no optimizer update: the CNN when ``feature_grad_mult`` is 0."""
    return ("frontend/cnn/.*",) if model_cfg.feature_grad_mult == 0 else ()

  @staticmethod
  def dummy_batch(data_cfg, batch_size: int = 1) -> dict:
    """An all-zero batch (shortest bucket) with the pre-training keys, for shape inference/init."""
    length = min(data_cfg.buckets)
    return {"audio": np.zeros((batch_size, length), np.float32),
            "padding_mask": np.zeros((batch_size, length), bool),
            "mask": np.zeros((batch_size, audio.num_frames(length)), bool)}

  @staticmethod
  def mask_fn(mask_cfg):
    """Host masking policy: span masks (fairseq-spec §2.1) over each row's valid CNN frames,
    computed in the data workers (picklable). Adds ``mask`` bool ``[B, T]``, ``T = num_frames(S)``;
    with ``masking.kind='block_1d'`` (data2vec 2.0) ``mask`` bool ``[B, M, T]``.
    """
    from d2vjax.data import multimask, pipeline  # pylint: disable=g-import-not-at-top
    if multimask.is_multi_mask(mask_cfg):
      # data2vec 2.0: M block masks per clip on the batch's final frame count (spec §6.3).
      return multimask.multi_mask_fn(mask_cfg, frame_positions)
    return pipeline.speech_mask_fn(mask_cfg)

  @staticmethod
  def examples(data_cfg, split: str):
    """``(examples, skipped_counts)`` of a split, from ``data_cfg.source``."""
    from d2vjax.data import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.examples_from_config(data_cfg, split)

  @staticmethod
  def batch_plan(data_cfg, examples, batch_multiple: int):
    """The bucket plan: static batch shapes and steps per epoch."""
    from d2vjax.data import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.plan_from_config(data_cfg, examples, batch_multiple)

  @staticmethod
  def make_iterator(data_cfg, **kw):
    """Grain iterator over this process's share of the batches (see ``make_speech_iterator``)."""
    from d2vjax.data import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.make_speech_iterator(data_cfg, **kw)

  @staticmethod
  def batch_units(batch: dict, sample_rate: int = audio.SAMPLE_RATE) -> float:
    """Seconds of (unpadded) audio in a host batch."""
    return float((~batch["padding_mask"]).sum()) / sample_rate


def frame_positions(batch: dict) -> tuple[int, int]:
  """(rows, CNN frames) of a host batch: the maskable positions of data2vec 2.0."""
  rows, samples = batch["audio"].shape
  return rows, audio.num_frames(samples)
