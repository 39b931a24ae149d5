"""audio_io: decoding, channel averaging, resampling, bad-clip reasons, normalisation."""

import pickle

import numpy as np
import pytest
import soundfile as sf

from d2vjax.data import audio_io
from d2vjax.data.audio_io import BadAudioError, load_audio, normalize_waveform


def _sine(n, sr=16000, f=440.0, amp=0.5):
  return (amp * np.sin(2 * np.pi * f * np.arange(n) / sr)).astype(np.float32)


def _write(path, x, sr=16000, subtype="FLOAT"):
  sf.write(str(path), x, sr, subtype=subtype)
  return str(path)


def test_loads_mono_float32(tmp_path):
  x = _sine(8000)
  y = load_audio(_write(tmp_path / "a.flac", x, subtype="PCM_16"))
  assert y.dtype == np.float32 and y.shape == (8000,)
  np.testing.assert_allclose(y, x, atol=1 / 32768)


def test_stereo_is_averaged(tmp_path):
  left, right = _sine(4000, f=300.0), _sine(4000, f=700.0, amp=0.2)
  y = load_audio(_write(tmp_path / "st.wav", np.stack([left, right], axis=1)))
  np.testing.assert_allclose(y, (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize("sr", [22050, 44100, 8000])
def test_other_rates_resampled_to_16k(tmp_path, sr):
  n = int(sr * 0.61)
  y = load_audio(_write(tmp_path / f"r{sr}.wav", _sine(n, sr=sr, f=200.0), sr=sr))
  assert y.shape == (audio_io.resampled_length(n, sr),)
  assert abs(y.size - n * 16000 / sr) <= 1
  # Same tone at the new rate (away from the filter's edge effects).
  np.testing.assert_allclose(y[400:-400], _sine(y.size, f=200.0)[400:-400], atol=2e-2)


def test_ogg_vorbis(tmp_path):
  y = load_audio(_write(tmp_path / "b.ogg", _sine(6000), subtype="VORBIS"))
  assert y.shape[0] == pytest.approx(6000, abs=2) and y.dtype == np.float32


@pytest.mark.parametrize("case, reason", [
    ("corrupt", "unreadable"),
    ("missing", "unreadable"),
    ("zero_bytes", "empty"),
    ("no_frames", "empty"),
    ("short", "too_short"),
    ("nan", "non_finite"),
    ("inf", "non_finite"),
    ("silent", "silent"),
    ("below_min", "below_min_size"),
])
def test_bad_clips_raise_with_reason(tmp_path, case, reason):
  p = tmp_path / f"{case}.wav"
  kwargs = {}
  if case == "corrupt":
    p.write_bytes(b"RIFF\x00\x00garbage-not-audio" * 20)
  elif case == "zero_bytes":
    p.write_bytes(b"")
  elif case == "no_frames":
    _write(p, np.zeros((0,), np.float32))
  elif case == "short":
    _write(p, _sine(399))
  elif case in ("nan", "inf"):
    x = _sine(4000)
    x[100] = np.nan if case == "nan" else np.inf
    _write(p, x)
  elif case == "silent":
    _write(p, np.zeros((4000,), np.float32), subtype="PCM_16")
  elif case == "below_min":
    _write(p, _sine(4000))
    kwargs["min_samples"] = 4001
  with pytest.raises(BadAudioError) as err:
    load_audio(str(p), **kwargs)
  assert err.value.reason == reason
  assert str(p) in str(err.value)


def test_exactly_receptive_field_is_accepted(tmp_path):
  assert load_audio(_write(tmp_path / "rf.wav", _sine(400))).shape == (400,)


def test_bad_audio_error_pickles_and_rejects_unknown_reasons():
  e = pickle.loads(pickle.dumps(BadAudioError("/x.wav", "silent", "d")))
  assert (e.path, e.reason, e.detail) == ("/x.wav", "silent", "d")
  with pytest.raises(ValueError):
    BadAudioError("/x.wav", "sad")


def test_max_samples_crops_a_window(tmp_path):
  x = np.linspace(-0.5, 0.5, 5000, dtype=np.float32)
  p = _write(tmp_path / "long.wav", x)
  y = load_audio(p, max_samples=1000, rng=np.random.default_rng(3))
  assert y.shape == (1000,)
  off = int(np.argmin(np.abs(x - y[0])))
  np.testing.assert_allclose(y, x[off:off + 1000], atol=1e-7)
  y2 = load_audio(p, max_samples=1000, rng=np.random.default_rng(3))
  np.testing.assert_array_equal(y, y2)
  np.testing.assert_array_equal(load_audio(p, max_samples=1000), x[:1000])


def test_normalize_waveform_matches_layer_norm():
  rng = np.random.default_rng(0)
  x = (3 + 2 * rng.standard_normal(1000)).astype(np.float32)
  y = normalize_waveform(x)
  ref = (x - x.mean()) / np.sqrt(x.var() + 1e-5)
  np.testing.assert_allclose(y, ref, atol=1e-5)
  assert abs(y.mean()) < 1e-5 and abs(y.std() - 1) < 1e-3


def test_normalize_waveform_ignores_padding():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 50)).astype(np.float32)
  x[0, 30:] = 100.0  # padding garbage must not leak into the statistics
  y = normalize_waveform(x, valid_len=[30, 50])
  np.testing.assert_allclose(y[0, :30], normalize_waveform(x[0, :30]), atol=1e-6)
  assert np.all(y[0, 30:] == 0)
  np.testing.assert_allclose(y[1], normalize_waveform(x[1]), atol=1e-6)


def test_resampled_length_rounds_half_up():
  assert audio_io.resampled_length(421, 32000) == 211  # 210.5 → 211, as soxr does
  assert audio_io.resampled_length(44100, 44100) == 16000
  np.testing.assert_array_equal(audio_io.resampled_length(np.array([1000, 12345]), 22050),
                                [726, 8958])
