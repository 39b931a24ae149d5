"""Linear probes during pre-training (issue 7, item 4): the heads learn what is linearly present in
the features and nothing else, the statistics are the training set's, and the speech provider
feeds the whole transcribed utterances of a split through the model."""

import numpy as np
import pytest

from d2vjax import asr, configs_lib, probe, registry


def _letters_to_frames(text: str, vocab: asr.Vocabulary, rng, dim: int) -> np.ndarray:
  """One-hot letter frames (3 per unit, one blank frame after each) plus noise: a representation
  from which a linear CTC head can read the transcript."""
  frames = []
  for u in vocab.encode(text):
    frames += [u] * 3 + [asr.BLANK]
  x = np.eye(dim, dtype=np.float32)[frames]
  return x + 0.1 * rng.standard_normal(x.shape).astype(np.float32)


def _ctc_sets(texts_train, texts_valid, shuffle: bool = False):
  rng = np.random.default_rng(0)
  vocab = asr.Vocabulary.build(texts_train)
  dim = len(vocab) + 2

  def feats(texts):
    xs = [_letters_to_frames(t, vocab, rng, dim) for t in texts]
    if shuffle:  # features of other utterances: nothing to read
      xs = xs[1:] + xs[:1]
    t = max(len(x) for x in xs)
    out = np.zeros((len(xs), t, dim), np.float32)
    pad = np.ones((len(xs), t), bool)
    for i, x in enumerate(xs):
      out[i, :len(x)], pad[i, :len(x)] = x, False
    return probe.Features(out, pad)

  return (feats(texts_train), feats(texts_valid), probe.ProbeData([], "ctc", list(texts_train)),
          probe.ProbeData([], "ctc", list(texts_valid)))


WORDS = ["A CAT", "THE DOG", "BAD CAT", "A TOAD", "GOOD DOG", "THE CAT AT DAWN", "DO GO", "TAG",
         "COAT", "GOAT", "DATA", "CAT DOG"]


def test_ctc_probe_reads_linearly_encoded_letters_and_nothing_else():
  train, valid, td, vd = _ctc_sets(WORDS * 2, ["THE GOAT", "A DOG AT DAWN"])
  good = registry.get("probe", "ctc")(train, valid, td, vd, steps=300, lr=0.05, seed=0)
  assert good["cer"] < 0.05, good
  train, valid, td, vd = _ctc_sets(WORDS * 2, ["THE GOAT", "A DOG AT DAWN"], shuffle=True)
  bad = registry.get("probe", "ctc")(train, valid, td, vd, steps=300, lr=0.05, seed=0)
  assert bad["cer"] > 0.4, bad


def test_classify_probe_separable_clusters_vs_shuffled_labels():
  rng = np.random.default_rng(0)
  centers = 3.0 * rng.standard_normal((4, 16))

  def sample(n):
    y = rng.integers(0, 4, n)
    x = centers[y][:, None, :] + rng.standard_normal((n, 5, 16))  # 5 positions, pooled
    pad = np.zeros((n, 5), bool)
    pad[:, 4] = True
    x[:, 4] = 100.0  # a padded position must not leak into the pooled feature
    return probe.Features(x.astype(np.float32), pad), y

  (tr, ytr), (va, yva) = sample(64), sample(64)
  fn = registry.get("probe", "classify")
  acc = fn(tr, va, probe.ProbeData([], "classify", list(ytr), 4),
           probe.ProbeData([], "classify", list(yva), 4), steps=200, lr=0.05, seed=0)
  assert acc["accuracy"] >= 0.95, acc
  shuffled = rng.permutation(ytr)
  acc = fn(tr, va, probe.ProbeData([], "classify", list(shuffled), 4),
           probe.ProbeData([], "classify", list(yva), 4), steps=200, lr=0.05, seed=0)
  assert acc["accuracy"] <= 0.6, acc


def test_standardize_uses_training_statistics_over_valid_positions():
  rng = np.random.default_rng(1)
  a = rng.normal(3.0, 2.0, (4, 6, 3))
  b = rng.normal(0.0, 1.0, (2, 6, 3))
  mask = rng.random((4, 6)) > 0.3
  sa, sb = probe._standardize(a, b, axes=(0, 1), mask=mask)
  vals = a[mask]  # [n, 3]
  mean, std = vals.mean(0), np.sqrt(vals.var(0) + 1e-6)
  np.testing.assert_allclose(sa[mask], (vals - mean) / std, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sb, (b - mean) / std, rtol=1e-5, atol=1e-5)


def test_resolve_layer():
  assert probe.resolve_layer(-1, 4) == 4 and probe.resolve_layer(0, 4) == 0
  with pytest.raises(ValueError, match="probe.layer"):
    probe.resolve_layer(5, 4)


def test_speech_probe_on_embedded_corpus_with_a_random_model():
  """The provider returns every selected transcribed utterance exactly once (whole, padded), the
  prober's encoder sees them at the requested layer, and a random model's CTC probe gives a
  valid CER. (A trained model's probe scores better: docs/finetuning.md.)"""
  import jax
  c = configs_lib.data2vec_speech("base")
  configs_lib.test_preset(c)
  # One 8 s bucket: one compiled encoder program (the embedded clips are 2 … 7.1 s).
  c.probe = probe.probe_fields(every=2, max_train=6, max_valid=3, layer=1, steps=20,
                               buckets=[128000])
  train = registry.get("probe_data", "speech")(c, "train", 6, 2)
  valid = registry.get("probe_data", "speech")(c, "valid", 3, 2)
  assert len(train.targets) == 6 and len(valid.targets) == 3
  assert all(t == asr.normalize_text(t) and t for t in train.targets)
  rows = sum(int(b["_global_row_valid"].sum()) for b in train.batches)
  assert rows == 6
  for b in train.batches:  # whole utterances: nothing cropped, padding only at the end
    valid_samples = (~b["padding_mask"]).sum(1)
    assert (b["padding_mask"].argmin(1) == 0).all()
    assert np.all(np.diff(b["padding_mask"].astype(int), axis=1) >= 0)
    assert (valid_samples[b["row_valid"]] > 0).all()
  obj = registry.get("objective", c.objective)(c)
  params = jax.jit(obj.init)(jax.random.key(0), obj.modality.dummy_batch(c.data))
  prober = probe.make_prober(c, obj, batch_multiple=2)
  feats = probe.encode_all(prober.encode, params, prober.train_data)
  assert feats.x.shape[0] == 6 and feats.x.shape[2] == obj.encoder_cfg.dim
  assert not feats.x[feats.padding].any()
  scores = prober(params)
  assert set(scores) == {"probe/cer", "probe/wer"}
  assert 0.0 <= scores["probe/cer"] and np.isfinite(scores["probe/cer"])


def test_probe_off_and_missing_labels():
  c = configs_lib.data2vec_speech("base")
  configs_lib.test_preset(c)
  assert probe.make_prober(c, None) is None  # no probe section: off
  c.probe = probe.probe_fields(every=5, train_split="nonexistent_split")
  with pytest.raises((ValueError, FileNotFoundError, KeyError)):
    probe.make_prober(c, registry.get("objective", c.objective)(c))
