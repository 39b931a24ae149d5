"""The modality protocol: what the shared objectives, step and trainer need from a modality.

A modality is a feature encoder + a host masking policy + target-norm defaults (configs) + its data
pipeline. Subclass ``Modality``, override what differs, and ``@registry.register('modality', name)``.

Each modality must also define (see ``modalities/speech.py``):
  frontend(model_cfg, dim, dtype) -> Flax module ``(inputs, train) -> {'features': [B, T, D],
      'padding_mask': [B, T]}``;
  dummy_batch(data_cfg, batch_size) -> an all-zero host batch with the pre-training keys;
  mask_fn(mask_cfg) -> picklable ``(np.random.Generator, batch) -> batch`` adding ``mask [B, T]``
      (or, for a data2vec 2.0 ``masking.kind``, ``mask [B, M, T]``: ``data.multimask``);
  examples(data_cfg, split), batch_plan(data_cfg, examples, batch_multiple),
  make_iterator(data_cfg, **kw), batch_units(batch) -> float (throughput in ``unit``).
"""

from __future__ import annotations


class Modality:
  """Defaults shared by all modalities; every method is a staticmethod/classmethod (no state)."""

  name = "base"
  unit = "examples"  # throughput unit reported by the progress line
  # True: masking happens in feature space (masked positions replaced by the learned ``mask_emb``)
  # and the teacher consumes the student's unmasked features (speech, vision; spec §5.4).
  # False: the data already corrupted the student's input (text tokens); the teacher re-embeds
  # ``teacher_inputs(batch)`` in eval mode with its own (copied) embedding.
  feature_masking = True

  @staticmethod
  def student_inputs(batch: dict) -> dict:
    """The frontend inputs of the student (default: the batch itself)."""
    return batch

  @staticmethod
  def teacher_inputs(batch: dict) -> dict:
    """The frontend inputs of the teacher when ``feature_masking`` is False."""
    return batch

  @classmethod
  def local_encoder(cls, model_cfg, dim: int, dtype):
    """data2vec 2.0's local encoder (spec §6.2): features computed ONCE per sample from
    ``teacher_inputs(batch)`` (the unmasked input) before cloning and masking. Default: the
    modality's ``frontend``."""
    return cls.frontend(model_cfg, dim, dtype)

  @staticmethod
  def post_init(params: dict, model_cfg) -> dict:
    """Adjust freshly initialised params (e.g. depth-scaled inits). Default: unchanged."""
    del model_cfg
    return params

  @staticmethod
  def frozen_patterns(model_cfg) -> tuple[str, ...]:
    """Param path regexes that get no optimizer update."""
    del model_cfg
    return ()
