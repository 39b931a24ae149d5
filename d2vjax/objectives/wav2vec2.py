"""wav2vec 2.0 pre-training objective (wav2vec 2.0 §3; fairseq-spec §3, pitfalls §11.19–21).

Student: CNN features → LayerNorm → projection → dropout → masked frames replaced by ``mask_emb``
→ Transformer → ``final_proj``. Targets: the Gumbel-quantized layer-normed CNN features of the
masked frames (``project_q``). Loss per masked frame: cross-entropy of the positive among 100
distractors drawn from the other masked frames of the same utterance, cosine similarity / 0.1,
plus ``0.1 · diversity`` and ``10 · mean(z²)`` (Base), all divided by the global masked count.

Static shapes: every frame is processed and the masked ones are selected with weights, so the
masked count may differ between batches without recompiling. The distractor logits are gathered
from a per-utterance ``[T, T]`` cosine-similarity matrix instead of materialising
``[B, T, 100, final_dim]`` distractor vectors; gradients still flow through every distractor.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2vjax import registry
from d2vjax.models import layers, quantizer as quantizer_lib, transformer
from d2vjax.objectives import base


def sample_negatives(rng: jax.Array, mask: jax.Array, num_negatives: int) -> jax.Array:
  """Distractor frame indices, uniformly with replacement among the OTHER masked frames of the
  same row (fairseq ``sample_negatives``: draw in [0, Mk−1) and skip the frame's own rank).

  Args:
    mask: bool ``[B, T]``, True = masked (never padding).
    num_negatives: N.
  Returns:
    int32 ``[B, T, N]`` frame indices; only meaningful at masked frames.
  """
  b, t = mask.shape
  count = jnp.sum(mask, axis=1).astype(jnp.int32)  # Mk per row
  # Masked frame indices in time order come first (stable sort of ~mask).
  order = jnp.argsort(~mask, axis=1, stable=True).astype(jnp.int32)
  rank = jnp.cumsum(mask, axis=1).astype(jnp.int32) - 1
  high = jnp.maximum(count - 1, 1)[:, None, None]
  r = jax.random.randint(rng, (b, t, num_negatives), 0, high)
  r = r + (r >= rank[..., None]).astype(jnp.int32)
  return jnp.take_along_axis(order[:, None, :], jnp.minimum(r, t - 1), axis=2)


def _cosine(a: jax.Array, eps: float = 1e-8) -> jax.Array:
  a = a.astype(jnp.float32)
  return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)


def contrastive_logits(c: jax.Array, q: jax.Array, codes: jax.Array, neg_idx: jax.Array,
                       logit_temp: float = 0.1) -> jax.Array:
  """Logits ``[B, T, 1+N]`` (positive first): cosine(c_t, q_t) and cosine(c_t, q_neg) over
  ``logit_temp``, in fp32. A distractor with the same codes as the positive (hence the identical
  quantized vector) gets −inf (fairseq ``neg_is_pos``).

  c, q: ``[B, T, F]``; codes: int ``[B, T, G]``; neg_idx: ``[B, T, N]``.
  """
  cn, qn = _cosine(c), _cosine(q)
  pos = jnp.sum(cn * qn, axis=-1, keepdims=True)
  sim = jnp.einsum("btf,bsf->bts", cn, qn)
  neg = jnp.take_along_axis(sim, neg_idx, axis=2)
  neg_codes = jax.vmap(lambda cb, ib: cb[ib])(codes, neg_idx)  # [B, T, N, G]
  same = jnp.all(neg_codes == codes[:, :, None, :], axis=-1)
  neg = jnp.where(same, -jnp.inf, neg)
  return jnp.concatenate([pos, neg], axis=-1) / logit_temp


def total_loss_sum(ce_sum, count, diversity, feature_pen, loss_cfg):
  """Summed objective: ``CE_sum + (α·diversity + λ·feature_pen) · count``. fairseq multiplies the
  extra terms by the sample size before the trainer's global division (spec §3.4, §11.19), so
  after dividing by the masked count they weigh α and λ whatever the count is."""
  extra = loss_cfg.diversity_weight * diversity + loss_cfg.feature_pen_weight * feature_pen
  return ce_sum + extra * count


class Wav2Vec2Model(nn.Module):
  """Params: ``frontend``, ``encoder``, ``mask_emb``, ``quantizer``, ``project_q``, ``final_proj``."""
  frontend: nn.Module
  encoder: nn.Module
  dim: int
  final_dim: int
  groups: int = 2
  num_vars: int = 320
  dropout_input: float = 0.0
  dropout_features: float = 0.0

  def setup(self):
    self.mask_emb = self.param("mask_emb", layers.uniform01, (self.dim,), jnp.float32)
    self.quantizer = quantizer_lib.GumbelQuantizer(self.groups, self.num_vars, self.final_dim)
    fd = self.final_dim
    self.project_q = nn.Dense(fd, kernel_init=layers.torch_default_kernel,
                              bias_init=layers.torch_default_bias(fd))
    self.final_proj = nn.Dense(fd, kernel_init=layers.torch_default_kernel,
                               bias_init=layers.torch_default_bias(self.dim))
    self.input_dropout = nn.Dropout(self.dropout_input)
    self.feature_dropout = nn.Dropout(self.dropout_features)

  def features(self, inputs: dict, train: bool = False) -> dict:
    """The speech frontend's outputs (``features``, ``padding_mask``, ``cnn``, ``normed``)."""
    return self.frontend(inputs, train)

  def contextualize(self, x, padding_mask, train: bool = False):
    """Transformer: ``[B, T, D]`` → (``[B, T, D]``, layer results ``[L, B, T, D]``)."""
    return self.encoder(x, padding_mask, train)

  def __call__(self, inputs: dict, mask, temp, train: bool = False) -> dict:
    """inputs: speech batch; mask bool ``[B, T]``. Returns features, quantizer output, projections."""
    f = self.frontend(inputs, train)
    pad = f["padding_mask"]
    x = self.input_dropout(f["features"], deterministic=not train)
    x = jnp.where(mask[..., None], self.mask_emb.astype(x.dtype), x)
    c, _ = self.encoder(x, pad, train)
    u = self.feature_dropout(f["normed"], deterministic=not train)
    qo = self.quantizer(u, mask & ~pad, temp, train)
    return {"c": self.final_proj(c), "q": self.project_q(qo["q"]), "codes": qo["codes"],
            "prob_ppl": qo["prob_ppl"], "code_ppl": qo["code_ppl"], "cnn": f["cnn"],
            "padding_mask": pad, "hidden": c}


@registry.register("objective", "wav2vec2")
class Wav2Vec2(base.Encoder):
  """wav2vec 2.0: contrastive + diversity + feature penalty. No teacher (empty teacher pytree)."""

  finetune_min_masks = 2  # wav2vec2.py apply_mask uses min_masks 2 (fairseq-spec §2.1)

  def __init__(self, config):
    self.config = config
    self.modality = registry.get("modality", config.modality)
    m = config.model
    self.encoder_cfg = transformer.encoder_config(m.encoder)
    dtype = layers.dtype_of(self.encoder_cfg.dtype)
    self.model = Wav2Vec2Model(
        frontend=self.modality.frontend(m, self.encoder_cfg.dim, dtype),
        encoder=transformer.TransformerEncoder(self.encoder_cfg), dim=self.encoder_cfg.dim,
        final_dim=m.final_dim, groups=m.latent_groups, num_vars=m.latent_vars,
        dropout_input=m.dropout_input, dropout_features=m.dropout_features)
    self.ema_scope: tuple[str, ...] = ()
    self.ema_copy: tuple[str, ...] = ()
    self.frozen = tuple(self.modality.frozen_patterns(m))

  def init(self, rng: jax.Array, batch: dict) -> dict:
    """Params from a batch of the right structure."""
    inputs = self.modality.student_inputs(batch)
    mask = jnp.zeros(jnp.shape(batch["mask"]), bool)
    return self.model.init({"params": rng, "gumbel": rng}, inputs, mask, 2.0, False)["params"]

  def init_teacher(self, params: dict) -> dict:
    """wav2vec 2.0 has no teacher."""
    del params
    return {}

  def temperature(self, step):
    """Gumbel temperature at ``step`` completed updates."""
    q = self.config.quantizer
    return quantizer_lib.temperature(step, q.max_temp, q.min_temp, q.temp_decay)

  def loss(self, params: dict, teacher: dict, batch: dict, rng: jax.Array, train: bool = True,
           step: Any = 0):
    """Scalar loss (sum over masked frames / their count) and metrics."""
    del teacher
    cfg = self.config
    k_drop, k_gumbel, k_neg = jax.random.split(rng, 3)
    temp = self.temperature(step)
    out = self.model.apply({"params": params}, self.modality.student_inputs(batch), batch["mask"],
                           temp, train, rngs={"dropout": k_drop, "gumbel": k_gumbel})
    w = batch["mask"] & ~out["padding_mask"]
    neg_idx = sample_negatives(k_neg, w, cfg.loss.num_negatives)
    logits = contrastive_logits(out["c"], out["q"], out["codes"], neg_idx, cfg.loss.logit_temp)
    ce = jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]
    wf = w.astype(jnp.float32)
    count = jnp.sum(wf)
    ce_sum = jnp.sum(ce * wf)
    gv = cfg.model.latent_groups * cfg.model.latent_vars
    diversity = (gv - out["prob_ppl"]) / gv
    feature_pen = jnp.mean(jnp.square(out["cnn"].astype(jnp.float32)))
    loss = total_loss_sum(ce_sum, count, diversity, feature_pen, cfg.loss) / jnp.maximum(count, 1.0)
    best = jnp.argmax(logits, axis=-1) == 0
    worst = jnp.argmin(logits, axis=-1) == 0
    accuracy = jnp.sum((best & ~worst) * wf) / jnp.maximum(count, 1.0)
    valid = jnp.sum(~out["padding_mask"])
    metrics = {"loss": loss, "loss_contrastive": ce_sum / jnp.maximum(count, 1.0),
               "diversity": diversity, "feature_pen": feature_pen, "prob_ppl": out["prob_ppl"],
               "code_ppl": out["code_ppl"], "temp": temp, "accuracy": accuracy,
               "masked_frac": count / jnp.maximum(valid, 1), "masked_count": count}
    return loss, metrics
