r"""python -m d2vjax.train --config=configs/speech_base.py --workdir=/tmp/d2v_speech_base

data2vec 1.0 speech Base pre-training (data2vec §4.2; fairseq-spec §4.1, §4.4): 12 post-LN layers
× 768, layer-norm CNN, 5-layer conv positional encoder, span masks p=0.65 L=10, top-8 instance-
normalised FFN targets, L2 loss / sqrt(768), EMA 0.999 → 0.9999 over 30k updates, Adam 5e-4
tri-stage, 400k updates. Hyper-parameters and their sources live in d2vjax/configs_lib.py.

Arguments after ':' (comma separated):
  cpu          laptop / CI preset: tiny model, embedded corpus, 300 steps (README's command)
  test         unit-test preset: 2 layers × 64, 1 s crops, 8 steps
  steps=N      total steps (with cpu: also the EMA anneal length)
Point it at LibriSpeech with e.g. --config.data.source=manifest --config.data.manifest=train.tsv.
"""

import d2vjax.configs_lib as cl


def get_config(arg=None):
  return cl.with_presets(cl.data2vec_speech("base"), arg)
