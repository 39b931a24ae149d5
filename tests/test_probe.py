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
  # One 4 s bucket: one compiled encoder program (clips of 2 … 4 s; the corpus has 2 … 7.1 s).
  c.probe = configs_lib.probe_fields(every=2, max_train=6, max_valid=3, layer=1, steps=20,
                                     buckets=[64000])
  train = registry.get("probe_data", "speech")(c, "train", 6, 2)
  valid = registry.get("probe_data", "speech")(c, "valid", 3, 2)
  assert len(train.targets) == 6 and len(valid.targets) == 3
  assert all(t == asr.normalize_text(t) and t for t in train.targets)
  rows = sum(int(b["row_valid"].sum()) for b in train.batches)
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
  c.probe = configs_lib.probe_fields(every=5, train_split="nonexistent_split")
  with pytest.raises((ValueError, FileNotFoundError, KeyError)):
    probe.make_prober(c, registry.get("objective", c.objective)(c))


def _prober_accuracy(c):
  import jax
  obj = registry.get("objective", c.objective)(c)
  params = jax.jit(obj.init)(jax.random.key(0), obj.modality.dummy_batch(c.data, 2))
  prober = probe.make_prober(c, obj, batch_multiple=2)
  return prober, prober(params)


def test_vision_probe_reads_an_image_folder_with_the_eval_view(tmp_path):
  """Two colour classes in an ImageFolder: the provider labels them by subfolder, builds the
  centre-crop view, and even a random ViT's pooled patch features separate them linearly."""
  from PIL import Image
  from d2vjax import configs_vision
  from d2vjax.probes import vision as vision_probe
  rng = np.random.default_rng(0)
  for split, n in (("train", 12), ("val", 6)):
    for cls, channel in (("blue", 2), ("red", 0)):
      (tmp_path / split / cls).mkdir(parents=True)
      for i in range(n):
        px = rng.integers(0, 80, (40, 50, 3)).astype(np.uint8)
        px[..., channel] = rng.integers(150, 255, (40, 50))
        Image.fromarray(px).save(tmp_path / split / cls / f"{i}.png")
  c = configs_vision.data2vec_vision("base")
  configs_vision.test_preset(c)
  c.data.source, c.data.folder = "folder", str(tmp_path)
  c.probe = configs_lib.probe_fields(every=2, valid_split="valid", max_train=24, max_valid=12,
                               steps=100, lr=0.05)
  prober, scores = _prober_accuracy(c)
  assert sorted(prober.train_data.targets) == [0] * 12 + [1] * 12  # blue = 0, red = 1
  assert prober.train_data.num_classes == 2 and len(prober.valid_data.targets) == 12
  s = int(c.data.image_size)
  assert prober.train_data.batches[0]["image"].shape[1:] == (s, s, 3)
  # The eval view: shorter side to s / 0.875, centre crop (PIL reference).
  img = Image.open(tmp_path / "train" / "red" / "0.png").convert("RGB")
  short = round(s / 0.875)
  big = img.resize((round(50 * short / 40), short), Image.Resampling.BICUBIC)
  left, top = (big.size[0] - s) // 2, (big.size[1] - s) // 2
  want = np.asarray(big.crop((left, top, left + s, top + s)), np.float32) / 255.0
  aug = vision_probe.image.augment_from_config(c.data)
  got = vision_probe.eval_view(img, aug) * np.asarray(aug.std) + np.asarray(aug.mean)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert scores["probe/accuracy"] >= 0.9, scores


def test_text_probe_reads_tsv_sentence_labels(tmp_path):
  """label<TAB>sentence files; labels numbered from the training file; a random RoBERTa's pooled
  token features separate sentences built from two disjoint word lists."""
  from d2vjax import configs_text
  rng = np.random.default_rng(0)
  pos, neg = ["good", "great", "happy", "bright"], ["bad", "awful", "sad", "dark"]

  def write(path, n):
    lines = []
    for i in range(n):
      label, words = ("pos", pos) if i % 2 == 0 else ("neg", neg)
      lines.append(label + "\t" + " ".join(rng.choice(words, 5)))
    path.write_text("\n".join(lines) + "\n\n")

  write(tmp_path / "train.tsv", 24)
  write(tmp_path / "dev.tsv", 10)
  c = configs_text.data2vec_text("base")
  configs_text.text_test_preset(c)
  c.probe = configs_lib.probe_fields(every=2, train_split=str(tmp_path / "train.tsv"),
                               valid_split=str(tmp_path / "dev.tsv"), max_train=24, max_valid=10,
                               steps=100, lr=0.05)
  prober, scores = _prober_accuracy(c)
  assert prober.train_data.num_classes == 2
  assert prober.train_data.targets[:4] == [1, 0, 1, 0]  # sorted labels: neg = 0, pos = 1
  b = prober.train_data.batches[0]
  assert (b["tokens"][b["row_valid"], 0] == 0).all()  # <s> first
  assert scores["probe/accuracy"] >= 0.9, scores
  (tmp_path / "broken.tsv").write_text("no tab here\n")
  from d2vjax.probes import text as text_probe
  with pytest.raises(ValueError, match=r"broken.tsv:1"):
    text_probe.read_tsv(str(tmp_path / "broken.tsv"))


def test_trainer_logs_probe_scores_at_the_interval(tmp_path):
  """``train.run`` with ``probe.every=2``: probe scores appear in metrics.jsonl at steps 2 and 4
  only, computed on a 2-device data-parallel mesh."""
  import json
  import os
  from d2vjax import train
  c = configs_lib.data2vec_speech("base")
  configs_lib.test_preset(c, total_steps=4)
  c.num_devices = 2
  # 4 s clips only (the shortest third of the corpus): one small compiled encoder program.
  c.probe = configs_lib.probe_fields(every=2, max_train=4, max_valid=2, steps=10,
                                     buckets=[64000])
  workdir = str(tmp_path / "run")
  assert train.run(c, workdir) == 0
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  probed = [r for r in rows if "probe/cer" in r]
  assert [r["step"] for r in probed] == [2, 4]
  for r in probed:
    assert 0.0 <= r["probe/cer"] and 0.0 <= r["probe/wer"] and r["probe/seconds"] > 0
