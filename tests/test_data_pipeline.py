"""Sources and the grain speech pipeline: buckets, shapes, order, shards, bad clips, state."""

import os
import sys
import types

import grain
import numpy as np
import pytest
import soundfile as sf

from d2vjax.data import audio_io, pipeline, sources
from d2vjax.data.sources import Example

BUCKETS = [2000, 4000, 8000, 12000]
MASK = dict(mask_prob=0.65, mask_length=2, min_masks=1)


def _write(path, n, *, sr=16000, seed=0, channels=1, value=None):
  rng = np.random.default_rng(seed)
  x = (0.1 * rng.standard_normal((n, channels))).astype(np.float32)
  if value is not None:
    x[:] = value
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  sf.write(str(path), x, sr, subtype="FLOAT" if str(path).endswith(".wav") else None)
  return str(path)


def _manifest(folder, rows, name="train"):
  with open(os.path.join(folder, f"{name}.tsv"), "w") as f:
    f.write(".\n" + "".join(f"{rel}\t{n}\n" for rel, n in rows))
  return os.path.join(folder, f"{name}.tsv")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """40 clips of 3000–14000 samples (one longer than the largest bucket) and a manifest."""
  root = str(tmp_path_factory.mktemp("corpus"))
  rng = np.random.default_rng(0)
  rows = []
  for i in range(40):
    n = 15000 if i == 0 else int(rng.integers(3000, 14000))
    _write(os.path.join(root, f"{i:03d}.wav"), n, seed=i)
    rows.append((f"{i:03d}.wav", n))
  tsv = _manifest(root, rows)
  with open(os.path.join(root, "train.wrd"), "w") as f:
    f.write("".join(f"WORDS {i}\n" for i in range(40)))
  return tsv


def _cfg(tsv, **kw):
  cfg = dict(source="manifest", manifest=tsv, valid_manifest=tsv, sample_rate=16000,
             normalize=True, min_sample_size=2000, max_sample_size=16000, buckets=BUCKETS,
             mode="crop", budget_samples=32000, max_rows=0, num_workers=0, num_threads=0, seed=7)
  cfg.update(kw)
  return cfg


def _epoch(cfg, examples, **kw):
  return list(pipeline.make_speech_iterator(cfg, examples=examples, num_epochs=1, **kw))


# ------------------------------------------------------------------------------------- sources


def test_read_manifest_resolves_root_and_transcripts(corpus):
  ex = sources.read_manifest(corpus, transcripts_path=corpus[:-4] + ".wrd")
  assert len(ex) == 40 and ex[3].transcript == "WORDS 3" and ex[3].key == "003"
  assert ex[3].path == os.path.join(os.path.dirname(corpus), "003.wav")
  assert os.path.exists(ex[3].path) and ex[0].num_samples == 15000


def test_missing_inputs_raise_with_path(tmp_path, corpus):
  missing = str(tmp_path / "nope.tsv")
  for call in (lambda: sources.read_manifest(missing),
               lambda: sources.read_manifest(corpus, transcripts_path=missing),
               lambda: sources.scan_folder(missing),
               lambda: sources.examples_from_config(_cfg(missing), "train"),
               lambda: sources.examples_from_config(dict(source="folder", folder=missing), "train"),
               lambda: sources.examples_from_config(
                   dict(source="folder", folder=str(tmp_path), train_split="nope.tsv"), "train")):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
      call()
  with pytest.raises(ValueError, match="unknown data.source"):
    sources.examples_from_config(dict(source="s3"), "train")


def test_transcript_count_mismatch_raises(tmp_path, corpus):
  bad = tmp_path / "short.wrd"
  bad.write_text("ONLY ONE\n")
  with pytest.raises(ValueError, match="1 lines"):
    sources.read_manifest(corpus, transcripts_path=str(bad))


def test_scan_folder_librispeech_layout(tmp_path):
  d = tmp_path / "train-clean-100" / "84" / "121123"
  _write(d / "84-121123-0000.flac", 5000)
  _write(d / "84-121123-0001.wav", 22050, sr=44100, channels=2)  # → 8000 samples at 16 kHz
  (d / "84-121123.trans.txt").write_text("84-121123-0000 HELLO\n84-121123-0001 GOOD BYE\n")
  (d / "84-121123-0002.flac").write_bytes(b"not a flac at all" * 10)
  _write(tmp_path / "other" / "x.ogg", 3000)
  ex = sources.scan_folder(str(tmp_path))
  by_key = {e.key: e for e in ex}
  assert sorted(by_key) == ["other/x", "train-clean-100/84/121123/84-121123-0000",
                            "train-clean-100/84/121123/84-121123-0001",
                            "train-clean-100/84/121123/84-121123-0002"]
  e1 = by_key["train-clean-100/84/121123/84-121123-0001"]
  assert e1.num_samples == 8000 and e1.transcript == "GOOD BYE"
  assert by_key["other/x"].transcript is None
  assert by_key["train-clean-100/84/121123/84-121123-0002"].num_samples == sources.UNREADABLE
  assert audio_io.load_audio(e1.path).shape == (8000,)
  kept, counts = sources.filter_examples(ex, min_samples=4000)
  assert counts == {"unreadable": 1, "below_min_size": 1} and len(kept) == 2


def test_filter_examples_counts_every_reason():
  ex = [Example("a", n) for n in (-1, 0, 399, 1999, 2000, 9000, 20000)]
  kept, counts = sources.filter_examples(ex, min_samples=2000, max_samples=10000)
  assert [e.num_samples for e in kept] == [2000, 9000]
  assert counts == {"unreadable": 1, "empty": 1, "too_short": 1, "below_min_size": 1,
                    "above_max_size": 1}


def test_examples_from_config_dispatch(tmp_path, corpus, monkeypatch):
  ex, skipped = sources.examples_from_config(_cfg(corpus), "train")
  assert len(ex) == 40 and skipped == {} and ex[5].transcript == "WORDS 5"
  _write(tmp_path / "dev" / "a.wav", 3000)
  _write(tmp_path / "dev" / "b.wav", 1000)
  ex, skipped = sources.examples_from_config(
      dict(source="folder", folder=str(tmp_path), valid_split="dev", min_sample_size=2000), "valid")
  assert [e.key for e in ex] == ["a"] and skipped == {"below_min_size": 1}
  fake = types.ModuleType("d2vjax.data.embedded")
  fake.speech_manifest = lambda split: corpus
  import d2vjax.data
  monkeypatch.setitem(sys.modules, "d2vjax.data.embedded", fake)
  monkeypatch.setattr(d2vjax.data, "embedded", fake, raising=False)
  ex, _ = sources.examples_from_config(dict(source="embedded", min_sample_size=0), "train")
  assert len(ex) == 40


def test_num_frames_mirror_matches_model():
  from d2vjax.models import audio as model_audio
  n = np.concatenate([np.arange(0, 2000), [32000, 250000, 320000]])
  np.testing.assert_array_equal(audio_io.num_frames(n), model_audio.num_frames(n))
  assert (audio_io.SAMPLE_RATE, audio_io.RECEPTIVE_FIELD) == (
      model_audio.SAMPLE_RATE, model_audio.RECEPTIVE_FIELD)


# ------------------------------------------------------------------------------------ planning


def test_batch_rows_formula():
  assert pipeline.batch_rows(32000, 1_400_000, 8) == 40
  assert pipeline.batch_rows(250000, 1_400_000, 8) == 8  # at least one row per device
  assert pipeline.batch_rows(250000, 1_400_000, 1) == 5
  assert pipeline.batch_rows(32000, 1_400_000, 8, max_rows=20) == 16


def test_bucket_assignment_crop_and_pad():
  lengths = [1000, 2000, 3999, 4000, 13000]
  crop = pipeline.plan_buckets(lengths, BUCKETS, mode="crop", budget_samples=4000)
  assert [m.tolist() for m in crop.members] == [[1, 2], [3], [], [4]]
  assert crop.counts["below_smallest_bucket"] == 1
  pad = pipeline.plan_buckets(lengths, BUCKETS, mode="pad", budget_samples=4000)
  assert [m.tolist() for m in pad.members] == [[0, 1], [2, 3], [], [4]]
  assert pad.counts["cropped"] == 1
  assert pad.rows == (2, 1, 1, 1) and pad.num_batches == (1, 2, 0, 1)
  for bad in ([], [2000, 2000], [300, 4000], [4000, 2000]):
    with pytest.raises(ValueError):
      pipeline.plan_buckets(lengths, bad, mode="crop", budget_samples=4000)
  with pytest.raises(ValueError, match="max_sample_size"):
    pipeline.plan_buckets(lengths, BUCKETS, mode="crop", budget_samples=4000, max_sample_size=8000)
  with pytest.raises(ValueError, match="mode"):
    pipeline.plan_buckets(lengths, BUCKETS, mode="squash", budget_samples=4000)


def test_epoch_plan_is_pure_and_longest_bucket_first():
  plan = pipeline.plan_buckets(np.arange(2000, 14000, 100), BUCKETS, mode="crop",
                               budget_samples=24000)
  a, b = pipeline.epoch_batches(plan, 3, 1), pipeline.epoch_batches(plan, 3, 1)
  assert a[0] == b[0] and all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))
  assert a[0] != pipeline.epoch_batches(plan, 3, 2)[0]
  assert a[0][0][0] == len(BUCKETS) - 1
  assert len(a[0]) == plan.total_batches


# ------------------------------------------------------------------------------------- batches


def test_crop_mode_static_shapes_no_padding(corpus):
  cfg = _cfg(corpus)
  ex, _ = sources.examples_from_config(cfg, "train")
  shapes = pipeline.batch_shapes(cfg, ex, batch_multiple=2)
  assert 0 < len(shapes) <= len(BUCKETS)
  assert "batch shapes" in pipeline.describe_shapes(cfg, ex, 2)
  fp = pipeline.plan_fingerprint(cfg, ex, 2)
  assert fp == pipeline.plan_fingerprint(cfg, list(ex), 2)
  assert fp != pipeline.plan_fingerprint(cfg, ex[1:], 2) != pipeline.plan_fingerprint(cfg, ex, 4)
  batches = _epoch(cfg, ex, batch_multiple=2, batch_fn=pipeline.speech_mask_fn(MASK))
  assert len(batches) == sum(shapes.values())
  seen = {b["audio"].shape for b in batches}
  assert seen == set(shapes) and len(seen) <= len(BUCKETS)
  assert batches[0]["audio"].shape[1] == max(s for _, s in shapes)  # OOM shows at step 0
  for b in batches:
    assert b["audio"].dtype == np.float32 and b["padding_mask"].dtype == bool
    assert not b["padding_mask"].any() and np.isfinite(b["audio"]).all()
    assert b["audio"].shape[0] % 2 == 0 and b["audio"].shape[0] * b["audio"].shape[1] <= 32000
    t = audio_io.num_frames(b["audio"].shape[1])
    assert b["mask"].shape == (b["audio"].shape[0], t) and b["mask"].dtype == bool
    counts = b["mask"].sum(1)
    assert (counts == counts[0]).all() and counts[0] > 0
    assert not b["mask"][:, t - 1].any()  # fairseq never masks the last frame
    assert b["_bad"] == {}
  keys = [k for b in batches for k in b["_keys"]]
  assert len(keys) == len(set(keys))  # each clip at most once per epoch


def test_pad_mode_padding_masks_and_cropping(corpus):
  cfg = _cfg(corpus, mode="pad", normalize=False)
  ex, _ = sources.examples_from_config(cfg, "train")
  lengths = {e.key: e.num_samples for e in ex}
  batches = _epoch(cfg, ex, batch_fn=pipeline.speech_mask_fn(MASK))
  assert len({b["audio"].shape for b in batches}) <= len(BUCKETS)
  saw_long = False
  for b in batches:
    rows, s = b["audio"].shape
    for r, key in enumerate(b["_keys"]):
      n = min(lengths[key], s)
      saw_long |= lengths[key] > s
      assert lengths[key] > s or s == min(x for x in BUCKETS if x >= lengths[key])
      np.testing.assert_array_equal(b["padding_mask"][r], np.arange(s) >= n)
      assert not b["audio"][r, n:].any() and b["audio"][r, :n].any()
      frames = audio_io.num_frames(n)
      assert not b["mask"][r, frames:].any()  # never mask padding
    counts = b["mask"].sum(1)
    assert (counts == counts[0]).all()
  assert saw_long  # the 15000-sample clip was cropped into the 12000 bucket, not dropped


def test_order_depends_only_on_seed(corpus):
  cfg = _cfg(corpus)
  ex, _ = sources.examples_from_config(cfg, "train")
  fn = pipeline.speech_mask_fn(MASK)
  a = _epoch(cfg, ex, batch_fn=fn)
  b = _epoch(cfg, ex, batch_fn=fn)
  c = _epoch(cfg, ex, seed=8, batch_fn=fn)
  for x, y in zip(a, b):
    assert x["_keys"] == y["_keys"]
    np.testing.assert_array_equal(x["audio"], y["audio"])
    np.testing.assert_array_equal(x["mask"], y["mask"])
  assert [x["_keys"] for x in a] != [x["_keys"] for x in c]
  # Epoch 2 is a different order, and an iterator started at epoch 1 reproduces it.
  two = list(pipeline.make_speech_iterator(cfg, examples=ex, num_epochs=2))
  assert [x["_keys"] for x in two[:len(a)]] == [x["_keys"] for x in a]
  assert [x["_keys"] for x in two[len(a):]] != [x["_keys"] for x in a]
  later = _epoch(cfg, ex, start_epoch=1)
  assert [x["_keys"] for x in later] == [x["_keys"] for x in two[len(a):]]


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_process_shards_rebuild_the_global_batch(corpus, mode):
  cfg = _cfg(corpus, mode=mode)
  ex, _ = sources.examples_from_config(cfg, "train")
  fn = pipeline.speech_mask_fn(MASK)
  single = _epoch(cfg, ex, batch_multiple=4, batch_fn=fn)
  shards = [_epoch(cfg, ex, batch_multiple=4, process_index=p, process_count=2, batch_fn=fn)
            for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == len(single)  # same step count on every host
  keys = [set(), set()]
  for g, b0, b1 in zip(single, *shards):
    assert b0["audio"].shape[0] == b1["audio"].shape[0] == g["audio"].shape[0] // 2
    for k in ("audio", "padding_mask", "mask"):
      np.testing.assert_array_equal(np.concatenate([b0[k], b1[k]]), g[k])
    assert b0["_keys"] + b1["_keys"] == g["_keys"]
    keys[0].update(b0["_keys"])
    keys[1].update(b1["_keys"])
  assert not keys[0] & keys[1]
  with pytest.raises(ValueError, match="multiple of process_count"):
    pipeline.make_speech_iterator(cfg, examples=ex, batch_multiple=3, process_count=2)


def test_bad_clips_are_replaced_and_counted(tmp_path):
  rows = []
  for i in range(12):
    rows.append((_write(tmp_path / f"ok{i}.wav", 4500 + 100 * i, seed=i), 4500 + 100 * i))
  (tmp_path / "corrupt.wav").write_bytes(b"garbage" * 100)
  rows.append((str(tmp_path / "corrupt.wav"), 5000))
  (tmp_path / "empty.wav").write_bytes(b"")
  rows.append((str(tmp_path / "empty.wav"), 5000))
  rows.append((str(tmp_path / "missing.wav"), 5000))
  nan = np.full((5000,), 0.1, np.float32)
  nan[7] = np.nan
  sf.write(str(tmp_path / "nan.wav"), nan, 16000, subtype="FLOAT")
  rows.append((str(tmp_path / "nan.wav"), 5000))
  rows.append((_write(tmp_path / "silent.wav", 5000, value=0.0), 5000))
  rows.append((_write(tmp_path / "liar.wav", 3000), 5000))  # manifest says 5000, file has 3000
  tsv = _manifest(str(tmp_path), [(os.path.basename(p), n) for p, n in rows])
  cfg = _cfg(tsv, buckets=[2000, 4000], max_sample_size=4000, budget_samples=8000)
  ex, skipped = sources.examples_from_config(cfg, "train")
  assert len(ex) == 18 and skipped == {}
  batches = _epoch(cfg, ex, batch_fn=pipeline.speech_mask_fn(MASK))
  assert len(batches) == 9 and {b["audio"].shape for b in batches} == {(2, 4000)}
  total = {}
  for b in batches:
    assert np.isfinite(b["audio"]).all() and b["mask"].shape == (2, audio_io.num_frames(4000))
    assert all(k.startswith("ok") for k in b["_keys"])
    for reason, n in b["_bad"].items():
      total[reason] = total.get(reason, 0) + n
  for reason in ("unreadable", "empty", "non_finite", "silent", "below_min_size"):
    assert total.get(reason, 0) >= 1, (reason, total)


def test_no_complete_batch_is_refused(corpus):
  cfg = _cfg(corpus, budget_samples=10**9)
  ex, _ = sources.examples_from_config(cfg, "train")
  with pytest.raises(ValueError, match="no complete batch"):
    pipeline.make_speech_iterator(cfg, examples=ex)


def test_state_resume_gives_the_same_next_batches(corpus, tmp_path):
  cfg = _cfg(corpus, num_threads=2)
  ex, _ = sources.examples_from_config(cfg, "train")
  fn = pipeline.speech_mask_fn(MASK)
  n = pipeline.plan_from_config(cfg, ex, 1).total_batches
  it = pipeline.make_speech_iterator(cfg, examples=ex, batch_fn=fn)
  for _ in range(n - 2):
    next(it)
  state = it.get_state()
  # Save through orbax with grain's handler, as the trainer will.
  import orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  mngr.save(1, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  ref = [next(it) for _ in range(4)]  # crosses into the next epoch
  assert ref[2]["_epoch"] == 1 and ref[2]["_index"] == 0
  fresh = pipeline.make_speech_iterator(cfg, examples=ex, batch_fn=fn)
  fresh.set_state(state)
  restored = pipeline.make_speech_iterator(cfg, examples=ex, batch_fn=fn)
  mngr.restore(1, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(restored)))
  for other in (fresh, restored):
    for r, b in zip(ref, [next(other) for _ in range(4)]):
      assert r["_keys"] == b["_keys"]
      np.testing.assert_array_equal(r["audio"], b["audio"])
      np.testing.assert_array_equal(r["mask"], b["mask"])


def test_worker_processes_match_in_process(corpus):
  cfg = _cfg(corpus, mode="pad")
  ex, _ = sources.examples_from_config(cfg, "train")
  fn = pipeline.speech_mask_fn(MASK)
  ref = list(pipeline.make_speech_iterator(cfg, examples=ex, batch_fn=fn, num_epochs=1))
  mp_cfg = _cfg(corpus, mode="pad", num_workers=2, num_threads=1)
  it = pipeline.make_speech_iterator(mp_cfg, examples=ex, batch_fn=fn, num_epochs=1)
  try:
    got = [next(it) for _ in range(5)]
    state = it.get_state()
    rest = list(it)
  finally:
    it.close()
  assert len(got) + len(rest) == len(ref)
  for r, b in zip(ref, got + rest):
    assert r["_keys"] == b["_keys"]
    for k in ("audio", "padding_mask", "mask"):
      np.testing.assert_array_equal(r[k], b[k])
  it2 = pipeline.make_speech_iterator(mp_cfg, examples=ex, batch_fn=fn, num_epochs=1)
  try:
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["audio"], ref[5]["audio"])
  finally:
    it2.close()
