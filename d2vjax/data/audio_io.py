"""Reading and validating one speech clip (fairseq-spec §1.1), pure NumPy.

``load_audio`` returns a mono float32 waveform at 16 kHz or raises ``BadAudioError`` with a
reason code from ``BAD_REASONS``; the pipeline catches that error, replaces the row and counts the
reason, so a bad file never kills a run nor changes a batch shape.

Differences from fairseq (documented on purpose): fairseq raises on a sample rate other than
16 kHz; here the clip is resampled with soxr (half-up rounded length, see ``resampled_length``) so
folders of 22.05/44.1/48 kHz audio can be used directly.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import soundfile as sf

__all__ = ["BAD_REASONS", "BadAudioError", "load_audio", "normalize_waveform", "resampled_length",
           "validate_waveform", "num_frames", "SILENCE_PEAK", "SAMPLE_RATE", "RECEPTIVE_FIELD"]

# Mirrors of ``d2vjax.models.audio`` (SAMPLE_RATE, RECEPTIVE_FIELD, num_frames). That module imports
# flax/jax, and grain's spawned workers would import JAX just for these numbers (user-needs B3:
# no JAX on the host data path). tests/test_data_pipeline.py asserts the copies agree.
SAMPLE_RATE = 16000
RECEPTIVE_FIELD = 400  # samples: the CNN's receptive field; shorter clips give 0 frames
_CONV_KERNEL_STRIDE = ((10, 5),) + ((3, 2),) * 4 + ((2, 2),) * 2

# Fixed set of reason codes; counters and logs are keyed on them.
BAD_REASONS = ("unreadable", "empty", "too_short", "non_finite", "silent", "below_min_size")
# Peak amplitude (full scale = 1.0) under which a clip counts as digital silence: 1e-6 is below
# one 16-bit LSB (3e-5), so any real recording passes and all-zero/dithered-zero files do not.
SILENCE_PEAK = 1e-6


class BadAudioError(ValueError):
  """A clip that cannot be used; ``reason`` is one of ``BAD_REASONS``."""

  def __init__(self, path, reason: str, detail: str = ""):
    if reason not in BAD_REASONS:
      raise ValueError(f"unknown bad-audio reason {reason!r}; expected one of {BAD_REASONS}")
    self.path = os.fspath(path)
    self.reason = reason
    self.detail = detail
    super().__init__(f"{self.path}: {reason}" + (f" ({detail})" if detail else ""))

  def __reduce__(self):
    # Grain worker processes pickle exceptions; keep the constructor arguments.
    return (BadAudioError, (self.path, self.reason, self.detail))


def resampled_length(num_samples, orig_sr: int, target_sr: int = SAMPLE_RATE):
  """Length (samples) of a clip of ``num_samples`` at ``orig_sr`` after soxr resampling.

  soxr rounds ``n * target / orig`` half-up; integer arithmetic keeps it exact. Works on ints and
  int arrays.
  """
  n = np.asarray(num_samples, dtype=np.int64)
  out = (2 * n * int(target_sr) + int(orig_sr)) // (2 * int(orig_sr))
  return int(out) if out.ndim == 0 else out


def num_frames(num_samples):
  """CNN output frames for ``num_samples`` 16 kHz samples (int or int array); 0 below 400."""
  n = np.asarray(num_samples, dtype=np.int64)
  for k, st in _CONV_KERNEL_STRIDE:
    n = np.where(n >= k, (n - k) // st + 1, 0)
  return int(n) if n.ndim == 0 else n


_SF_FORMATS = frozenset(sf.available_formats())


def _decode(path: str):
  """(float32 ``[S, C]``, sample rate); soundfile first, librosa (audioread) as a fallback."""
  try:
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    return x, int(sr)
  except Exception as sf_err:  # libsndfile raises several types (LibsndfileError, RuntimeError…)
    first = sf_err
  if os.path.splitext(path)[1][1:].upper() in _SF_FORMATS:
    # A container libsndfile handles but cannot open is corrupt; librosa would only retry through
    # audioread/ffmpeg after a multi-second import, and fail the same way.
    raise BadAudioError(path, "unreadable", f"soundfile: {first}")
  try:
    import librosa  # Lazy: slow import, only needed for formats libsndfile cannot read.
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      y, sr = librosa.load(path, sr=None, mono=False, dtype=np.float32)
    y = np.asarray(y, np.float32)
    return (y[:, None] if y.ndim == 1 else y.T), int(sr)
  except Exception as lr_err:
    raise BadAudioError(path, "unreadable", f"soundfile: {first}; librosa: {lr_err}") from None


def _resample(x: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
  try:
    import soxr
    return soxr.resample(x, sr, target_sr, quality="HQ").astype(np.float32, copy=False)
  except ImportError:
    import librosa
    return librosa.resample(x, orig_sr=sr, target_sr=target_sr, res_type="soxr_hq")


def validate_waveform(x: np.ndarray, path, *, min_samples: int | None = None) -> np.ndarray:
  """Checks a decoded mono waveform and returns it as contiguous float32 ``[S]``.

  Raises ``BadAudioError`` with reason ``empty`` (0 samples), ``non_finite`` (NaN/inf),
  ``too_short`` (< 400 samples, the CNN receptive field: the model would see 0 frames),
  ``below_min_size`` (< ``min_samples``) or ``silent`` (peak < ``SILENCE_PEAK``).
  """
  x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
  if x.size == 0:
    raise BadAudioError(path, "empty")
  if not np.all(np.isfinite(x)):
    raise BadAudioError(path, "non_finite")
  if x.size < RECEPTIVE_FIELD:
    raise BadAudioError(path, "too_short", f"{x.size} < {RECEPTIVE_FIELD} samples")
  if min_samples is not None and x.size < min_samples:
    raise BadAudioError(path, "below_min_size", f"{x.size} < {min_samples} samples")
  if float(np.max(np.abs(x))) < SILENCE_PEAK:
    raise BadAudioError(path, "silent")
  return x


def load_audio(path, *, target_sr: int = SAMPLE_RATE, max_samples: int | None = None,
               rng: np.random.Generator | None = None,
               min_samples: int | None = None) -> np.ndarray:
  """Decodes one clip to a validated mono float32 waveform at ``target_sr``.

  Args:
    path: audio file (anything libsndfile reads: wav/flac/ogg/mp3; other formats via librosa).
    target_sr: output sample rate in Hz; other rates are resampled (soxr HQ).
    max_samples: if the clip is longer, a window of exactly ``max_samples`` samples is cut at a
      uniform random offset drawn from ``rng`` (offset 0 without ``rng``).
    rng: generator for the crop offset; never the global ``np.random``.
    min_samples: clips shorter than this (after resampling) raise ``below_min_size``.

  Returns:
    float32 ``[S]`` in [-1, 1] full scale (channels averaged), ``S`` in samples at ``target_sr``.

  Raises:
    BadAudioError: reason ``unreadable`` (missing file or undecodable bytes), ``empty``,
      ``non_finite``, ``too_short``, ``below_min_size`` or ``silent``.
  """
  path = os.fspath(path)
  try:
    if os.path.getsize(path) == 0:
      raise BadAudioError(path, "empty", "0-byte file")
  except OSError as e:
    raise BadAudioError(path, "unreadable", str(e)) from None
  x, sr = _decode(path)
  if x.size == 0:
    raise BadAudioError(path, "empty")
  if not np.all(np.isfinite(x)):
    raise BadAudioError(path, "non_finite")
  x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
  if sr != target_sr:
    x = _resample(x, sr, target_sr)
  x = validate_waveform(x, path, min_samples=min_samples)
  if max_samples is not None and x.size > max_samples:
    off = 0 if rng is None else int(rng.integers(0, x.size - max_samples + 1))
    x = np.ascontiguousarray(x[off:off + max_samples])
  return x


def normalize_waveform(x, valid_len=None, *, eps: float = 1e-5) -> np.ndarray:
  """Zero mean / unit variance over the valid samples (fairseq ``task.normalize``, spec §1.1).

  A layer norm without affine over the whole 1-D waveform: ``(x - mean) / sqrt(var + eps)`` with
  the biased variance, as fairseq's ``F.layer_norm(x, x.shape)``.

  Args:
    x: float ``[S]`` or ``[B, S]`` waveform.
    valid_len: None (all samples valid) or int (``[B]`` for 2-D input): samples ``>= valid_len``
      are padding, excluded from the statistics and returned as 0.
    eps: added to the variance.

  Returns:
    float32 array of the shape of ``x``.
  """
  x = np.asarray(x, dtype=np.float32)
  if x.ndim == 1:
    vl = None if valid_len is None else np.asarray(valid_len).reshape(1)
    return normalize_waveform(x[None], vl, eps=eps)[0]
  b, s = x.shape
  n = (np.full((b,), s, np.int64) if valid_len is None
       else np.asarray(valid_len, np.int64).reshape(b))
  valid = np.arange(s)[None, :] < n[:, None]
  cnt = np.maximum(n, 1)[:, None].astype(np.float64)
  x64 = x.astype(np.float64)
  mean = np.where(valid, x64, 0.0).sum(1, keepdims=True) / cnt
  var = np.where(valid, (x64 - mean) ** 2, 0.0).sum(1, keepdims=True) / cnt
  return np.where(valid, (x64 - mean) / np.sqrt(var + eps), 0.0).astype(np.float32)
