"""Vision modality (data2vec 1.0, BEiT ViT): patch embedding + CLS, BEiT block masks on the patch
grid, BEiT's initialisation, and the image pipeline (fairseq-spec §4.3, §2.7; data2vec §4.1).

Reference: ``facebookresearch/data2vec_vision`` ``beit/`` (``modeling_cyclical.py``,
``engine_for_cyclical.py``, ``datasets.py``), which fairseq-spec pitfall §11.35 names as the v1
vision reference. What follows it and what differs is listed in docs/semantics.md (vision).
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from d2vjax import registry
from d2vjax.modalities.base import Modality
from d2vjax.models import vision

_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")


def _beit_layer_init(layer: dict, layer_ids) -> dict:
  """One layer subtree (or the scan-stacked subtree, leading axis L) with BEiT's Linear init:
  truncated normal weights (``vision.to_trunc_normal`` of the shared encoder's N(0, 0.02)
  samples), then ``fix_init_weight``: attention out-proj and fc2 divided by sqrt(2·layer_id)."""
  layer = dict(layer)
  attn = dict(layer["self_attn"])
  trunc = lambda sub: {**sub, "kernel": vision.to_trunc_normal(sub["kernel"], "normal")}
  for name in _ATTN:
    attn[name] = trunc(attn[name])
  layer["fc1"], layer["fc2"] = trunc(layer["fc1"]), trunc(layer["fc2"])
  # layer_ids: an int (unrolled layer) or an int array [L] (scanned stack, axis 0).
  ids = jnp.asarray(layer_ids, jnp.float32)
  scale = lambda k: k / jnp.sqrt(2.0 * ids).reshape(ids.shape + (1,) * (k.ndim - ids.ndim))
  attn["out_proj"] = {**attn["out_proj"], "kernel": scale(attn["out_proj"]["kernel"])}
  layer["fc2"] = {**layer["fc2"], "kernel": scale(layer["fc2"]["kernel"])}
  layer["self_attn"] = attn
  return layer


@registry.register("modality", "vision")
class Vision(Modality):
  """Images: input ``image`` float32 ``[B, H, W, 3]`` (NHWC, ImageNet-normalised); the frontend
  emits ``1 + (H/p)·(W/p)`` tokens (CLS first) and ``mask`` is bool ``[B, 1 + N]`` with the CLS
  column always False."""

  name = "vision"
  unit = "images"  # throughput unit: images per second
  # The student's masking is done by the frontend's own mask token (BEiT's ``mask_token``) from
  # ``batch['mask']``; the teacher re-embeds the clean image with its own weights. With
  # ``ema.scope = ('frontend', 'encoder')`` the teacher is the EMA of the whole network, as in the
  # official recipe (timm ModelEmaV2 of the model); with ``('encoder',)`` it uses the student's
  # current patch embedding and CLS, as the fairseq port does (spec §5.4).
  feature_masking = False

  @staticmethod
  def student_inputs(batch: dict) -> dict:
    """The image and the mask (the frontend replaces masked patches by its mask token)."""
    return {"image": batch["image"], "mask": batch["mask"]}

  @staticmethod
  def teacher_inputs(batch: dict) -> dict:
    """The unmasked image: the same augmented view as the student's (data2vec §4.1)."""
    return {"image": batch["image"]}

  @staticmethod
  def frontend(model_cfg, dim: int, dtype):
    """``ImageFrontend``: Conv p×p stride p → ``[B, N, D]``, learned CLS in front."""
    return vision.ImageFrontend(dim, int(model_cfg.patch_size), dtype)

  @staticmethod
  def local_encoder(model_cfg, dim: int, dtype):
    """data2vec 2.0: ``PatchFrontend`` (xavier patch conv + fixed 2-D sin-cos, no CLS)."""
    return vision.PatchFrontend(dim, int(model_cfg.patch_size), dtype)

  @staticmethod
  def post_init(params: dict, model_cfg) -> dict:
    """BEiT's init (``VisionTransformerForCyclicalTraining``): truncated-normal (±1 std, std
    0.02) Linear weights with zero biases everywhere, including the regression head
    (``lm_head``), then attention ``proj`` and ``fc2`` weights divided by sqrt(2·layer_id),
    layer_id from 1. The shared modules draw N(0, 0.02) (Transformer) and PyTorch-default
    uniforms (head); each is mapped onto BEiT's distribution exactly (``vision.to_trunc_normal``),
    so no extra RNG is needed. The frontend (patch conv, CLS, mask token) is drawn from BEiT's
    distribution directly.
    """
    del model_cfg
    params = dict(params)
    enc = dict(params["encoder"])
    if "layers" in enc:  # scan=True: params stacked along axis 0
      n = jnp.shape(enc["layers"]["fc2"]["kernel"])[0]
      enc["layers"] = _beit_layer_init(enc["layers"], jnp.arange(1, n + 1))
    i = 0
    while f"layers_{i}" in enc:  # scan=False: one subtree per layer
      enc[f"layers_{i}"] = _beit_layer_init(enc[f"layers_{i}"], i + 1)
      i += 1
    params["encoder"] = enc
    head = dict(params["head"])
    if "proj" in head:  # one Linear D→D: PyTorch default U(±1/sqrt(D)) → BEiT's init, bias 0
      k = head["proj"]["kernel"]
      head["proj"] = {"kernel": vision.to_trunc_normal(k, "uniform", bound=1.0 / math.sqrt(
          k.shape[0])), "bias": jnp.zeros_like(head["proj"]["bias"])}
    params["head"] = head
    return params

  @staticmethod
  def dummy_batch(data_cfg, batch_size: int = 1) -> dict:
    """All-zero batch with the pre-training keys (``image`` and ``mask``), for shape inference."""
    s, p = int(data_cfg.image_size), int(data_cfg.patch_size)
    return {"image": np.zeros((batch_size, s, s, 3), np.float32),
            "mask": np.zeros((batch_size, 1 + (s // p) ** 2), bool)}

  @staticmethod
  def mask_fn(mask_cfg):
    """Host masking policy: one BEiT block mask per image (fairseq-spec §2.7) with exactly
    ``num_masking_patches`` patches, computed in the data workers (picklable)."""
    from d2vjax.data import image, multimask  # pylint: disable=g-import-not-at-top
    if multimask.is_multi_mask(mask_cfg):
      # data2vec 2.0: M inverse block masks per image, ``mask`` bool [B, M, N] (spec §2.4).
      return multimask.multi_mask_fn(
          mask_cfg, functools.partial(patch_positions, patch_size=int(mask_cfg["patch_size"])))
    return image.beit_mask_fn(mask_cfg)

  @staticmethod
  def examples(data_cfg, split: str):
    """``(examples, skipped_counts)`` of a split, from ``data_cfg.source``."""
    from d2vjax.data import image  # pylint: disable=g-import-not-at-top
    return image.examples_from_config(data_cfg, split)

  @staticmethod
  def batch_plan(data_cfg, examples, batch_multiple: int):
    """One static batch shape ``(rows, S, S, 3)`` and the batches per epoch."""
    from d2vjax.data import image  # pylint: disable=g-import-not-at-top
    return image.plan_from_config(data_cfg, examples, batch_multiple)

  @staticmethod
  def make_iterator(data_cfg, **kw):
    """Grain iterator over this process's share of the batches (``make_image_iterator``)."""
    from d2vjax.data import image  # pylint: disable=g-import-not-at-top
    return image.make_image_iterator(data_cfg, **kw)

  @staticmethod
  def batch_units(batch: dict) -> float:
    """Images in a host batch."""
    return float(batch["image"].shape[0])


def patch_positions(batch: dict, patch_size: int) -> tuple[int, int]:
  """(rows, patches) of a host batch: the maskable positions of data2vec 2.0."""
  b, h, w = batch["image"].shape[:3]
  return b, (h // patch_size) * (w // patch_size)
