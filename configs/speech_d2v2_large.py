r"""python -m d2vjax.train --config=configs/speech_d2v2_large.py --workdir=/tmp/d2v2_speech_large

data2vec 2.0 speech Large pre-training on LL-60k (fairseq-spec §6, §8.1–8.2; data2vec 2.0 paper
§4): 8 prenet + 16 post-LN blocks × 1024, layer-norm CNN, 5-layer conv positions on the zero-masked
sequence, ALiBi with a learned per-head scale, 12 clones per clip with 1-D block masks (p 0.55,
adjust 0.1, length 5, exact count), only kept frames encoded, Decoder1d (768 ch, k 7, 4 layers, 16
groups), top-16 instance-normed FFN targets from one teacher pass per clip, L2 / sqrt(D), EMA
0.9997 → 1 over 300k, Adam 4e-4 cosine (10k warm-up), 600k updates. Hyper-parameters and their
sources live in d2vjax/configs_d2v2.py.

Arguments after ':' (comma separated):
  cpu          laptop / CI preset: 4 × 256 trunk, 64-ch CNN, embedded corpus, 300 steps
  test         unit-test preset: 2 layers × 64, 1 s crops, 2 clones, 8 steps
  steps=N      total steps (with cpu/test: also the EMA anneal and warm-up lengths)
"""

import d2vjax.configs_d2v2 as c2
import d2vjax.configs_lib as cl


def get_config(arg=None):
  return cl.with_presets(c2.speech("large"), arg, cpu=c2.speech_cpu_preset,
                         test=c2.speech_test_preset)
