"""Speech probe data: transcribed utterances, padded whole (never cropped), for a linear CTC probe.

Utterances come from the run's data source (``data.*``) and split names in ``probe.*_split``;
transcripts from the same places fine-tuning reads them (``.wrd`` beside a manifest, LibriSpeech
``*.trans.txt``, the embedded corpus). Each clip is padded to the smallest of ``PROBE_BUCKETS``
that holds it (one compiled encoder program per bucket; ``probe.buckets`` overrides them); longer
clips are left out.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from d2vjax import probe, registry
from d2vjax.data import ctc_data

# 2 … 20 s at 16 kHz.
PROBE_BUCKETS = (32000, 64000, 96000, 128000, 192000, 320000)


def _identity(rng: np.random.Generator, batch: dict) -> dict:
  del rng
  return batch


@registry.register("probe_data", "speech")
def speech_probe_data(config, split: str, max_examples: int, batch_multiple: int = 1
                      ) -> probe.ProbeData:
  """``max_examples`` transcribed utterances of ``split`` (a fixed subset) as padded batches of
  at most ``data.budget_samples`` samples; targets are the transcripts."""
  d = ml_collections.ConfigDict(config.data.to_dict())
  d.mode = "pad"
  buckets = sorted(int(b) for b in (config.probe.get("buckets") or PROBE_BUCKETS))
  d.buckets = buckets
  d.max_sample_size = buckets[-1]
  d.min_sample_size = 0
  examples, _ = ctc_data.asr_examples(d, split)
  examples = probe.first(examples, max_examples, seed=int(config.get("seed", 0)))
  batches, targets = [], []
  if not examples:
    return probe.ProbeData(batches, "ctc", targets)
  # Global batches, identical on every process (``probe.encode_all`` shares out the rows).
  for b in ctc_data.eval_batches(d, examples, _identity, batch_multiple=batch_multiple):
    targets += [t for t, ok in zip(b["_global_transcripts"], b["row_valid"]) if ok]
    batches.append({"audio": b["audio"], "padding_mask": b["padding_mask"],
                    "row_valid": b["row_valid"]})
  return probe.ProbeData(batches, "ctc", targets)
