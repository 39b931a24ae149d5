r"""python -m d2vjax.train --config=configs/vision_large.py --workdir=/tmp/d2v_vision_large

data2vec 1.0 vision ViT-L/16 pre-training on ImageNet-1k, the official recipe
(facebookresearch/data2vec_vision beit/README.md; fairseq-spec §4.3): BEiT ViT (24 pre-LN blocks
× 1024, 16 heads, layer scale 1e-5, stochastic depth 0.2, attention dropout 0.15, shared relative
position bias), BEiT block masks (120 of 196 patches), top-6 block outputs (18..23) layer-normed
and averaged then layer-normed, smooth-L1 β = 2, EMA τ = 0.9998, AdamW 1e-3 (β 0.9/0.999,
wd 0.05), cosine with 80 warm-up epochs, clip 3, batch 4096 (64 GPUs × 64), 800 epochs.
Hyper-parameters and their sources live in d2vjax/configs_vision.py.

Arguments after ':' (comma separated):
  cpu          laptop / CI preset: 4 × 192 ViT, 64-px images, embedded images, 300 steps
  test         unit-test preset: 2 × 64 ViT, 32-px images, 8 steps
  steps=N      total steps (instead of 800 epochs)
Point it at ImageNet with --config.data.source=folder --config.data.folder=/data/ILSVRC2012
(train/<wnid>/*.JPEG), or prepare it TF-free with d2vjax.data.tfds_imagenet.prepare and use
--config.data.source=tfds --config.data.tfds_data_dir=/data/tfds.
"""

import d2vjax.configs_lib as cl
import d2vjax.configs_vision as cv


def get_config(arg=None):
  return cl.with_presets(cv.data2vec_vision("large"), arg, cpu=cv.cpu_preset,
                         test=cv.test_preset)
