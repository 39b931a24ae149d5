r"""python -m d2vjax.train --config=configs/vision_d2v2_large.py --workdir=/tmp/d2v2_vision_large

data2vec 2.0 vision ViT-L/16 pre-training on ImageNet-1k (fairseq-spec §6, §8.1–8.3; data2vec 2.0
paper §4): 24 post-LN blocks × 1024, fixed 2-D sin-cos positions, CLS token, 16 clones per image
with inverse 2-D block masks (keep 49 of 196), only kept patches encoded, Decoder2d (1024 ch, 5×5,
3 layers, 16 groups), top-18 instance-normed FFN targets averaged then layer-normed, L2 / sqrt(D) +
CLS loss 0.01, EMA 0.9998 → 0.99999, AdamW 4e-4 (β 0.9/0.95, wd 0.05) cosine with 50 040 warm-up
updates, clip 4, 375 300 updates of 128 images. Hyper-parameters and their sources live in
d2vjax/configs_d2v2.py.

Arguments after ':' (comma separated):
  cpu          laptop / CI preset: 1 + 3 blocks × 192, 64-px images, embedded images, 300 steps
  test         unit-test preset: 1 + 1 blocks × 64, 32-px images, 2 clones, 8 steps
  steps=N      total steps
Point it at ImageNet with --config.data.source=folder --config.data.folder=/data/ILSVRC2012.
"""

import d2vjax.configs_d2v2 as c2
import d2vjax.configs_lib as cl


def get_config(arg=None):
  return cl.with_presets(c2.vision("large"), arg, cpu=c2.vision_cpu_preset,
                         test=c2.vision_test_preset)
