"""CTC fine-tuning objective for speech recognition (wav2vec 2.0 §3.3/§4.3; fairseq-spec §9.1).

Model: the pre-trained feature encoder and Transformer (the pre-training heads — data2vec's
regression head, wav2vec 2.0's quantizer and projections, the EMA teacher — are dropped) →
dropout (``final_dropout``) → a new Linear(D → V) with Xavier-uniform weight and zero bias
(fairseq ``wav2vec2_asr.Linear``, spec §9.1). V is the letter vocabulary (``d2vjax.asr``), blank 0.

In training, fine-tuning masks are applied to the projected CNN features (spec §2.1–2.2, §9.1):
time masks replace frames with the pre-trained learned ``mask_emb`` (``mask_kind='learned'``:
wav2vec 2.0, data2vec 1.0) or with fresh N(0, ``mask_noise_std``²) noise (``'noise'``: data2vec
2.0); channel masks then zero whole channels over all frames. The CNN is always frozen (wav2vec 2.0
§4.3: "The feature encoder is not trained during fine-tuning"; fairseq ``feature_grad_mult 0``).

Freezing (``freeze_updates`` N, fairseq ``freeze_finetune_updates``): for updates n < N only the
output Linear learns. Inside the step this is a ``lax.cond`` on the step counter (one program, no
recompilation): the frozen branch runs the encoder on ``stop_gradient`` params, so its gradients
are exact zeros and its backward pass is never executed (fairseq runs it under ``no_grad``). The
optimizer (``make_optimizer``) keeps the encoder's Adam state untouched until n = N and then
starts it fresh, as fairseq's Adam does for parameters that had no gradient so far, with the
learning rate still read from the global schedule.

Loss: ``optax.ctc_loss`` per utterance with frame and label paddings, clamped at 0; utterances
whose labels cannot be aligned (fewer valid frames than labels plus repeated neighbours) or whose
loss is not finite contribute 0 and are counted (fairseq ``zero_infinity``); the sum is divided
by the number of utterances (``sentence_avg``).
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from d2vjax import asr, optim, registry
from d2vjax.ema import path_str
from d2vjax.models import layers, transformer
from d2vjax.objectives import base

MASK_KINDS = ("learned", "noise")


def ctc_loss(logits: jax.Array, logit_padding: jax.Array, labels: jax.Array,
             label_padding: jax.Array, blank_id: int = asr.BLANK) -> tuple[jax.Array, jax.Array]:
  """Per-utterance CTC negative log-likelihood with fairseq's ``zero_infinity``.

  Args:
    logits: ``[B, T, V]`` (any float dtype; computed in fp32).
    logit_padding: bool ``[B, T]``, True = padded frame.
    labels: int ``[B, L]``, right-padded.
    label_padding: bool ``[B, L]``, True = padding (each row: False…False True…True).
    blank_id: the blank class.
  Returns:
    ``(loss [B] fp32 >= 0, skipped [B] bool)``: ``skipped`` marks rows whose alignment is
    impossible (valid frames < labels + adjacent repeats) or whose loss is not finite; their
    loss is 0. (optax never returns inf: impossible rows get ~1e5 from its ``log_epsilon``.)
  """
  lp = logit_padding.astype(jnp.float32)
  lbp = label_padding.astype(jnp.float32)
  raw = optax.ctc_loss(logits.astype(jnp.float32), lp, labels, lbp, blank_id=blank_id)
  frames = jnp.sum(1.0 - lp, axis=1)
  units = jnp.sum(1.0 - lbp, axis=1)
  both = ~label_padding[:, 1:] & ~label_padding[:, :-1]
  repeats = jnp.sum((labels[:, 1:] == labels[:, :-1]) & both, axis=1)
  skipped = (frames < units + repeats) | ~jnp.isfinite(raw)
  return jnp.where(skipped, 0.0, jnp.maximum(raw, 0.0)), skipped


class CtcModel(nn.Module):
  """Params: ``frontend``, ``context`` (data2vec 2.0 models only), ``encoder``, ``mask_emb``
  (D,; only for ``mask_kind='learned'``), ``proj`` (Linear D → V)."""
  frontend: nn.Module
  encoder: nn.Module
  dim: int
  vocab_size: int
  context: Optional[nn.Module] = None
  dropout_input: float = 0.0
  final_dropout: float = 0.0
  mask_kind: str = "learned"
  mask_noise_std: float = 0.01

  def setup(self):
    if self.mask_kind not in MASK_KINDS:
      raise ValueError(f"finetune.mask_kind must be one of {MASK_KINDS}, got {self.mask_kind!r}")
    if self.mask_kind == "learned":
      # U[0,1) as in pre-training (spec §1.8); overwritten by the pre-trained vector.
      self.mask_emb = self.param("mask_emb", layers.uniform01, (self.dim,), jnp.float32)
    self.proj = nn.Dense(self.vocab_size, kernel_init=nn.initializers.xavier_uniform(),
                         bias_init=nn.initializers.zeros, dtype=jnp.float32)
    self.input_dropout = nn.Dropout(self.dropout_input)
    self.output_dropout = nn.Dropout(self.final_dropout)

  def features(self, inputs: dict, train: bool = False) -> dict:
    """The speech frontend's outputs (``features [B, T, D]``, ``padding_mask [B, T]``, …)."""
    return self.frontend(inputs, train)

  def contextualize(self, x, padding_mask, train: bool = False):
    """[Context encoder →] Transformer: ``[B, T, D]`` → (``[B, T, D]``, layer results
    ``[L, B, T, D]``)."""
    x, results, _ = base.contextualize(self.context, self.encoder, x, padding_mask, train)
    return x, results

  def body(self, inputs: dict, mask=None, channel_mask=None, train: bool = False):
    """Frontend → dropout → time mask → channel mask → Transformer.

    Args: inputs (``audio [B, S]``, ``padding_mask [B, S]``); mask bool ``[B, T]`` or None;
    channel_mask bool ``[B, D]`` or None. Returns (``x [B, T, D]``, frame padding ``[B, T]``).
    """
    f = self.frontend(inputs, train)
    x = self.input_dropout(f["features"], deterministic=not train)
    if mask is not None:
      if self.mask_kind == "learned":
        fill = self.mask_emb.astype(x.dtype)
      else:
        fill = (jax.random.normal(self.make_rng("dropout"), x.shape, jnp.float32)
                * self.mask_noise_std).astype(x.dtype)
      x = jnp.where(mask[..., None], fill, x)
    if channel_mask is not None:
      x = jnp.where(channel_mask[:, None, :], 0, x)
    # data2vec 2.0: relative positions are computed from the masked frames, as fairseq's
    # contextualized_features does when masked frames are kept (fine-tuning).
    x, _, pad = base.contextualize(self.context, self.encoder, x, f["padding_mask"], train)
    return x, pad

  def head(self, x, train: bool = False):
    """Dropout → Linear(D → V); fp32 logits ``[B, T, V]``."""
    return self.proj(self.output_dropout(x, deterministic=not train).astype(jnp.float32))

  def __call__(self, inputs: dict, train: bool = False):
    x, pad = self.body(inputs, None, None, train)
    return self.head(x, train), pad


def finetune_model_config(model_cfg, ft_cfg) -> ml_collections.ConfigDict:
  """The pre-trained model section with the fine-tuning overrides (spec §9.1, pitfall §11.33):
  the ASR config's dropout values replace the pre-training ones, and the CNN is frozen
  (``feature_grad_mult`` 0)."""
  # A deep copy: the caller's (possibly locked) config stays untouched.
  m = ml_collections.ConfigDict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict")
                                else dict(model_cfg))
  m.feature_grad_mult = 0.0
  m.dropout_input = float(ft_cfg.dropout_input)
  m.encoder.dropout = float(ft_cfg.dropout)
  m.encoder.attention_dropout = float(ft_cfg.attention_dropout)
  m.encoder.activation_dropout = float(ft_cfg.activation_dropout)
  m.encoder.layerdrop = float(ft_cfg.layerdrop)
  return m


class DelayedState(NamedTuple):
  count: jax.Array  # updates seen, saturating at the delay
  inner: Any


def delayed(inner: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
  """``inner`` switched off for the first ``steps`` updates: zero updates and an untouched inner
  state (so Adam's moments, bias correction and schedule count start at the first active update,
  and weight decay cannot move the parameters either)."""

  def init(params):
    return DelayedState(jnp.zeros((), jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    new_updates, new_inner = inner.update(updates, state.inner, params)
    active = state.count >= steps
    out = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates)
    kept = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_inner, state.inner)
    return out, DelayedState(jnp.minimum(state.count + 1, steps), kept)

  return optax.GradientTransformation(init, update)


@registry.register("objective", "ctc")
class Ctc(base.Encoder):
  """CTC fine-tuning: ``init``, ``loss``, ``predict``, ``make_optimizer``; ``encode`` (features of
  the fine-tuned encoder, without masks) comes from ``base.Encoder``.

  Config fields read: ``modality``, ``model`` (the pre-trained architecture), ``vocab`` (token
  list), ``finetune`` (``final_dropout``, ``dropout``, ``attention_dropout``,
  ``activation_dropout``, ``layerdrop``, ``dropout_input``, ``freeze_updates``, ``mask_kind``,
  ``mask_noise_std``).
  """

  def __init__(self, config):
    self.config = config
    ft = config.finetune
    (self.modality, self.model_cfg, self.encoder_cfg, dtype, frontend,
     context) = base.finetune_parts(config, finetune_model_config)
    m = self.model_cfg
    self.vocab = asr.Vocabulary(tuple(config.vocab))
    self.mask_kind = str(ft.mask_kind)
    self.model = CtcModel(
        frontend=frontend, context=context,
        encoder=transformer.TransformerEncoder(self.encoder_cfg), dim=self.encoder_cfg.dim,
        vocab_size=len(self.vocab), dropout_input=m.dropout_input,
        final_dropout=float(ft.final_dropout), mask_kind=self.mask_kind,
        mask_noise_std=float(ft.mask_noise_std))
    self.ema_scope: tuple[str, ...] = ()
    self.ema_copy: tuple[str, ...] = ()
    self.frozen = tuple(self.modality.frozen_patterns(m))  # the CNN (feature_grad_mult 0)
    self.freeze_updates = int(ft.freeze_updates)
    self.head_patterns = ("proj/.*",)

  # ------------------------------------------------------------------ params
  def init(self, rng: jax.Array, batch: dict) -> dict:
    """Fresh params from a batch with ``audio`` and ``padding_mask``."""
    inputs = {"audio": batch["audio"], "padding_mask": batch["padding_mask"]}
    return self.model.init({"params": rng}, inputs, False)["params"]

  def init_teacher(self, params: dict) -> dict:
    """No teacher in fine-tuning."""
    del params
    return {}

  def pretrained_keys(self) -> tuple[str, ...]:
    """Top-level param subtrees taken from a pre-trained checkpoint (those the model has)."""
    return (("frontend", "context", "encoder")
            + (("mask_emb",) if self.mask_kind == "learned" else ()))

  def make_optimizer(self, optim_cfg, lr_fn: Callable, params) -> optax.GradientTransformation:
    """AdamW (``optim.make_optimizer``) on three partitions: the CNN gets nothing, the output
    Linear trains from step 0, everything else is ``delayed`` by ``freeze_updates`` with the
    schedule shifted so that it still follows the global update count."""
    n = self.freeze_updates
    if n <= 0:
      return optim.make_optimizer(optim_cfg, lr_fn, params, self.frozen)
    frozen = [re.compile(p) for p in self.frozen]
    head = [re.compile(p) for p in self.head_patterns]

    def label(path, _):
      s = path_str(path)
      if any(r.fullmatch(s) for r in frozen):
        return "frozen"
      return "head" if any(r.fullmatch(s) for r in head) else "encoder"

    labels = jax.tree_util.tree_map_with_path(label, params)
    late = delayed(optim.make_optimizer(optim_cfg, lambda k: lr_fn(k + n), params), n)
    return optax.multi_transform({"head": optim.make_optimizer(optim_cfg, lr_fn, params),
                                  "encoder": late, "frozen": optax.set_to_zero()}, labels)

  # ------------------------------------------------------------------ forward
  def _body(self, params, inputs, mask, channel_mask, train, rng):
    rngs = None if rng is None else {"dropout": rng}
    return self.model.apply({"params": params}, inputs, mask, channel_mask, train,
                            method="body", rngs=rngs)

  def logits(self, params: dict, batch: dict, *, train: bool = False, rng=None, step: Any = 0):
    """``(logits [B, T, V] fp32, frame padding [B, T])``. In training the batch's ``mask`` and
    ``channel_mask`` are applied and the encoder is frozen while ``step < freeze_updates``."""
    inputs = {"audio": batch["audio"], "padding_mask": batch["padding_mask"]}
    mask = batch.get("mask") if train else None
    channel_mask = batch.get("channel_mask") if train else None
    body = lambda p: self._body(p, inputs, mask, channel_mask, train, rng)
    if train and self.freeze_updates > 0:
      x, pad = jax.lax.cond(jnp.asarray(step) < self.freeze_updates,
                            lambda p: body(jax.lax.stop_gradient(p)), body, params)
    else:
      x, pad = body(params)
    rngs = None if rng is None else {"dropout": jax.random.fold_in(rng, 1)}
    out = self.model.apply({"params": params}, x, train, method="head", rngs=rngs)
    return out, pad

  def loss(self, params: dict, teacher: dict, batch: dict, rng: jax.Array, train: bool = True,
           step: Any = 0):
    """Scalar loss (sum of utterance losses / utterances) and metrics."""
    del teacher
    logits, pad = self.logits(params, batch, train=train, rng=rng, step=step)
    per_row, skipped = ctc_loss(logits, pad, batch["labels"], batch["label_padding"])
    rows = batch.get("row_valid")
    rows = jnp.ones(per_row.shape, bool) if rows is None else rows
    w = rows.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    loss = jnp.sum(per_row * w) / n
    valid = (~pad).astype(jnp.float32)
    frames = jnp.maximum(jnp.sum(valid), 1.0)
    blank = (jnp.argmax(logits, axis=-1) == asr.BLANK).astype(jnp.float32)
    # ``masked_count`` is the loss denominator (utterances, fairseq ``sentence_avg``) under the
    # name the step's gradient accumulation normalises by.
    metrics = {"loss": loss, "masked_count": jnp.sum(w),
               "ctc_skipped": jnp.sum(skipped & rows).astype(jnp.float32),
               "blank_frac": jnp.sum(blank * valid) / frames,
               "frozen": (jnp.asarray(step) < self.freeze_updates).astype(jnp.float32)}
    if train and batch.get("mask") is not None:
      metrics["masked_frac"] = jnp.sum(batch["mask"] * valid) / frames
    if train and batch.get("channel_mask") is not None:
      metrics["channel_masked_frac"] = jnp.mean(batch["channel_mask"].astype(jnp.float32))
    return loss, metrics

  def predict(self, params: dict, batch: dict) -> dict:
    """Eval-mode forward for decoding: ``ids`` int32 ``[B, T]`` (argmax; blank on padded frames,
    as fairseq overwrites padded logits), ``lengths`` int32 ``[B]`` valid frames, ``loss`` fp32
    ``[B]`` and ``skipped`` bool ``[B]`` (CTC, when the batch has labels)."""
    logits, pad = self.logits(params, batch, train=False)
    ids = jnp.where(pad, asr.BLANK, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
    out = {"ids": ids, "lengths": jnp.sum(~pad, axis=1).astype(jnp.int32)}
    if "labels" in batch:
      out["loss"], out["skipped"] = ctc_loss(logits, pad, batch["labels"], batch["label_padding"])
    return out
