"""What every objective shares: feature extraction through its model's ``features`` and
``contextualize`` methods, and what a fine-tuning model takes from a model pre-trained with it."""

from __future__ import annotations

import jax.numpy as jnp

from d2vjax import registry


class Encoder:
  """Mixin for objectives whose ``self.model`` has ``features`` and ``contextualize`` methods.

  The class attributes and static methods below describe a PRE-TRAINED model to the fine-tuning
  objectives (``ctc``, ``*_classification``), looked up by ``finetune.pretrained_objective``, so
  no fine-tuning code branches on an objective's name. Defaults: data2vec 1.0 / wav2vec 2.0.
  """

  # Time-mask fill in fine-tuning (fairseq-spec §2.1, §9.1): the learned mask embedding.
  finetune_mask_kind = "learned"
  # fairseq ``mask_min_masks`` of the fine-tuning time masks (spec §9.1).
  finetune_min_masks = 1

  @staticmethod
  def finetune_frontend(modality, model_cfg, dim: int, dtype):
    """The fine-tuning model's feature encoder (params ``frontend``): the modality's."""
    return modality.frontend(model_cfg, dim, dtype)

  @staticmethod
  def finetune_context(model_cfg, encoder_cfg, dtype):
    """A module between the frontend and the Transformer (params ``context``), or None.
    Called as ``context(x [B, T, D], padding [B, T], None, None, train)`` → ``(x, padding,
    attention bias or None)``."""
    del model_cfg, encoder_cfg, dtype
    return None

  def encode(self, params: dict, inputs: dict, *, train: bool = False, rng=None):
    """Feature extraction without masking: (final ``[B, T, D]``, layer results ``[L, B, T, D]``,
    padding ``[B, T]``; True = pad). ``rng`` is only needed with ``train=True`` (dropout)."""
    rngs = None if rng is None else {"dropout": rng}
    f = self.model.apply({"params": params}, inputs, train, method="features", rngs=rngs)
    x, results = self.model.apply({"params": params}, f["features"], f["padding_mask"], train,
                                  method="contextualize", rngs=rngs)
    pad = f["padding_mask"]
    extra = x.shape[1] - pad.shape[1]
    if extra:  # tokens a context encoder prepended (never padding)
      pad = jnp.pad(pad, ((0, 0), (extra, 0)), constant_values=False)
    return x, results, pad


def finetune_parts(config, model_config_fn):
  """What every fine-tuning objective builds first, for a model whose encoder was pre-trained
  with ``config.finetune.pretrained_objective``: ``(modality, model_cfg, encoder_cfg, dtype,
  frontend, context or None)``; ``model_cfg = model_config_fn(config.model, config.finetune)``
  (the pre-trained architecture with the fine-tuning overrides)."""
  from d2vjax.models import layers, transformer  # pylint: disable=g-import-not-at-top
  modality = registry.get("modality", config.modality)
  model_cfg = model_config_fn(config.model, config.finetune)
  encoder_cfg = transformer.encoder_config(model_cfg.encoder)
  dtype = layers.dtype_of(encoder_cfg.dtype)
  pre = registry.get("objective", str(config.finetune.pretrained_objective))
  return (modality, model_cfg, encoder_cfg, dtype,
          pre.finetune_frontend(modality, model_cfg, encoder_cfg.dim, dtype),
          pre.finetune_context(model_cfg, encoder_cfg, dtype))


def contextualize(context, encoder, x, padding_mask, train: bool):
  """Context module (None = none) → Transformer on features ``x [B, T, D]``, inside a fine-tuning
  model's compact/setup scope. Returns ``(x [B, T', D], layer results [L, B, T', D], padding
  [B, T'])``; T' = T plus the context module's extra tokens (data2vec 2.0 image CLS)."""
  bias = None
  if context is not None:
    x, padding_mask, bias = context(x, padding_mask, None, None, train)
  x, results = encoder(x, padding_mask, train, bias)
  return x, results, padding_mask
