"""data2vec 1.0 objective, shared by all modalities (fairseq-spec §4, §5; data2vec paper §3).

Student: modality features → masked positions replaced by a learned ``mask_emb`` → Transformer →
regression head. Teacher: EMA copy of the configured subtrees (``ema.scope``), run in eval mode on
the unmasked features under ``stop_gradient``. Targets: top-K block outputs, normalised and
averaged (``objectives.targets``). Loss: regression at masked positions, divided by their count.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2vjax import ema, registry
from d2vjax.models import layers, transformer
from d2vjax.objectives import base, losses, targets


class RegressionHead(nn.Module):
  """Prediction head: one Linear D→D (``num_layers == 1``; PyTorch default init, spec §1.8), or
  Linear(D→2D) → GELU → Linear(2D→D) when ``num_layers == 2`` (spec §4.2); chosen by the config."""
  dim: int
  num_layers: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.num_layers == 2:
      x = nn.Dense(2 * self.dim, kernel_init=layers.bert_init, dtype=self.dtype, name="fc1")(x)
      return nn.Dense(self.dim, kernel_init=layers.bert_init, dtype=self.dtype,
                      name="fc2")(layers.gelu(x))
    return nn.Dense(self.dim, kernel_init=layers.torch_default_kernel,
                    bias_init=layers.torch_default_bias(x.shape[-1]), dtype=self.dtype,
                    name="proj")(x)


class Data2VecModel(nn.Module):
  """Student/teacher network. Params: ``frontend``, ``encoder``, ``head``, ``mask_emb`` (D,; absent
  when ``mask_emb_init`` is 'none')."""
  frontend: nn.Module
  encoder: nn.Module
  head: nn.Module
  dim: int
  dropout_input: float = 0.0
  # 'uniform' U[0,1) (fairseq mask_emb, spec §1.8) | 'trunc_normal' σ 0.02 (BEiT) | 'none' (no
  # mask_emb; set by Data2Vec for modalities without feature masking).
  mask_emb_init: str = "uniform"

  def setup(self):
    if self.mask_emb_init == "none":
      # Input-masking modalities corrupt their inputs in the data; no learned vector exists.
      self.mask_emb = None
    else:
      init = {"uniform": layers.uniform01,
              "trunc_normal": nn.initializers.truncated_normal(0.02)}[self.mask_emb_init]
      self.mask_emb = self.param("mask_emb", init, (self.dim,), jnp.float32)
    self.input_dropout = nn.Dropout(self.dropout_input)

  def features(self, inputs: dict, train: bool = False) -> dict:
    """Modality features (dict with ``features [B, T, D]`` and ``padding_mask [B, T]``)."""
    return self.frontend(inputs, train)

  def contextualize(self, x, padding_mask, train: bool = False):
    """Transformer: ``[B, T, D]`` → (``[B, T, D]``, layer results ``[L, B, T, D]``)."""
    return self.encoder(x, padding_mask, train)

  def student(self, feats, mask, padding_mask, train: bool = True):
    """Dropout → replace masked positions by ``mask_emb`` → Transformer → head. ``[B, T, D]``."""
    x = self.input_dropout(feats, deterministic=not train)
    if self.mask_emb is not None:
      x = jnp.where(mask[..., None], self.mask_emb.astype(x.dtype), x)
    x, _ = self.encoder(x, padding_mask, train)
    return self.head(x)

  def __call__(self, inputs: dict, train: bool = False):
    f = self.features(inputs, train)
    mask = jnp.zeros(f["features"].shape[:2], bool)
    return self.student(f["features"], mask, f["padding_mask"], train)


@registry.register("objective", "data2vec")
class Data2Vec(base.Encoder):
  """data2vec 1.0: builds the model from the config and provides ``init``, ``init_teacher`` and
  ``loss``; the shared train step does the rest."""

  def __init__(self, config):
    self.config = config
    self.modality = registry.get("modality", config.modality)
    m = config.model
    self.encoder_cfg = transformer.encoder_config(m.encoder)
    dtype = layers.dtype_of(self.encoder_cfg.dtype)
    self.model = Data2VecModel(
        frontend=self.modality.frontend(m, self.encoder_cfg.dim, dtype),
        encoder=transformer.TransformerEncoder(self.encoder_cfg),
        head=RegressionHead(self.encoder_cfg.dim, m.head_layers, dtype),
        dim=self.encoder_cfg.dim, dropout_input=m.dropout_input,
        mask_emb_init=(m.get("mask_emb_init", "uniform") if self.modality.feature_masking
                       else "none"))
    self.ema_scope = tuple(config.ema.scope)
    self.ema_copy = tuple(config.ema.copy)
    self.frozen = tuple(self.modality.frozen_patterns(m))

  def init(self, rng: jax.Array, batch: dict) -> dict:
    """Student params (plain nested dict) from a batch of the right structure."""
    params = self.model.init({"params": rng}, self.modality.student_inputs(batch), False)["params"]
    return self.modality.post_init(params, self.config.model)

  def init_teacher(self, params: dict) -> dict:
    """fp32 copy of the EMA'd subtrees."""
    return ema.init_teacher(params, self.ema_scope)

  def loss(self, params: dict, teacher: dict, batch: dict, rng: jax.Array, train: bool = True,
           step: Any = 0):
    """Scalar loss (sum over masked positions / their count) and a metrics dict. ``step`` (updates
    completed) is unused: data2vec's schedules live in the step and the EMA."""
    del step
    cfg = self.config
    rngs = {"dropout": rng}
    mod = self.modality
    f = self.model.apply({"params": params}, mod.student_inputs(batch), train, method="features",
                         rngs=rngs)
    feats, pad = f["features"], f["padding_mask"]
    # Feature-space masking replaces masked positions by mask_emb; otherwise the data already
    # corrupted the student's input and the student sees no extra masking.
    feat_mask = batch["mask"] if mod.feature_masking else jnp.zeros_like(batch["mask"])
    pred = self.model.apply({"params": params}, feats, feat_mask, pad, train, method="student",
                            rngs=rngs)
    # Teacher: EMA'd subtrees over the student's remainder, eval mode, unmasked input.
    t_params = {**params, **teacher}
    if mod.feature_masking:
      t_feats, t_pad = jax.lax.stop_gradient(feats), pad
    else:
      # The teacher embeds its own inputs; its padding is what its frontend reports (the
      # student's, unless the modality gives the teacher another view of the sequence).
      t = self.model.apply({"params": t_params}, mod.teacher_inputs(batch), False,
                           method="features")
      t_feats, t_pad = t["features"], t["padding_mask"]
    _, layer_results = self.model.apply({"params": t_params}, jax.lax.stop_gradient(t_feats),
                                        t_pad, False, method="contextualize")
    y = targets.build_targets(jax.lax.stop_gradient(layer_results), t_pad, top_k=cfg.targets.top_k,
                              layer_norm_type=cfg.targets.layer_norm,
                              final_norm_type=cfg.targets.final_norm, eps=cfg.targets.eps)
    weights = batch["mask"] & ~pad
    scale = None if cfg.loss.scale <= 0 else cfg.loss.scale
    loss_sum, count = losses.regression_loss(pred, y, weights, beta=cfg.loss.beta, scale=scale)
    loss = loss_sum / jnp.maximum(count, 1.0)
    valid = jnp.sum(~pad)
    metrics = {"loss": loss, "target_var": losses.masked_std(y, weights),
               "pred_var": losses.masked_std(pred, weights),
               "masked_frac": count / jnp.maximum(valid, 1), "masked_count": count}
    return loss, metrics
