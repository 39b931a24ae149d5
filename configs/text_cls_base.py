r"""``python -m d2vjax.finetune --config=configs/text_cls_base.py --init=PRETRAINED --workdir=DIR
--config.data.train_file=train.tsv --config.data.valid_file=dev.tsv --config.data.tokenizer=T``

GLUE-style sentence classification (``label<TAB>sentence`` or ``label<TAB>sentence1<TAB>
sentence2`` files): RoBERTa head on ``<s>``, Adam (0.9, 0.98) wd 0.1, lr 2e-5, linear decay
after 6 % warm-up, 32 sentences per update, 10 epochs (fairseq-spec §9.3; d2vjax/configs_cls.py).
``:regression`` is the STS-B recipe (one output, squared error, lr 4e-5, best by Pearson).
Presets: ``:cpu`` (generated templated sentiment set, 300 steps), ``:test``; combine, e.g.
``:cpu,regression``.
"""

from d2vjax import configs_cls


def get_config(arg=None):
  return configs_cls.get_text_config(arg)
