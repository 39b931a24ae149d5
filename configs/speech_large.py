r"""python -m d2vjax.train --config=configs/speech_large.py --workdir=/tmp/d2v_speech_large

data2vec 1.0 speech Large pre-training (data2vec §4.2; fairseq-spec §4.1, §4.4): 24 post-LN layers
× 1024 (16 heads, FFN 4096), otherwise the Base recipe: layer-norm CNN, 5-layer conv positional
encoder, span masks p=0.65 L=10, top-8 instance-normalised targets, L2 loss / sqrt(D),
EMA 0.999 → 0.9999 over 30k updates, Adam 3e-4 tri-stage, 600k updates (Libri-light). Hyper-parameters and their sources live in d2vjax/configs_lib.py.

Arguments after ':' (comma separated):
  cpu          laptop / CI preset: tiny model, embedded corpus, 300 steps (README's command)
  test         unit-test preset: 2 layers × 64, 1 s crops, 8 steps
  steps=N      total steps (with cpu: also the EMA anneal length)
Point it at LibriSpeech with e.g. --config.data.source=manifest --config.data.manifest=train.tsv.
"""

import d2vjax.configs_lib as cl


def get_config(arg=None):
  return cl.with_presets(cl.data2vec_speech("large"), arg)
