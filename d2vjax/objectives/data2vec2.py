"""data2vec 2.0 objective, shared by every modality (fairseq-spec §6; data2vec 2.0 paper §3).

Student: local features computed ONCE per sample (the modality's ``local_encoder``) → repeated M
times (``clone_batch``) → the masked positions of each clone REMOVED (stable-argsort gather to a
static ``[B·M, K, D]``) → context encoder (relative positions on the zero-masked sequence, ALiBi,
extra tokens, LayerNorm, prenet) → shared post-LN trunk → decoder input (kept tokens + N(0, σ²)
noise tokens restored to the original order) → convolutional decoder → ``[B·M, T, D]``.

Teacher: ONE forward per original sample (B rows, not B·M) in eval mode with the EMA'd subtrees
(``ema.scope``); subtrees outside the scope are the student's (spec §6.6): without ``frontend``
in the scope the teacher consumes the student's local features (after their dropout), without
``context`` it runs the student's context encoder. Targets: FFN outputs of the MAIN blocks only,
extra tokens stripped, per-layer norm → top-K average → optional final norm
(``objectives.targets``), repeated M times. Loss: regression at masked, non-padded positions over
their count, plus the optional CLS loss (spec §6.8).

Batch contract: the modality's keys plus ``mask`` bool ``[B, M, T]`` (True = masked; every row
masks the count ``masking.num_kept`` implies, ``data.multimask``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2vjax import ema, masking, registry
from d2vjax.models import d2v2, layers, transformer
from d2vjax.objectives import base, losses, targets


class Data2Vec2Model(nn.Module):
  """Student/teacher network. Params: ``frontend`` (local encoder), ``context`` (absent when it
  has no parameters), ``encoder`` (main blocks), ``decoder``.

  Attributes:
    frontend: local encoder ``(inputs, train) -> {'features' [B, T, D], 'padding_mask' [B, T]}``.
    context: ``d2v2.ContextEncoder``. encoder: ``TransformerEncoder`` (the trunk).
    decoder: ``[N, T, D] -> [N, T, D]``.
    local_dropout: dropout on the local features (the token-embedding dropout, spec §6.2).
    decoder_input_dropout: dropout on the encoder output before decoding (spec §6.5).
    noise_std: std of the noise tokens at masked positions (0.01; no learned mask token).
    extra_tokens: E, tokens the context encoder prepends (stripped from targets and decoding).
  """
  frontend: nn.Module
  context: nn.Module
  encoder: nn.Module
  decoder: nn.Module
  local_dropout: float = 0.0
  decoder_input_dropout: float = 0.0
  noise_std: float = 0.01
  extra_tokens: int = 0

  def setup(self):
    self.local_drop = nn.Dropout(self.local_dropout)
    self.decoder_drop = nn.Dropout(self.decoder_input_dropout)

  def features(self, inputs: dict, train: bool = False) -> dict:
    """Local features after their dropout: ``{'features' [B, T, D], 'padding_mask' [B, T]}``."""
    f = self.frontend(inputs, train)
    return {"features": self.local_drop(f["features"], deterministic=not train),
            "padding_mask": f["padding_mask"]}

  def contextualize(self, x, padding_mask, train: bool = False, mask=None, keep_ids=None,
                    keep_extra: bool = False):
    """Context encoder + trunk. x ``[N, T, D]``; with ``mask``/``keep_ids`` (``d2v2.mask_order``)
    only the K kept positions are encoded. Returns ``(x [N, (E+)K, D], layer results
    [L, N, (E+)K, D])``; the E extra tokens are stripped unless ``keep_extra``."""
    x, pad, bias = self.context(x, padding_mask, mask, keep_ids, train)
    x, results = self.encoder(x, pad, train, bias)
    if not keep_extra and self.extra_tokens:
      x, results = x[:, self.extra_tokens:], results[:, :, self.extra_tokens:]
    return x, results

  def decode(self, x, restore_ids, train: bool = False):
    """Decoder input and decoder: kept tokens ``[N, K, D]`` (extra tokens removed) → dropout →
    noise tokens at the T-K masked positions → original order → ``[N, T, D]`` predictions."""
    x = self.decoder_drop(x, deterministic=not train)
    n, k, d = x.shape
    noise = self.noise_std * jax.random.normal(self.make_rng("noise"),
                                               (n, restore_ids.shape[1] - k, d), jnp.float32)
    return self.decoder(d2v2.restore_rows(x, noise, restore_ids))

  def __call__(self, inputs: dict, train: bool = False):
    """Unmasked forward through every submodule (initialisation, shape inference)."""
    f = self.features(inputs, train)
    x, _ = self.contextualize(f["features"], f["padding_mask"], train)
    return self.decoder(x)


def context_encoder(model_cfg, encoder_cfg: transformer.EncoderConfig,
                    dtype) -> d2v2.ContextEncoder:
  """The ``d2v2.ContextEncoder`` of ``model_cfg.context``; its prenet blocks are configured like
  the trunk's (``encoder_cfg``) with the context's depth and LayerDrop."""
  c = model_cfg.context
  prenet = dataclasses.replace(encoder_cfg, num_layers=int(c.prenet_depth),
                               layerdrop=float(c.prenet_layerdrop), input_dropout=0.0)
  return d2v2.ContextEncoder(
      encoder_cfg.dim, encoder_cfg.num_heads, prenet, rel_pos=c.rel_pos,
      pos_width=int(c.pos_width), pos_groups=int(c.pos_groups), pos_depth=int(c.pos_depth),
      alibi=bool(c.alibi), alibi_scale=float(c.alibi_scale), extra_tokens=int(c.extra_tokens),
      norm=bool(c.norm), norm_eps=encoder_cfg.norm_eps, prenet_dropout=float(c.prenet_dropout),
      dtype=dtype)


@registry.register("objective", "data2vec2")
class Data2Vec2(base.Encoder):
  """data2vec 2.0: builds the model from the config and provides ``init``, ``init_teacher``,
  ``targets`` and ``loss``; the shared train step does the rest.

  Fine-tuning a data2vec 2.0 model keeps its local encoder and context encoder (relative
  positions, ALiBi, extra tokens, LayerNorm, prenet) in front of the trunk, as fairseq's
  ``Data2VecMultiModel`` does with ``features_only``; masked frames get N(0, σ²) noise, not a
  learned token (spec §6.4, §9.1)."""

  finetune_mask_kind = "noise"

  @staticmethod
  def finetune_frontend(modality, model_cfg, dim: int, dtype):
    return modality.local_encoder(model_cfg, dim, dtype)

  @staticmethod
  def finetune_context(model_cfg, encoder_cfg, dtype):
    return context_encoder(model_cfg, encoder_cfg, dtype)

  def __init__(self, config):
    self.config = config
    self.modality = registry.get("modality", config.modality)
    m = config.model
    enc = transformer.encoder_config(m.encoder)
    self.encoder_cfg = enc
    dtype = layers.dtype_of(enc.dtype)
    d = m.decoder
    self.extra_tokens = int(m.context.extra_tokens)
    context = context_encoder(m, enc, dtype)
    decoder = registry.get("decoder", d.kind)(
        enc.dim, decoder_dim=int(d.dim), kernel=int(d.kernel), num_layers=int(d.layers),
        groups=int(d.groups), residual=bool(d.residual),
        projection_layers=int(d.projection_layers), dtype=dtype)
    self.model = Data2Vec2Model(
        frontend=self.modality.local_encoder(m, enc.dim, dtype), context=context,
        encoder=transformer.TransformerEncoder(enc), decoder=decoder,
        local_dropout=float(m.local_dropout), decoder_input_dropout=float(d.input_dropout),
        noise_std=float(d.noise_std), extra_tokens=self.extra_tokens)
    self.ema_scope = tuple(config.ema.scope)
    self.ema_copy = tuple(config.ema.copy)
    self.frozen = tuple(self.modality.frozen_patterns(m))

  def init(self, rng: jax.Array, batch: dict) -> dict:
    """Student params (plain nested dict) from a batch of the right structure. data2vec 2.0's
    inits (BERT for the blocks, PyTorch defaults for projections/decoder, xavier patches, N(0, 1)
    extra tokens, ALiBi scale 1; spec §1.8) are the modules' own."""
    return self.model.init({"params": rng}, self.modality.teacher_inputs(batch), False)["params"]

  def init_teacher(self, params: dict) -> dict:
    """fp32 copy of the EMA'd subtrees."""
    return ema.init_teacher(params, self.ema_scope)

  def num_kept(self, num_positions: int) -> int:
    """K, the positions every clone keeps (static: the student's sequence length)."""
    mc = self.config.masking
    return masking.num_kept(mc.kind, num_positions, mask_prob=float(mc.mask_prob),
                            inverse=bool(mc.get("inverse", False)))

  def targets(self, params: dict, teacher: dict, inputs: dict, local: jax.Array,
              padding_mask: jax.Array) -> jax.Array:
    """Teacher targets, ONE forward per original sample (spec §6.6–6.7).

    Args:
      inputs: the unmasked local-encoder inputs (re-embedded when ``frontend`` is EMA'd).
      local: the student's local features ``[B, T, D]`` (used when ``frontend`` is not).
      padding_mask: bool ``[B, T]``.
    Returns:
      fp32 ``[B, T, D]`` (not yet repeated over the clones).
    """
    cfg = self.config.targets
    t_params = {**params, **teacher}
    if "frontend" in teacher:
      local = self.model.apply({"params": t_params}, inputs, False, method="features")["features"]
    _, results = self.model.apply({"params": t_params}, jax.lax.stop_gradient(local),
                                  padding_mask, False, method="contextualize")
    return targets.build_targets(jax.lax.stop_gradient(results), padding_mask, top_k=cfg.top_k,
                                 layer_norm_type=cfg.layer_norm, final_norm_type=cfg.final_norm,
                                 eps=cfg.eps)

  def loss(self, params: dict, teacher: dict, batch: dict, rng: jax.Array, train: bool = True,
           step: Any = 0):
    """Scalar loss (regression sum over masked positions / their count, + CLS term) and metrics.
    ``step`` is unused (schedules live in the step and the EMA)."""
    del step
    cfg = self.config
    rngs = {"dropout": jax.random.fold_in(rng, 0), "noise": jax.random.fold_in(rng, 1)}
    b, m, t = batch["mask"].shape
    inputs = self.modality.teacher_inputs(batch)
    f = self.model.apply({"params": params}, inputs, train, method="features", rngs=rngs)
    local, pad = f["features"], f["padding_mask"]
    if local.shape[1] != t:
      raise ValueError(f"batch['mask'] has {t} positions, the local encoder gives "
                       f"{local.shape[1]}")
    # Sample-major clones (fairseq repeat_interleave): row i·M + j is clone j of sample i.
    mask = batch["mask"].reshape(b * m, t)
    keep_ids, restore_ids = d2v2.mask_order(mask, self.num_kept(t))
    x = jnp.repeat(local, m, axis=0)
    pad_m = jnp.repeat(pad, m, axis=0)
    x_enc, _ = self.model.apply({"params": params}, x, pad_m, train, mask, keep_ids, True,
                                method="contextualize", rngs=rngs)
    e = self.extra_tokens
    pred = self.model.apply({"params": params}, x_enc[:, e:], restore_ids, train,
                            method="decode", rngs=rngs)
    y = self.targets(params, teacher, inputs, local, pad)
    y_m = jnp.repeat(y, m, axis=0)
    weights = mask & ~pad_m
    scale = None if cfg.loss.scale <= 0 else cfg.loss.scale
    reg_sum, count = losses.regression_loss(pred, y_m, weights, beta=cfg.loss.beta, scale=scale)
    reg = reg_sum / jnp.maximum(count, 1.0)
    loss = reg
    metrics = {"reg_loss": reg}
    cls_weight = float(cfg.loss.get("cls_weight", 0.0) or 0.0)
    if cls_weight > 0:
      loss = loss + self.cls_loss(x_enc[:, 0], y, pad, m)
      metrics["cls_loss"] = loss - reg
    metrics.update(loss=loss, target_var=losses.masked_std(y_m, weights),
                   pred_var=losses.masked_std(pred, weights),
                   masked_frac=count / jnp.maximum(jnp.sum(~pad_m), 1), masked_count=count)
    return loss, metrics

  def cls_loss(self, cls_pred: jax.Array, y: jax.Array, padding_mask: jax.Array,
               clones: int) -> jax.Array:
    """CLS loss (spec §6.8): target = mean of the sample's final targets over its valid
    positions, repeated over the clones; prediction = the student's first extra token after the
    last block. ``w · R · mean_clones(d2v_loss)`` with ``d2v_loss = scale · Σ_c (p − t)²``
    (smooth-L1 with ``loss.beta`` > 0), w = ``loss.cls_weight`` (0.01) and R =
    ``loss.cls_rows`` — fairseq multiplies by the sample size before the global division, so the
    term is a SUM over the clones of one GPU (16 samples × 16 clones = 256 in the Base recipe);
    R fixes that sum's size independently of this run's batch and device count (0 = the sum
    over this batch's clones).

    cls_pred ``[B·M, D]``, y ``[B, T, D]``, padding_mask ``[B, T]`` → scalar.
    """
    cfg = self.config.loss
    valid = (~padding_mask).astype(jnp.float32)[..., None]
    target = jnp.sum(y * valid, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1.0)
    target = jnp.repeat(target, clones, axis=0)
    scale = None if cfg.scale <= 0 else cfg.scale
    s, n = losses.regression_loss(cls_pred, target, jnp.ones(cls_pred.shape[:1]), beta=cfg.beta,
                                  scale=scale)
    rows = int(cfg.get("cls_rows", 0) or 0) or cls_pred.shape[0]
    return float(cfg.cls_weight) * rows * s / n
