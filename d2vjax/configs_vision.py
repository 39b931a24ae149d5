"""Config builders for data2vec 1.0 vision (BEiT ViT) pre-training; ``configs/vision_*.py`` are
thin wrappers. Shared sections come from ``configs_lib`` (``optimizer``, ``run_fields``).

Sources, cited per value: the official recipe is the ViT-B / ViT-L pre-training command of
``facebookresearch/data2vec_vision`` ``beit/README.md`` ("README") together with the defaults of
``beit/run_cyclical.py`` ("run_cyclical"), ``beit/engine_for_cyclical.py`` ("engine"),
``beit/modeling_cyclical.py`` ("modeling") and ``beit/datasets.py`` ("datasets"), which
fairseq-spec §4.3 and pitfall §11.35 name as the v1 vision reference; the data2vec paper §4.1
("paper"). Where the spec summary, the paper and the code disagree, the code that produced the
released checkpoints wins and the disagreement is noted (docs/semantics.md, vision).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from d2vjax import configs_lib

# ImageNet-1k train images (ILSVRC2012), for the step count of the 800-epoch schedule.
IMAGENET_TRAIN_IMAGES = 1_281_167

# Per size: README pre-training commands (ViT-B: 16 GPUs × 128; ViT-L: 64 GPUs × 64).
_SIZES = {
    "base": dict(batch=16 * 128, lr=2e-3, warmup_epochs=10, drop_path=0.25, layer_scale=1e-4,
                 attention_dropout=0.05, dim=768),
    "large": dict(batch=64 * 64, lr=1e-3, warmup_epochs=80, drop_path=0.2, layer_scale=1e-5,
                  attention_dropout=0.15, dim=1024),
}

# Parameters without weight decay: BEiT's optim_factory exempts 1-D parameters and biases
# (LayerNorm, layer-scale gains, q/v biases) and the model's no_weight_decay() names
# {pos_embed, cls_token}; the mask token and the relative-position table are decayed.
NO_DECAY = (".*/bias", ".*/scale", ".*/gamma_1", ".*/gamma_2", "frontend/cls_token")


def image_data(image_size: int, patch_size) -> ml_collections.ConfigDict:
  """Image data section (fields documented in d2vjax/data/image.py)."""
  return ml_collections.ConfigDict(dict(
      source="embedded",  # embedded | folder | tfds
      folder="", tfds_name="", tfds_data_dir="",
      train_split="train", valid_split="val",  # ILSVRC2012 folder names
      image_size=image_size,  # 224 (README: beit_*_patch16_224)
      patch_size=patch_size,  # shared reference with model.patch_size
      batch_size=16 * 128,  # global images per update (README ViT-B: 16 GPUs × 128)
      crop_scale=(0.08, 1.0), crop_ratio=(3.0 / 4.0, 4.0 / 3.0),  # datasets: RandomResizedCrop
      interpolation="bicubic",  # run_cyclical --train_interpolation
      hflip=0.5,  # datasets: RandomHorizontalFlip(p=0.5)
      color_jitter=0.4,  # run_cyclical --color_jitter (brightness, contrast, saturation; no hue)
      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),  # --imagenet_default_mean_and_std
      min_image_size=16,  # smaller images are skipped and counted (a patch needs 16 px)
      cache_images=0,  # decoded images kept per process (for small datasets)
      num_workers=2, num_threads=2, prefetch=4,
      seed=0,
  ))


def data2vec_vision(size: str) -> ml_collections.ConfigDict:
  """data2vec 1.0 vision pre-training on ImageNet-1k, ViT-B/16 (``base``) or ViT-L/16
  (``large``), 800 epochs (README; fairseq-spec §4.3)."""
  if size not in _SIZES:
    raise ValueError(f"vision size must be one of {sorted(_SIZES)}, got {size!r}")
  s = _SIZES[size]
  # One patch size for the frontend, the data check and the mask grid; overriding any of them
  # (e.g. --config.model.patch_size=8) changes all three.
  patch = config_dict.FieldReference(16)  # README: beit_*_patch16_224
  c = ml_collections.ConfigDict()
  c.modality = "vision"
  c.objective = "data2vec"
  c.model = ml_collections.ConfigDict(dict(
      patch_size=patch,
      head_layers=1,  # modeling: lm_head = Linear(D, D) on the final-LN output
      dropout_input=0.0,  # modeling: pos_drop rate = drop_rate = 0
      encoder=dict(
          variant=size,  # ViT-B 12×768×12 heads / ViT-L 24×1024×16 heads (modeling)
          num_layers=config_dict.placeholder(int), dim=config_dict.placeholder(int),
          ffn_dim=config_dict.placeholder(int), num_heads=config_dict.placeholder(int),
          dropout=0.0,  # modeling: drop_rate 0 (Mlp and attention-projection dropout)
          attention_dropout=s["attention_dropout"],  # README --attn_drop_rate
          activation_dropout=0.0,  # modeling: Mlp has no dropout after GELU
          layerdrop=0.0,  # BEiT has no LayerDrop; stochastic depth instead
          drop_path=s["drop_path"],  # README --drop_path, linear 0 → rate over the blocks
          layer_scale=s["layer_scale"],  # README --layer_scale_init_value
          layer_norm_first=True,  # pre-LN blocks + final LayerNorm (modeling)
          qkv_bias="qv",  # modeling: q_bias and v_bias, no key bias
          layer_result="block",  # README --layer_results end: block outputs are the targets
          attn_bias="beit_shared",  # run_cyclical: shared relative position bias, no abs. pos.
          pos_encoder="none",
          norm_eps=1e-6,  # modeling: LayerNorm eps 1e-6
          scan=True, remat="none", dtype="float32",
          residual_tensor=False,  # also split D over 'tensor' between blocks (docs/scaling.md)
      ),
  ))
  c.masking = ml_collections.ConfigDict(dict(
      patch_size=patch,
      num_masking_patches=120,  # README --num_mask_patches (of 196; paper: 60 %)
      min_num_patches=16,  # README --min_mask_patches_per_block (paper: blocks >= 16 patches)
      max_num_patches=196,  # README --max_mask_patches_per_block
      # BEiT MaskingGenerator: aspect 0.3 … 1/0.3 (max_aspect None → 1/min_aspect)
      min_aspect=0.3, max_aspect=config_dict.placeholder(float),
  ))
  c.targets = ml_collections.ConfigDict(dict(
      top_k=6,  # README --target_layers [6..11] / [18..23]: the top 6 blocks (paper: K = 6)
      layer_norm="layer",  # engine: target_layer_norm_last=True → LN of each target layer
      final_norm="layer",  # README --post_target_layer_norm → LN of the average
      eps=1e-5,  # engine: F.layer_norm default eps
  ))
  c.loss = ml_collections.ConfigDict(dict(
      beta=2.0,  # README --l1_beta 2.0 (paper: β = 2)
      # engine: F.smooth_l1_loss(mean) = sum over channels / D, then mean over masked patches;
      # --loss_scale -1 adds nothing. Must follow model.encoder.dim (fairseq's port uses 1/sqrt(D)).
      scale=1.0 / s["dim"],
  ))
  c.ema = ml_collections.ConfigDict(dict(
      # README --ema_decay 0.9998 --ema_start_at 0: the engine anneals from --ema_decay_init only
      # for it < ema_start_at, so τ is 0.9998 from the first update (paper §4.1: "τ = 0.9998 as
      # a constant value with no schedule"). fairseq's port anneals 0.999 → 0.9998 (spec §4.4):
      # --config.ema.decay=0.999 --config.ema.anneal_percent=1.0.
      decay=0.9998, end_decay=0.9998,
      anneal_steps=0, anneal_percent=config_dict.placeholder(float),
      anneal_epochs=config_dict.placeholder(float),
      # run_cyclical: timm ModelEmaV2 of the whole model; the teacher re-embeds the image with
      # its EMA patch embedding and CLS (fairseq's port: the encoder only, spec §5.4).
      scope=("frontend", "encoder"),
      copy=(),
  ))
  c.optim = configs_lib.optimizer(
      s["lr"],  # README --lr
      # run_cyclical: adamw with --opt_betas None → torch's (0.9, 0.999), --opt_eps 1e-8
      b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.05,  # README --weight_decay (constant: --weight_decay_end None)
      clip_norm=3.0,  # README --clip_grad
      schedule="cosine", min_lr=1e-5,  # run_cyclical: utils.cosine_scheduler to --min_lr 1e-5
      no_decay=NO_DECAY,
  )
  c.optim.warmup_epochs = float(s["warmup_epochs"])  # README --warmup_epochs (paper: 40 for ViT-B)
  steps_per_epoch = IMAGENET_TRAIN_IMAGES // s["batch"]  # drop_last=True
  configs_lib.run_fields(c, 800 * steps_per_epoch)
  c.total_epochs = 800.0  # README --epochs 800 (resolved against the data's batches per epoch)
  # No collapse guard in data2vec_vision (its variance terms have weight 0); fairseq's
  # min_target_var 0.1 (spec §4.1 step 8) is kept as a warning light.
  c.guard.key = "target_var"
  c.guard.min_value = 0.1
  c.data = image_data(224, patch)
  c.data.batch_size = s["batch"]
  return c


def cpu_preset(c: ml_collections.ConfigDict, total_steps: int = 300) -> None:
  """Shrink a vision config to a laptop/CI run on the embedded images: a ViT-Tiny-width model
  (4 × 192, 3 heads) on 64-px images with 8-px patches (an 8×8 grid), 300 steps. Objective,
  targets, loss, augmentation and optimizer are the recipe's; sizes and durations scale down."""
  c.model.patch_size = 8  # also data.patch_size and masking.patch_size (shared reference)
  c.model.encoder.update(dict(num_layers=4, dim=192, ffn_dim=768, num_heads=3,
                              drop_path=0.1))  # 0.25 regularises a 12-layer model on 1.28M images
  c.loss.scale = 1.0 / 192  # 1/D, as the recipe's mean over channels
  c.targets.top_k = 2  # half the blocks, as 6 of 12
  # 61 % of the patches in blocks of >= 5 (the recipe's 120/196 and 16/196 of the grid).
  c.masking.update(dict(num_masking_patches=39, min_num_patches=5, max_num_patches=64))
  c.data.update(dict(image_size=64, batch_size=16, cache_images=64, num_workers=0))
  # A 300-step run needs a teacher that moves: the fairseq port's 0.999 → 0.9998 over the run.
  c.ema.update(dict(decay=0.999, end_decay=0.9998, anneal_percent=1.0))
  c.optim.peak_lr = 1e-3
  c.optim.warmup_epochs = None
  c.optim.warmup_percent = 0.1
  c.total_steps = total_steps
  c.total_epochs = None
  c.log_every = 10
  c.ckpt_every = 100
  c.guard.patience = 5


def test_preset(c: ml_collections.ConfigDict, total_steps: int = 8) -> None:
  """Even smaller than ``cpu_preset``, for unit tests: 2 layers × 64 on 32-px images (4×4 grid),
  4 images per batch."""
  cpu_preset(c, total_steps)
  c.model.encoder.update(dict(num_layers=2, dim=64, ffn_dim=128, num_heads=2))
  c.loss.scale = 1.0 / 64
  c.masking.update(dict(num_masking_patches=10, min_num_patches=3, max_num_patches=16))
  c.data.update(dict(image_size=32, batch_size=4))
  c.log_every = 1
  c.ckpt_every = 4
  c.async_checkpointing = False
  c.tensorboard = False
