"""Speech modality: waveform CNN feature encoder + span masking on CNN frames (fairseq-spec §1.2, §2.1)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from d2vjax import masking, registry
from d2vjax.models import audio


@registry.register("modality", "speech")
class Speech:
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
  def dummy_batch(batch_size: int, length: int) -> dict:
    """An all-zero batch with the pre-training keys, for shape inference and init."""
    return {"audio": np.zeros((batch_size, length), np.float32),
            "padding_mask": np.zeros((batch_size, length), bool),
            "mask": np.zeros((batch_size, audio.num_frames(length)), bool)}

  @staticmethod
  def mask_fn(mask_cfg) -> Callable[[np.random.Generator, dict], dict]:
    """Host masking policy: span masks over each row's valid CNN frames (NumPy, in data workers).

    Adds ``mask`` bool ``[B, T]`` (True = masked), ``T = num_frames(S)``.
    """

    def fn(rng: np.random.Generator, batch: dict) -> dict:
      s = batch["audio"].shape[1]
      valid = s - batch["padding_mask"].sum(axis=1)
      batch["mask"] = masking.span_mask(
          rng, audio.num_frames(valid), audio.num_frames(s), mask_prob=mask_cfg.mask_prob,
          mask_length=mask_cfg.mask_length, min_masks=mask_cfg.min_masks,
          require_same_masks=mask_cfg.require_same_masks)
      return batch

    return fn

  @staticmethod
  def batch_units(batch: dict, sample_rate: int = audio.SAMPLE_RATE) -> float:
    """Seconds of (unpadded) audio in a host batch."""
    return float((~batch["padding_mask"]).sum()) / sample_rate
