"""Text probe data: sentence classification from tab-separated files (``label<TAB>sentence`` per
line, GLUE-style single-sentence tasks such as SST-2), for a linear classifier on mean-pooled
token features. ``probe.train_split`` / ``probe.valid_split`` are the file paths; labels are
strings, numbered in sorted order of the training file's labels.
"""

from __future__ import annotations

import numpy as np

from d2vjax import probe, registry
from d2vjax.data import text as text_data
from d2vjax.data.labelled import read_tsv  # the fine-tuning reader (d2vjax/data/labelled.py)
from d2vjax.data import tokenizer as tokenizer_lib


@registry.register("probe_data", "text")
def text_probe_data(config, split: str, max_examples: int, batch_multiple: int = 1
                    ) -> probe.ProbeData:
  """Sentences of the TSV file ``split`` as ``<s> ids </s>`` padded to the smallest
  ``data.buckets`` length that holds them (longer ones truncated); labels numbered from the
  training file (``probe.train_split``) so train and valid agree."""
  modality = registry.get("modality", config.modality)
  rows_all = probe.first(read_tsv(split), max_examples, seed=int(config.get("seed", 0)))
  classes = sorted({label for label, _ in read_tsv(str(config.probe.train_split))})
  index = {c: i for i, c in enumerate(classes)}
  tok = text_data._tokenizer(config.data)  # pylint: disable=protected-access
  buckets = sorted(int(b) for b in config.data.buckets)
  groups: dict[int, list] = {}
  for (label, sentence), ids in zip(rows_all, tok.encode_batch([s for _, s in rows_all])):
    if label not in index:
      continue  # a class absent from the training file cannot be predicted; left out
    ids = np.concatenate([[tokenizer_lib.BOS_ID], ids[:buckets[-1] - 2], [tokenizer_lib.EOS_ID]])
    length = next(b for b in buckets if b >= ids.size)
    groups.setdefault(length, []).append((ids.astype(np.int32), index[label]))
  rows = -(-32 // batch_multiple) * batch_multiple
  batches, targets = [], []
  for length, items in sorted(groups.items()):

    def dummy(n, length=length):
      b = modality.dummy_batch(config.data, n)
      shape = (n, length)
      b.update(tokens=np.full(shape, tokenizer_lib.PAD_ID, np.int32),
               padding_mask=np.ones(shape, bool), mask=np.zeros(shape, bool))
      return b

    def fill(batch, r, item):
      ids = item[0]
      batch["tokens"][r, :ids.size] = ids
      batch["padding_mask"][r, :ids.size] = False

    for b in probe.fill_batches(dummy, items, fill, rows):
      b["masked_tokens"] = b["tokens"].copy()  # the student sees the sentence unmasked
      batches.append(b)
    targets += [y for _, y in items]
  return probe.ProbeData(batches, "classify", targets, len(classes))
