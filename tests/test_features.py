"""Feature extraction (issue 7, item 5): padding handled (a padded batch equals the unpadded
utterances on their valid frames), layer indexing, and the folder writer behind the CLI."""

import functools
import json
import os

import jax
import numpy as np
import pytest
import soundfile as sf

from d2vjax import configs_lib, features, registry


@functools.lru_cache(maxsize=2)
def _model(objective: str = "data2vec"):
  """Randomly initialised 2-layer × 32 model (padding behaviour does not depend on training)."""
  build = configs_lib.data2vec_speech if objective == "data2vec" else configs_lib.wav2vec2_speech
  c = build("base")
  configs_lib.test_preset(c)
  c.model.encoder.update(dict(num_layers=2, dim=32, ffn_dim=64, pos_depth=1))
  obj = registry.get("objective", objective)(c)
  params = jax.jit(obj.init)(jax.random.key(0), obj.modality.dummy_batch(c.data))
  return jax.tree.map(np.asarray, params), c


def _waves(lengths, seed=0):
  rng = np.random.default_rng(seed)
  # Speech-like scale and a DC offset, so per-utterance normalisation matters.
  return [(0.1 * rng.standard_normal(n) + 0.05).astype(np.float32) for n in lengths]


@pytest.mark.parametrize("objective", ["data2vec", "wav2vec2"])
def test_padded_batch_equals_unpadded_on_valid_frames(objective):
  """data2vec (layer-norm CNN, normalised waveforms) pads in one batch; wav2vec 2.0 Base
  (GroupNorm CNN, raw waveforms) encodes padded rows one by one: both match the unpadded runs."""
  params, c = _model(objective)
  waves = _waves([12000, 7000])
  s = 12000
  audio = np.zeros((2, s), np.float32)
  pad = np.ones((2, s), bool)
  for i, w in enumerate(waves):
    audio[i, :w.size], pad[i, :w.size] = w, False
  batch = features.extract(params, c, {"audio": audio, "padding_mask": pad}, layers=[0, 1, -1])
  assert sorted(batch.layers) == [0, 1, 2]
  assert list(batch.lengths) == [37, 21]
  # The padded row against the same utterance alone, unpadded (one more compiled shape).
  alone = features.extract(params, c, {"audio": waves[1][None]}, layers=[0, 1, -1])
  assert list(alone.lengths) == [21]
  for k in (0, 1, 2):
    np.testing.assert_allclose(batch.layers[k][1, :21], alone.layers[k][0], atol=2e-5,
                               err_msg=f"layer {k}")
    assert not batch.layers[k][1, 21:].any()  # padded frames are zero
    assert np.abs(batch.layers[k][0]).sum() > 0
  assert batch.padding_mask[1, 21:].all() and not batch.padding_mask[1, :21].any()


def test_layer_indices():
  assert features.resolve_layers(None, 3) == (0, 1, 2, 3)
  assert features.resolve_layers([-1, 0, -4, 2], 3) == (3, 0, 0, 2)
  with pytest.raises(ValueError, match="out of range"):
    features.resolve_layers([4], 3)


def test_extract_folder_writes_npy_and_npz(tmp_path):
  params, c = _model()
  folder = tmp_path / "wavs"
  (folder / "sub").mkdir(parents=True)
  for name, w in zip(["a.wav", "sub/b.wav"], _waves([16000, 9000])):
    sf.write(folder / name, w, 16000)
  (folder / "broken.wav").write_bytes(b"")
  out = tmp_path / "out"
  r = features.extract_folder(params, c, str(folder), str(out), [-1])
  assert r == {"written": 2, "skipped": {"empty": 1}, "layers": [2]}
  a = np.load(out / "a.npy")
  assert a.shape == (49, 32) and a.dtype == np.float32
  assert np.load(out / "sub" / "b.npy").shape == (27, 32)
  features.extract_folder(params, c, str(folder), str(tmp_path / "all"))
  z = np.load(tmp_path / "all" / "sub" / "b.npz")
  assert sorted(z.files) == ["layer_0", "layer_1", "layer_2"]
  np.testing.assert_allclose(z["layer_2"], np.load(out / "sub" / "b.npy"), atol=1e-6)
  # Same numbers as extracting the file alone (different batch, different padding).
  wav, _ = sf.read(folder / "sub" / "b.wav", dtype="float32")
  alone = features.extract(params, json.loads(c.to_json_best_effort()), {"audio": wav[None]},
                           layers=[-1])
  np.testing.assert_allclose(alone.layers[2][0], z["layer_2"], atol=2e-5)
  assert os.path.isdir(out / "sub")
