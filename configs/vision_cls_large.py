r"""``python -m d2vjax.finetune --config=configs/vision_cls_large.py --init=PRETRAINED --workdir=DIR``

ViT-L/16 image classification on ImageNet-1k: layer decay 0.75, drop path 0.2, lr 5e-4, clip 4,
125 200 updates of 512 images (fairseq-spec §9.2; d2vjax/configs_cls.py). Presets as
``vision_cls_base.py``.
"""

from d2vjax import configs_cls


def get_config(arg=None):
  return configs_cls.get_vision_config("large", arg)
