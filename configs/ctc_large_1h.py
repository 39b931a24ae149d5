r"""python -m d2vjax.finetune --config=configs/ctc_large_1h.py --init=PRETRAIN_DIR --workdir=DIR \
     --config.data.manifest=train.tsv --config.data.valid_manifest=dev_other.tsv

CTC fine-tuning of a pre-trained Large (24 × 1024) speech model on Libri-light 1 h:
fairseq's `vox_1h.yaml` values from fairseq-spec §9.1 (lr, updates, masks, layerdrop, freeze,
batch), tri-stage [0.1, 0.4, 0.5] (wav2vec 2.0 §4.1, §4.3). Hyper-parameters and their
sources live in d2vjax/configs_ctc.py. Manifests are fairseq's (`.tsv` with a `.wrd` transcript
file beside it).

Arguments after ':' (comma separated):
  cpu          embedded corpus, the configs/speech_base.py:cpu model, 600 steps
  test         unit-test preset: 2 layers × 64, one 2.5 s bucket, 8 steps
  steps=N      total steps
"""

from d2vjax import configs_ctc


def get_config(arg=None):
  return configs_ctc.get_config("large", "1h", arg)
