r"""python -m d2vjax.train --config=configs/text_d2v2_base.py --workdir=/tmp/d2v2_text_base

data2vec 2.0 text Base pre-training on Books + Wikipedia (fairseq-spec §6, §8.1–8.2; data2vec 2.0
paper §4): RoBERTa Base (12 post-LN blocks × 768), 8 clones per 512-token block with MAE random
masks (keep floor(512 · 0.52) = 266), only kept tokens encoded, Decoder1d (768 ch, k 9, 5 layers,
no residual, 2-layer projection), top-12 instance-normed FFN targets from an EMA of the blocks
only, L2 (scale 1), EMA 0.9999 → 0.99999 over 100k, Adam 2e-4 cosine (4k warm-up), clip 1, 1M
updates of 64 × 512 tokens. Hyper-parameters and sources: d2vjax/configs_d2v2.py.

Arguments after ':' (comma separated):
  cpu      laptop / CI preset: 4 × 256 trunk, embedded tokenizer + corpus, 4 clones, 300 steps
  test     unit-test preset: 2 layers × 64, 64-token blocks, 2 clones, 8 steps
  steps=N  total steps
Base needs the RoBERTa tokenizer and real text (see configs/text_base.py).
"""

import d2vjax.configs_d2v2 as c2
import d2vjax.configs_lib as cl


def get_config(arg=None):
  return cl.with_presets(c2.text("base"), arg, cpu=c2.text_cpu_preset,
                         test=c2.text_test_preset)
