r"""python -m d2vjax.train --config=configs/text_base.py:cpu --workdir=/tmp/d2v_text_cpu

data2vec 1.0 text Base pre-training (data2vec §4.3; fairseq-spec §4.2, §4.4): RoBERTa Base
(12 post-LN layers × 768, learned positions, 512 tokens, vocabulary 50,265), BERT masking 15 %
(80/10/10), top-10 layer-normalised FFN targets from an EMA teacher that embeds the full original
sequence, smooth-L1 β 4, EMA 0.999 → 0.9999 over 100k updates, Adam 2e-4 tri-stage, 1M updates of
256 × 512 tokens. Hyper-parameters and their sources live in d2vjax/configs_text.py.

Arguments after ':' (comma separated):
  cpu      laptop / CI preset: 4 × 256 encoder, embedded tokenizer + corpus, 300 steps
  test     unit-test preset: 2 layers × 64, 64-token blocks, 8 steps
  steps=N  total steps (with cpu/test: also the EMA anneal length)
  span     span masking (4 tokens, p 0.35) with cosine decay, Table 3's "+ wav2vec 2.0 masking"

Base needs the RoBERTa tokenizer (50,265 ids; d2vjax/data/tokenizer.py shows how to build it from
RoBERTa's vocab.json/merges.txt) and real text, e.g. a prepared tfds corpus:
  --config.data.tokenizer=roberta.json --config.data.source=tfds --config.data.tfds_data_dir=DIR
or plain files: --config.data.source=files --config.data.files='corpus/*.txt'.
"""

import d2vjax.configs_lib as cl
import d2vjax.configs_text as ct


def get_config(arg=None):
  return cl.with_presets(ct.data2vec_text("base"), arg, cpu=ct.text_cpu_preset,
                         test=ct.text_test_preset, span=ct.span_recipe)
