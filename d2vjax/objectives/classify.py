"""Classification / regression fine-tuning of a pre-trained encoder (fairseq-spec §9.2, §9.3).

Model: the pre-trained frontend and Transformer (the pre-training heads and the teacher are
dropped), run without masks, then a pooling head from the registry (``cls_head``):
``mean_pool`` (patch tokens, CLS left out → ``fc_norm`` → Linear; images) or ``first_token``
(RoBERTa's head on ``<s>``; sentences). The fine-tuning config's dropout, LayerDrop and
stochastic depth replace the pre-training ones (spec §9.2 "regularisation overrides").

Loss: cross-entropy against the host's soft targets ``targets [B, C]`` (label smoothing and
Mixup/CutMix already folded in, ``data.labelled.LabelFn``: timm's SoftTargetCrossEntropy, which
equals LabelSmoothingCrossEntropy without mixing), summed over rows and divided by the rows
(``sample_size`` = examples, spec §7.3); regression (``finetune.regression``, one output): the
squared error against ``targets [B, 1]``, summed / rows (fairseq ``sentence_prediction`` MSE).

Registered as ``image_classification`` and ``sentence_classification`` (one objective; the
``finetune_task`` of each name brings its data and evaluation, ``d2vjax/tasks/classify.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from d2vjax import optim, registry
from d2vjax.models import transformer
from d2vjax.objectives import base

LABEL_KEYS = ("labels", "targets", "row_valid")


class ClassifierModel(nn.Module):
  """Params: ``frontend``, ``context`` (data2vec 2.0 models only), ``encoder``, ``head``.
  ``__call__(inputs, train)`` → fp32 ``[B, num_outputs]``."""
  frontend: nn.Module
  encoder: nn.Module
  head: nn.Module
  context: Optional[nn.Module] = None

  def features(self, inputs: dict, train: bool = False) -> dict:
    """The frontend's outputs (``features [B, T, D]``, ``padding_mask [B, T]``)."""
    return self.frontend(inputs, train)

  def contextualize(self, x, padding_mask, train: bool = False):
    """[Context encoder →] Transformer: ``[B, T, D]`` → (``[B, T', D]``, layer results
    ``[L, B, T', D]``); T' includes a data2vec 2.0 context encoder's extra tokens (image CLS
    first, the layout the heads expect)."""
    x, results, _ = base.contextualize(self.context, self.encoder, x, padding_mask, train)
    return x, results

  def __call__(self, inputs: dict, train: bool = False):
    f = self.frontend(inputs, train)
    x, _, pad = base.contextualize(self.context, self.encoder, f["features"], f["padding_mask"],
                                   train)
    return self.head(x, pad, train)


def finetune_model_config(model_cfg, ft_cfg) -> ml_collections.ConfigDict:
  """The pre-trained model section with the fine-tuning regularisation (``finetune.dropout``,
  ``attention_dropout``, ``activation_dropout``, ``layerdrop``, ``drop_path``) in place of the
  pre-training values (a deep copy)."""
  m = ml_collections.ConfigDict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict")
                                else dict(model_cfg))
  for key in ("dropout", "attention_dropout", "activation_dropout", "layerdrop", "drop_path"):
    if ft_cfg.get(key) is not None:
      m.encoder[key] = float(ft_cfg[key])
  return m


def model_inputs(batch: dict) -> dict:
  """The frontend's inputs: the batch without labels and row flags."""
  return {k: v for k, v in batch.items() if k not in LABEL_KEYS}


@registry.register("objective", "sentence_classification")
@registry.register("objective", "image_classification")
class Classify(base.Encoder):
  """Fine-tuning with a pooled head: ``init``, ``loss``, ``predict``, ``make_optimizer``.

  Config fields read: ``modality``, ``model`` (the pre-trained architecture), ``num_classes``
  (ignored for regression), ``finetune`` (``head`` dict: ``kind`` plus the head's fields;
  ``regression``; the regularisation overrides of ``finetune_model_config``).
  """

  def __init__(self, config):
    self.config = config
    ft = config.finetune
    (self.modality, self.model_cfg, self.encoder_cfg, dtype, frontend,
     context) = base.finetune_parts(config, finetune_model_config)
    m = self.model_cfg
    self.regression = bool(ft.get("regression", False))
    self.num_outputs = 1 if self.regression else int(config.num_classes)
    head_cfg = dict(ft.head)
    head_cls = registry.get("cls_head", head_cfg.pop("kind"))
    self.model = ClassifierModel(
        frontend=frontend, context=context, encoder=transformer.TransformerEncoder(self.encoder_cfg),
        head=head_cls(num_outputs=self.num_outputs, **head_cfg))
    self.ema_scope: tuple[str, ...] = ()
    self.ema_copy: tuple[str, ...] = ()
    self.frozen = tuple(self.modality.frozen_patterns(m))

  def init(self, rng: jax.Array, batch: dict) -> dict:
    """Fresh params (the modality's init adjustments applied) from a batch of model inputs."""
    params = self.model.init({"params": rng}, model_inputs(batch), False)["params"]
    return self.modality.post_init(params, self.model_cfg)

  def init_teacher(self, params: dict) -> dict:
    """No teacher in fine-tuning."""
    del params
    return {}

  def pretrained_keys(self) -> tuple[str, ...]:
    """Top-level param subtrees taken from a pre-trained checkpoint (those the model has)."""
    return ("frontend", "context", "encoder")

  def make_optimizer(self, optim_cfg, lr_fn: Callable, params) -> optax.GradientTransformation:
    """AdamW with the config's no-decay and layer-decay settings (``optim.make_optimizer``)."""
    return optim.make_optimizer(optim_cfg, lr_fn, params, self.frozen)

  def outputs(self, params: dict, batch: dict, *, train: bool = False, rng=None) -> jax.Array:
    """fp32 ``[B, C]`` logits (``[B, 1]`` for regression)."""
    rngs = None if rng is None else {"dropout": rng}
    return self.model.apply({"params": params}, model_inputs(batch), train, rngs=rngs)

  def _per_row(self, out, batch):
    if self.regression:
      return jnp.sum(jnp.square(out - batch["targets"]), axis=-1)
    return -jnp.sum(batch["targets"] * jax.nn.log_softmax(out, axis=-1), axis=-1)

  def loss(self, params: dict, teacher: dict, batch: dict, rng: jax.Array, train: bool = True,
           step: Any = 0):
    """Scalar loss (sum over rows / rows) and metrics (``accuracy`` against ``labels`` for
    classification: with Mixup/CutMix that is the row's own, dominant-or-not, label)."""
    del teacher, step
    out = self.outputs(params, batch, train=train, rng=rng)
    per_row = self._per_row(out, batch)
    rows = batch.get("row_valid")
    w = jnp.ones(per_row.shape, jnp.float32) if rows is None else rows.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    loss = jnp.sum(per_row * w) / n
    # ``masked_count`` is the loss denominator (rows) under the name gradient accumulation reads.
    metrics = {"loss": loss, "masked_count": jnp.sum(w)}
    if not self.regression:
      hit = (jnp.argmax(out, axis=-1) == batch["labels"]).astype(jnp.float32)
      metrics["accuracy"] = jnp.sum(hit * w) / n
    return loss, metrics

  def predict(self, params: dict, batch: dict) -> dict:
    """Eval-mode outputs: ``outputs`` fp32 ``[B, C]`` and, with ``targets`` in the batch, the
    per-row ``loss`` fp32 ``[B]``."""
    out = self.outputs(params, batch, train=False)
    res = {"outputs": out}
    if "targets" in batch:
      res["loss"] = self._per_row(out, batch)
    return res
