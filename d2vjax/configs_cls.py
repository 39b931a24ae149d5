"""Config builders for classification fine-tuning (``python -m d2vjax.finetune``):
``configs/vision_cls_*.py`` (ImageNet-style image classification, fairseq-spec §9.2) and
``configs/text_cls_base.py`` (GLUE-style sentence classification / regression, spec §9.3).

Sources: fairseq-spec §9.2 (data2vec 2.0 ``mae_imagenet_{clean,large_clean}.yaml`` and
``mae_image_classification.py``: "§9.2"), §9.3 (``config/v2/text_finetuning/*.yaml``: "§9.3"),
§7 (optimiser and schedules). The model section is only the from-scratch architecture: with
``--init`` the pre-trained architecture replaces it.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from d2vjax import configs_lib, configs_text, configs_vision
from d2vjax.data import labelled
from d2vjax.data.tokenizer import EMBEDDED_VOCAB_SIZE

# Per size (§9.2): peak lr, updates, layer decay, drop path, clip norm, min lr.
_VISION = {
    "base": dict(lr=1e-3, updates=250_200, layer_decay=0.65, drop_path=0.1, clip=0.0,
                 min_lr=1e-6),
    "large": dict(lr=5e-4, updates=125_200, layer_decay=0.75, drop_path=0.2, clip=4.0,
                  min_lr=1e-7),
}


def _finetune(head: dict, **kw) -> ml_collections.ConfigDict:
  ft = ml_collections.ConfigDict(dict(
      head=head,
      regression=False,
      # Objective of the pre-trained encoder (set from the checkpoint with --init).
      pretrained_objective="data2vec",
      label_smoothing=0.0,
      # Regularisation of the fine-tuned encoder; None keeps the pre-trained model's value.
      dropout=config_dict.placeholder(float), attention_dropout=config_dict.placeholder(float),
      activation_dropout=config_dict.placeholder(float),
      layerdrop=config_dict.placeholder(float), drop_path=config_dict.placeholder(float),
  ))
  ft.update(kw)
  return ft


def _common(c: ml_collections.ConfigDict, updates: int, metric: str, every: int) -> None:
  c.init = ""  # pre-training run directory or exported .msgpack (--init); '' = from scratch
  configs_lib.run_fields(c, updates)
  del c.guard  # no collapse guard in fine-tuning
  c.ckpt_every = 1000
  c.classes = []  # class names, from the training labels (set by the run)
  c.num_classes = 0
  c.eval = ml_collections.ConfigDict(dict(
      every=every, start=0,
      metric=metric,  # the best checkpoint is kept by it (d2vjax/tasks/classify.py METRICS)
      batch_size=256,  # images per validation batch (sentences: the training rows per bucket)
  ))


def vision_cls(size: str) -> ml_collections.ConfigDict:
  """Image classification on ImageNet-1k from a pre-trained ViT (§9.2)."""
  if size not in _VISION:
    raise ValueError(f"size must be one of {sorted(_VISION)}, got {size!r}")
  s = _VISION[size]
  c = ml_collections.ConfigDict()
  c.modality = "vision"
  c.objective = "image_classification"
  pre = configs_vision.data2vec_vision(size)
  c.model = pre.model  # from scratch: the data2vec 1.0 ViT (patch_size shared with data)
  c.finetune = _finetune(
      # MEAN_POOLING over patch tokens, CLS dropped → fc_norm LayerNorm(eps 1e-6) → Linear,
      # trunc-normal 0.02 (§9.2).
      dict(kind="mean_pool", skip_first=True, norm_eps=1e-6),
      label_smoothing=0.1,  # §9.2
      # Dropouts and layerdrop 0; stochastic depth 0 → drop_path over the blocks (§9.2).
      dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
      drop_path=s["drop_path"],
      # timm Mixup/CutMix: mixup α 0.7 (the configs), cutmix α 1.0, prob 0.9, switch 0.5 (§9.2;
      # timm's and MAE's default mixup α is 0.8). prob 0 turns both off.
      mixup=dict(mixup_alpha=0.7, cutmix_alpha=1.0, prob=0.9, switch_prob=0.5,
                 correct_lam=True))
  # Adam (0.9, 0.95), wd 0.05, cosine with 16k warm-up to min_lr; layer decay (§9.2). fairseq
  # applies weight decay to every parameter (spec §6.10); like MAE/BEiT, biases, norms and the
  # CLS are exempt here (the intent of data2vec2's tags).
  c.optim = configs_lib.optimizer(
      s["lr"], b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, clip_norm=s["clip"],
      schedule="cosine", min_lr=s["min_lr"], layer_decay=s["layer_decay"],
      no_decay=configs_vision.NO_DECAY)
  c.optim.warmup_steps = 16_000  # §9.2
  # 16 GPUs × 32 = 512 images per update (§9.2); one validation per epoch (1.28M / 512).
  _common(c, s["updates"], "accuracy", every=configs_vision.IMAGENET_TRAIN_IMAGES // 512)
  c.data = configs_vision.image_data(224, c.model.get_ref("patch_size"))
  c.data.batch_size = 512
  # Training view: RandomResizedCrop + flip; no colour jitter (§9.2: RandAugment and random
  # erasing are not implemented here, docs/finetuning.md). Validation: resize 256, crop 224.
  c.data.color_jitter = 0.0
  c.data.synthetic = ""  # 'patterns': write the four-class toy set to data.folder first
  c.data.synthetic_size = 64
  return c


def _vision_sizes(c: ml_collections.ConfigDict, preset, total_steps: int) -> None:
  """Model and image sizes of a vision pre-training preset (so its runs load with ``--init``),
  and the trainer fields of the fine-tuning preset."""
  pre = configs_vision.data2vec_vision("base")
  preset(pre, total_steps)
  c.model = pre.model
  c.data.update(dict(image_size=pre.data.image_size, patch_size=pre.model.patch_size,
                     batch_size=pre.data.batch_size, num_workers=0))
  for key in ("total_steps", "total_epochs", "log_every", "ckpt_every", "async_checkpointing",
              "tensorboard"):
    c[key] = pre[key]


def vision_cpu_preset(c: ml_collections.ConfigDict, total_steps: int = 300) -> None:
  """The ``configs/vision_base.py:cpu`` architecture (4 × 192 on 64-px images, 8-px patches, so
  its pre-training runs load with ``--init``) on a generated four-class pattern set (96 train,
  32 valid images in ``$TMPDIR/d2vjax_labelled/patterns64``): 300 steps of 16 images, warm-up
  10 %, layer decay as the recipe."""
  _vision_sizes(c, configs_vision.cpu_preset, total_steps)
  c.finetune.drop_path = 0.1
  c.data.update(dict(source="folder", folder=labelled.default_cache_dir("patterns64"),
                     train_split="train", valid_split="valid", synthetic="patterns",
                     synthetic_size=64, cache_images=128))
  c.optim.peak_lr = 1e-3
  c.optim.min_lr = 1e-6
  c.optim.warmup_steps = None
  c.optim.warmup_percent = 0.1
  c.eval.every = 50
  c.eval.batch_size = 32


def vision_test_preset(c: ml_collections.ConfigDict, total_steps: int = 8) -> None:
  """Unit-test size: the vision ``:test`` model (2 × 64, 32-px images, 4×4 patches), 8 images
  per batch, 32-px generated patterns."""
  vision_cpu_preset(c, total_steps)
  _vision_sizes(c, configs_vision.test_preset, total_steps)
  c.data.update(dict(batch_size=8, folder=labelled.default_cache_dir("patterns32"),
                     synthetic_size=32))
  c.eval.every = 4
  c.eval.batch_size = 16


def text_cls(size: str = "base") -> ml_collections.ConfigDict:
  """GLUE-style sentence classification (or regression) from a pre-trained text encoder
  (§9.3)."""
  vocab = config_dict.FieldReference(configs_text.ROBERTA_VOCAB_SIZE)
  c = ml_collections.ConfigDict()
  c.modality = "text"
  c.objective = "sentence_classification"
  c.model = configs_text.text_model(size, vocab)
  # RoBERTa classification head on <s>: dropout (pooler_dropout 0) → Linear(D, D) → tanh →
  # dropout → Linear(D, classes) (§9.3). Encoder dropouts stay the pre-trained model's.
  c.finetune = _finetune(dict(kind="first_token", dropout=0.0))
  # Adam (0.9, 0.98), eps 1e-6, wd 0.1, no clipping; linear (polynomial power 1) decay after a
  # warm-up over 6 % of the updates; lr 2e-5 (yaml default of the sweep {1,2,4,6}e-5) (§9.3).
  c.optim = configs_lib.optimizer(2e-5, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1,
                                  clip_norm=0.0, schedule="polynomial")
  c.optim.warmup_percent = 0.06
  _common(c, 10_000, "accuracy", every=1000)
  c.total_epochs = 10.0  # max 10 epochs (§9.3); resolved against the data's batches per epoch
  c.data = configs_text.text_data(vocab)
  c.data.update(dict(
      source="tsv",  # label<TAB>sentence[<TAB>sentence2] files
      train_file="", valid_file="",
      synthetic="",  # 'sentiment': write the templated toy set beside data.train_file first
      # 32 sentences per update (§9.3: 32 for the large tasks, 16 for CoLA, MRPC, RTE, STS-B),
      # whatever their bucket: max_rows caps rows, the token budget never binds below 512.
      budget_tokens=32 * 512, max_rows=32))
  return c


def regression_recipe(c: ml_collections.ConfigDict) -> None:
  """STS-B: one output with squared error, lr 4e-5, 16 sentences per update, best checkpoint by
  Pearson correlation (§9.3)."""
  c.finetune.regression = True
  c.optim.peak_lr = 4e-5
  c.data.max_rows = 16
  c.eval.metric = "pearson"


def _text_sizes(c: ml_collections.ConfigDict, preset, total_steps: int) -> None:
  """Model of a text pre-training preset (so its runs load with ``--init``) and the trainer
  fields of the fine-tuning preset."""
  pre = configs_text.data2vec_text("base")
  preset(pre, total_steps)
  c.model = pre.model
  c.data.update(dict(vocab_size=pre.model.vocab_size, tokenizer=pre.data.tokenizer,
                     num_workers=0))
  for key in ("total_steps", "log_every", "ckpt_every", "async_checkpointing", "tensorboard"):
    c[key] = pre[key]
  c.total_epochs = None


def text_cpu_preset(c: ml_collections.ConfigDict, total_steps: int = 300) -> None:
  """The ``configs/text_base.py:cpu`` architecture (4 × 256, embedded 4,096-id BPE) on a
  generated templated sentiment set (256 train, 64 valid sentences in
  ``$TMPDIR/d2vjax_labelled/``): 300 steps of 16 sentences, lr 1e-4."""
  _text_sizes(c, configs_text.text_cpu_preset, total_steps)
  name = "sentiment_reg" if c.finetune.regression else "sentiment"
  folder = labelled.default_cache_dir(name)
  c.data.update(dict(synthetic="sentiment", train_file=f"{folder}/train.tsv",
                     valid_file=f"{folder}/valid.tsv", tokens_per_sample=64,
                     buckets=[32, 64], budget_tokens=16 * 64, max_rows=16))
  c.optim.peak_lr = 1e-4
  c.eval.every = 50


def text_test_preset(c: ml_collections.ConfigDict, total_steps: int = 8) -> None:
  """Unit-test size: the text ``:test`` model (2 × 64), 8 sentences per batch."""
  text_cpu_preset(c, total_steps)
  _text_sizes(c, configs_text.text_test_preset, total_steps)
  c.data.update(dict(budget_tokens=8 * 64, max_rows=8))
  c.eval.every = 4


def get_vision_config(size: str, arg: str | None) -> ml_collections.ConfigDict:
  """``configs/vision_cls_<size>.py``: presets ``cpu``, ``test``, ``steps=N``."""
  return configs_lib.with_presets(vision_cls(size), arg, cpu=vision_cpu_preset,
                                  test=vision_test_preset)


def get_text_config(arg: str | None) -> ml_collections.ConfigDict:
  """``configs/text_cls_base.py``: presets ``cpu``, ``test``, ``steps=N``, ``regression``."""
  return configs_lib.with_presets(text_cls("base"), arg, cpu=text_cpu_preset,
                                  test=text_test_preset, regression=regression_recipe)
