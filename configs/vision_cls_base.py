r"""``python -m d2vjax.finetune --config=configs/vision_cls_base.py --init=PRETRAINED --workdir=DIR``

ViT-B/16 image classification on ImageNet-1k (``--config.data.source=folder
--config.data.folder=/path/to/imagenet`` with ``train/`` and ``val/`` class subfolders, or
``source=tfds``): mean-pooled patches → LayerNorm → Linear, layer decay 0.65, label smoothing 0.1,
Mixup/CutMix, 250 200 updates of 512 images (fairseq-spec §9.2; values and sources in
d2vjax/configs_cls.py). Presets: ``:cpu`` (generated four-class patterns, 300 steps), ``:test``.
"""

from d2vjax import configs_cls


def get_config(arg=None):
  return configs_cls.get_vision_config("base", arg)
