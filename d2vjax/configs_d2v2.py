"""data2vec 2.0 config builders (``configs/*_d2v2_*.py`` stay thin).

Sources, cited per value: fairseq-spec §8.1 (model table, from ``examples/data2vec/config/v2/
{base,large}_{audio,images,text}_only_task.yaml`` + the dataclass defaults), §8.2 (optimisation),
§8.3 (image pipeline), §6.2/§6.5/§6.7 (encoders, decoders, targets), §2.4/§2.5 (masks) and the
data2vec 2.0 paper (Baevski et al. 2022, "Efficient Self-supervised Learning with Contextualized
Target Representations", §4, Table 6-8 settings). Sections shared with data2vec 1.0 come from
``configs_lib`` (``optimizer``, ``run_fields``, ``speech_data``), ``configs_vision.image_data`` and
``configs_text`` (``text_data``, ``text_model``).

Deliberate choice: weight decay hits every parameter, as the shipped fairseq runs do (spec §6.10:
the no-decay tags are never applied); ``--config.optim.no_decay`` can exempt paths.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from d2vjax import configs_lib as cl
from d2vjax import configs_text as ct
from d2vjax import configs_vision as cv
from d2vjax.data.tokenizer import EMBEDDED_VOCAB_SIZE

_ph = config_dict.placeholder


def _encoder(size: str, *, dropout: float, layerdrop: float, norm_eps: float, **kw) -> dict:
  """The shared trunk: post-LN AltBlocks (spec §1.6), no input LN or input dropout
  (``dropout_input`` 0), FFN-output targets, no positional encoder (the context encoder has it)."""
  e = dict(
      variant=size,
      num_layers=_ph(int), dim=_ph(int), ffn_dim=_ph(int), num_heads=_ph(int),
      # encoder_dropout = post_mlp_drop (spec §8.1: 0.1 / 0.1 by default, 0 for images).
      dropout=dropout, attention_dropout=dropout, activation_dropout=0.0,
      layerdrop=layerdrop,
      layer_norm_first=False,  # data2vec 2.0 is always post-LN (spec §1.6)
      input_layer_norm=False, input_dropout=0.0,  # spec §6.1: dropout_input 0, no trunk LN
      pos_encoder="none", attn_bias="none", layer_result="ffn",  # targets: FFN out (spec §6.6)
      norm_eps=norm_eps, scan=True, remat="none", dtype="float32")
  e.update(kw)
  return e


def _context(**kw) -> dict:
  c = dict(rel_pos="none", pos_width=95, pos_depth=5, pos_groups=16, alibi=False,
           alibi_scale=1.0, extra_tokens=0, norm=True, prenet_depth=0, prenet_dropout=0.0,
           prenet_layerdrop=0.0)
  c.update(kw)
  return c


def _decoder(**kw) -> dict:
  d = dict(kind="1d", dim=384, kernel=7, layers=4, groups=16, residual=True, projection_layers=1,
           input_dropout=0.1, noise_std=0.01)  # mask_noise_std 0.01 (spec §6.5, §8.1)
  d.update(kw)
  return d


def _sections(c, *, targets: dict, loss: dict, ema: dict) -> None:
  c.targets = ml_collections.ConfigDict({"eps": 1e-5, **targets})
  # L2 (loss_beta 0), scale ≤ 0 → 1/sqrt(D) (loss_scale null), no CLS loss (spec §6.8)
  c.loss = ml_collections.ConfigDict({"beta": 0.0, "scale": -1.0, "cls_weight": 0.0,
                                      "cls_rows": 0, **loss})
  c.ema = ml_collections.ConfigDict({"anneal_percent": _ph(float), "anneal_epochs": _ph(float),
                                     "copy": (), **ema})


def speech(size: str) -> ml_collections.ConfigDict:
  """data2vec 2.0 speech: Base on LS-960, Large on LL-60k (spec §8.1/§8.2, §6.2)."""
  base = size == "base"
  c = ml_collections.ConfigDict()
  c.modality = "speech"
  c.objective = "data2vec2"
  c.model = ml_collections.ConfigDict(dict(
      extractor_mode="layer_norm", conv_bias=False, conv_channels=512,  # spec §6.2 (CNN as §1.2)
      feature_grad_mult=1.0,
      local_dropout=0.0,  # the local encoder has no dropout (spec §6.2)
      # depth 12 (the Base variant's) / 16 + 8 prenet blocks (spec §8.1)
      encoder=_encoder(size, dropout=0.1, layerdrop=0.05 if base else 0.0, norm_eps=1e-5,
                       num_layers=None if base else 16),
      context=_context(
          rel_pos="conv_stack", pos_width=95, pos_depth=5, pos_groups=16,  # k 19 × 5 (spec §6.2)
          alibi=True, alibi_scale=1.0,  # learned per-head scale (spec §1.7)
          norm=True, prenet_depth=0 if base else 8, prenet_dropout=0.1,  # spec §8.1
          prenet_layerdrop=0.05 if base else 0.0),
      # Decoder1d 384 (Large 768) ch, k 7, 4 layers, 16 groups, residual (spec §6.5)
      decoder=_decoder(kind="1d", dim=384 if base else 768, kernel=7, layers=4, groups=16,
                       residual=True, projection_layers=1, input_dropout=0.1),
  ))
  c.masking = ml_collections.ConfigDict(dict(
      kind="block_1d", clones=8 if base else 12,  # clone_batch (spec §8.1)
      mask_prob=0.5 if base else 0.55, mask_length=5,  # spec §2.4 table
      mask_prob_adjust=0.05 if base else 0.1, inverse=False))
  _sections(c, targets=dict(top_k=8 if base else 16, layer_norm="instance", final_norm="none"),
            loss=dict(),  # L2, 1/sqrt(D) (spec §8.1)
            ema=dict(decay=0.999 if base else 0.9997, end_decay=0.99999 if base else 1.0,
                     anneal_steps=75_000 if base else 300_000,  # spec §8.1
                     # teacher: context encoder (conv-pos, ALiBi scale, LN, prenet) + trunk;
                     # it reuses the student's CNN features (spec §5.4, §6.6)
                     scope=("context", "encoder")))
  c.optim = cl.optimizer(7.5e-4 if base else 4e-4, schedule="cosine",  # spec §8.2
                         clip_norm=0.0 if base else 1.0)
  c.optim.warmup_steps = 8000 if base else 10_000
  cl.run_fields(c, 400_000 if base else 600_000)
  c.data = cl.speech_data()
  # 8 GPUs × 1.0M samples (Base), 48 × 320k (Large) per update (spec §8.2).
  c.data.budget_samples = 8_000_000 if base else 15_360_000
  return c


def speech_cpu_preset(c, total_steps: int = 300) -> None:
  """The speech CPU preset (``configs_lib.cpu_preset``: 4 × 256, 64-ch CNN, embedded corpus, 300
  steps) plus the data2vec 2.0 parts at CPU scale: 4 clips × 2 s (one batch shape, one compile)
  with 4 clones each, so the student encodes 16 × 50 frames (about data2vec 1.0's preset cost);
  decoder 192 ch (half of D, as 384 of 768); top 3 of 4 layers; warm-up and EMA anneal over the
  run."""
  cl.cpu_preset(c, total_steps)
  c.model.encoder.num_layers = None  # the tiny variant's 4
  c.model.context.update(dict(prenet_layerdrop=0.0,
                              prenet_depth=min(1, c.model.context.prenet_depth)))
  c.model.decoder.dim = 192
  c.masking.clones = 4
  c.data.update(dict(buckets=[32000], budget_samples=4 * 32000))
  c.optim.warmup_steps = max(1, total_steps // 10)
  # A short run needs a teacher that moves: τ 0.999 → 0.9999 over the run (as the v1 preset).
  c.ema.end_decay = 0.9999


def speech_test_preset(c, total_steps: int = 8) -> None:
  """Unit-test preset: ``configs_lib.test_preset`` (2 × 64, 1 s crops, 4 rows), 2 clones,
  decoder 32 ch."""
  cl.test_preset(c, total_steps)
  c.model.context.update(dict(pos_width=15, pos_depth=3, pos_groups=4, prenet_layerdrop=0.0))
  c.model.decoder.update(dict(dim=32, groups=4, layers=2))
  c.masking.clones = 2
  c.optim.warmup_steps = 2
  c.ema.end_decay = 0.9999


def vision(size: str) -> ml_collections.ConfigDict:
  """data2vec 2.0 vision ViT-B/16 or ViT-L/16 on ImageNet-1k (spec §8.1–8.3, §6.2)."""
  base = size == "base"
  patch = config_dict.FieldReference(16)
  c = ml_collections.ConfigDict()
  c.modality = "vision"
  c.objective = "data2vec2"
  c.model = ml_collections.ConfigDict(dict(
      patch_size=patch, local_dropout=0.0,
      # Base: 10 main + 2 prenet blocks; Large: 24 + 0 (spec §8.1); all dropouts 0
      encoder=_encoder(size, dropout=0.0, layerdrop=0.0, norm_eps=1e-6,
                       num_layers=10 if base else 24),
      context=_context(extra_tokens=1,  # CLS, N(0, 1) (spec §6.2, §1.8)
                       norm=True, prenet_depth=2 if base else 0, prenet_dropout=0.0),
      # Decoder2d 768 ch k 3 × 6 (Base), 1024 ch k 5 × 3 (Large), 16 groups (spec §6.5)
      decoder=_decoder(kind="2d", dim=768 if base else 1024, kernel=3 if base else 5,
                       layers=6 if base else 3, groups=16, residual=True, projection_layers=1,
                       input_dropout=0.0),
  ))
  c.masking = ml_collections.ConfigDict(dict(
      kind="block_2d", clones=16, patch_size=patch,  # spec §8.1
      # inverse: blocks mark what is KEPT; Base keeps 39 of 196, Large 49 (spec §2.4)
      mask_prob=0.8 if base else 0.75, mask_length=3, mask_prob_adjust=0.07 if base else 0.1,
      inverse=True))
  # CLS loss 0.01, summed over one GPU's 16 (Large 8) images × 16 clones (spec §6.8, §8.2).
  _sections(c, targets=dict(top_k=10 if base else 18, layer_norm="instance", final_norm="layer"),
            loss=dict(cls_weight=0.01, cls_rows=(16 if base else 8) * 16),
            ema=dict(decay=0.9998, end_decay=0.99999,
                     anneal_steps=100_000 if base else 150_000,  # spec §8.1
                     # ema_local_encoder: the teacher re-embeds the image (spec §5.4)
                     scope=("frontend", "context", "encoder")))
  c.optim = cl.optimizer(1e-3 if base else 4e-4, b1=0.9, b2=0.95, eps=1e-8,  # spec §8.2
                         weight_decay=0.05, clip_norm=4.0, schedule="cosine")
  c.optim.warmup_steps = 50_040  # 10 epochs of 5004 (spec §8.2)
  cl.run_fields(c, 375_300)  # 75 epochs at 256 images per update (spec §8.2)
  c.guard.min_value = 0.0  # images disable the collapse guard (spec §6.8)
  c.data = cv.image_data(224, patch)
  c.data.update(dict(batch_size=256 if base else 128,  # 16 GPUs × 16 / × 8 (spec §8.2)
                     crop_scale=(0.2, 1.0), color_jitter=0.0))  # MAE pipeline (spec §8.3)
  return c


def vision_cpu_preset(c, total_steps: int = 300) -> None:
  """Laptop/CI preset on the embedded images: 64-px images, 8-px patches (8×8 grid, keep 12 of
  64), a 1 prenet + 3 main-block ViT of width 192, decoder 192 ch × 2, 8 images × 4 clones
  (grouped 2-D convolutions dominate a 2-core step)."""
  c.model.patch_size = 8  # also data.patch_size and masking.patch_size
  c.model.encoder.update(dict(num_layers=3, dim=192, ffn_dim=768, num_heads=3))
  c.model.context.prenet_depth = 1
  c.model.decoder.update(dict(dim=192, layers=2))
  c.masking.clones = 4
  c.targets.top_k = 3
  c.loss.cls_rows = 8 * 4
  c.data.update(dict(image_size=64, batch_size=8, cache_images=64, num_workers=0))
  c.ema.update(dict(decay=0.999, end_decay=0.9999, anneal_steps=total_steps))
  c.optim.warmup_steps = max(1, total_steps // 10)
  c.total_steps = total_steps
  c.log_every = 10
  c.ckpt_every = 100
  c.guard.patience = 5


def vision_test_preset(c, total_steps: int = 8) -> None:
  """Unit-test preset: 32-px images (4×4 grid), 1 + 1 blocks × 64, 4 images × 2 clones."""
  vision_cpu_preset(c, total_steps)
  c.model.encoder.update(dict(num_layers=1, dim=64, ffn_dim=128, num_heads=2))
  c.model.decoder.update(dict(dim=32, groups=4, layers=2))
  c.masking.clones = 2
  c.targets.top_k = 1
  c.loss.cls_rows = 0
  c.data.update(dict(image_size=32, batch_size=4))
  c.log_every = 1
  c.ckpt_every = 4
  c.async_checkpointing = False
  c.tensorboard = False


def text(size: str) -> ml_collections.ConfigDict:
  """data2vec 2.0 text Base / Large on Books + Wikipedia (spec §8.1/§8.2, §6.2)."""
  base = size == "base"
  vocab = config_dict.FieldReference(ct.ROBERTA_VOCAB_SIZE)
  c = ml_collections.ConfigDict()
  c.modality = "text"
  c.objective = "data2vec2"
  c.model = ct.text_model(size, vocab)
  del c.model["head_layers"], c.model["dropout_input"]
  c.model.local_dropout = 0.1  # embedding dropout inside the local encoder (spec §6.2)
  c.model.encoder = _encoder(size, dropout=0.1, layerdrop=0.0, norm_eps=1e-5)  # spec §8.1
  # No prenet, no LN, no dropout: the context encoder is the identity (spec §6.2).
  c.model.context = _context(norm=False)
  # Decoder1d 768 ch, k 9, 5 layers, 1 group, no residual, 2-layer projection (spec §6.5)
  c.model.decoder = _decoder(kind="1d", dim=768, kernel=9, layers=5, groups=1, residual=False,
                             projection_layers=2, input_dropout=0.1)
  c.masking = ml_collections.ConfigDict(dict(
      kind="random", clones=8,  # spec §8.1
      mask_prob=0.48 if base else 0.5, mask_length=1, mask_prob_adjust=0.0, inverse=False))
  _sections(c, targets=dict(top_k=12 if base else 24,  # spec §8.1
                            layer_norm="instance" if base else "layer",
                            final_norm="none" if base else "instance"),
            loss=dict(scale=1.0),  # loss_scale 1 (spec §6.8)
            ema=dict(decay=0.9999, end_decay=0.99999, anneal_steps=100_000,  # spec §8.1
                     scope=("encoder",)))  # ema_encoder_only (spec §5.4)
  c.optim = cl.optimizer(2e-4 if base else 1e-4, schedule="cosine", clip_norm=1.0)  # spec §8.2
  c.optim.warmup_steps = 4000
  cl.run_fields(c, 1_000_000 if base else 600_000)
  c.data = ct.text_data(vocab)
  # 16 GPUs × 4 (Base) / 32 × 2 (Large) sequences of 512 tokens per update (spec §8.2).
  c.data.budget_tokens = 64 * 512
  return c


def text_cpu_preset(c, total_steps: int = 300) -> None:
  """Laptop/CI preset at ``configs_text.text_cpu_preset``'s scale (4 × 256, embedded BPE,
  128-token blocks): 4 blocks × 4 clones (one batch shape), decoder 64 ch (768 × 9 × 768
  convolutions over every clone would dominate a 2-core step)."""
  c.model.encoder.variant = "tiny"
  c.model.vocab_size = EMBEDDED_VOCAB_SIZE  # also masking/data.vocab_size (one reference)
  c.model.decoder.dim = 64
  c.masking.clones = 4
  c.targets.top_k = 4
  c.data.update(dict(source="embedded", tokenizer="", tokens_per_sample=128, buckets=[128],
                     budget_tokens=4 * 128, num_workers=0))
  c.total_steps = total_steps
  c.ema.update(dict(decay=0.999, end_decay=0.9999, anneal_steps=total_steps))
  c.optim.peak_lr = 1e-3
  c.optim.warmup_steps = max(1, total_steps // 10)
  c.log_every = 10
  c.ckpt_every = 100
  c.guard.patience = 5


def text_test_preset(c, total_steps: int = 8) -> None:
  """Unit-test preset: 2 layers × 64, 64-token blocks, 2 clones, decoder 32 ch × 2."""
  text_cpu_preset(c, total_steps)
  c.model.encoder.update(dict(num_layers=2, dim=64, ffn_dim=128, num_heads=2))
  c.model.decoder.update(dict(dim=32, layers=2))
  c.masking.clones = 2
  c.targets.top_k = 2
  c.data.update(dict(tokens_per_sample=64, buckets=[32, 64], budget_tokens=4 * 64))
  c.log_every = 1
  c.ckpt_every = 4
  c.async_checkpointing = False
  c.tensorboard = False
