"""Speech feature encoder: conv waveform encoder, feature projection, positional convolutions."""

from __future__ import annotations

import numpy as np

# (channels, kernel, stride) of the 7-layer waveform CNN (wav2vec 2.0 §2; fairseq-spec §1.2).
CONV_LAYERS = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
SAMPLE_RATE = 16000
RECEPTIVE_FIELD = 400  # samples (25 ms); stride 320 samples (20 ms)


def num_frames(num_samples):
  """Frames produced by the CNN from ``num_samples`` waveform samples (int or int array).

  Applies ``floor((L - k) / s) + 1`` layer by layer; inputs shorter than the 400-sample receptive
  field give 0. 320000 → 999, 250000 → 781, 32000 → 99.
  """
  n = np.asarray(num_samples, dtype=np.int64)
  for _, k, s in CONV_LAYERS:
    n = np.where(n >= k, (n - k) // s + 1, 0)
  return int(n) if n.ndim == 0 else n
