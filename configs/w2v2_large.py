r"""python -m d2vjax.train --config=configs/w2v2_large.py --workdir=/tmp/w2v2_large

wav2vec 2.0 LARGE pre-training (wav2vec 2.0 §3, §4.2; fairseq-spec §3): Gumbel product quantizer
(G=2, V=320, temperature floor 0.1), 100 same-utterance distractors, cosine / 0.1, diversity
weight 0.1, layer-norm CNN with conv bias, pre-LN, LV-60k recipe (3e-4, 600k updates).
Hyper-parameters and their sources live in d2vjax/configs_lib.py (wav2vec2_speech).

Arguments after ':' (comma separated):
  cpu          laptop / CI preset: tiny model, embedded corpus, 300 steps
  test         unit-test preset: 2 layers × 64, 1 s crops, 8 steps
  steps=N      total steps
"""

import d2vjax.configs_lib as cl


def get_config(arg=None):
  return cl.with_presets(cl.wav2vec2_speech("large"), arg)
