"""TF-free tfds builder: prepare a tiny LibriSpeech tree, read it back with tfds.data_source."""

import os
import sys

import numpy as np
import pytest
import soundfile as sf
import tensorflow_datasets as tfds

from d2vjax.data import pipeline, sources, tfds_speech


def _clip(n, seed):
  rng = np.random.default_rng(seed)
  return np.round(3000 * rng.standard_normal(n)).clip(-32768, 32767).astype(np.int16)


def _librispeech(root):
  """2 subsets x 2 chapters x 2 utterances of int16 FLAC + trans.txt, and one corrupt file."""
  clips = {}
  for sub in ("train-clean-100", "dev-clean"):
    for spk, ch in ((84, 121123), (174, 50561)):
      d = os.path.join(root, sub, str(spk), str(ch))
      os.makedirs(d)
      lines = []
      for u in range(2):
        uid = f"{spk}-{ch}-{u:04d}"
        x = _clip(3000 + 500 * u + spk, seed=len(clips))
        sf.write(os.path.join(d, uid + ".flac"), x, 16000, subtype="PCM_16")
        clips[f"{sub}/{spk}/{ch}/{uid}"] = (x, f"{sub.upper()} WORDS {uid}")
        lines.append(f"{uid} {sub.upper()} WORDS {uid}")
      with open(os.path.join(d, f"{spk}-{ch}.trans.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
  with open(os.path.join(root, "dev-clean", "84", "121123", "84-121123-0009.flac"), "wb") as f:
    f.write(b"definitely not flac" * 50)
  return clips


def test_prepare_and_read_back_without_tensorflow(tmp_path):
  tfds.disable_progress_bar()
  manual, data_dir = str(tmp_path / "LibriSpeech"), str(tmp_path / "tfds")
  clips = _librispeech(manual)
  out = tfds_speech.prepare(manual, data_dir,
                            split_dirs={"train": ["train-clean-100"], "valid": "dev-clean"})
  assert out["splits"] == {"train": 4, "valid": 4} and out["bad"] == {"unreadable": 1}
  for split in ("train", "valid"):
    ds = tfds.data_source(tfds_speech.NAME, data_dir=data_dir, split=split)
    assert len(ds) == 4
    for i in range(len(ds)):
      rec = ds[i]
      key = rec["id"].decode()
      x, text = clips[key]
      assert key.startswith("train" if split == "train" else "dev")
      assert rec["transcript"].decode() == text and rec["num_samples"] == x.size
      np.testing.assert_array_equal(rec["audio"], x)  # int16 FLAC round-trips losslessly
  ex = tfds_speech.list_examples(tfds_speech.NAME, "valid", data_dir)
  assert sorted(e.key for e in ex) == sorted(k for k in clips if k.startswith("dev"))
  e = ex[0]
  np.testing.assert_array_equal(sources.load_waveform(e.path), clips[e.key][0] / 32768.0)
  assert e.transcript == clips[e.key][1]
  # Through the pipeline's config dispatch, in pad mode (fine-tuning).
  cfg = dict(source="tfds", tfds_name=tfds_speech.NAME, tfds_data_dir=data_dir,
             train_split="train", min_sample_size=2000, max_sample_size=4000,
             buckets=[2000, 4000], mode="pad", budget_samples=8000, num_threads=0, seed=0)
  ex, skipped = sources.examples_from_config(cfg, "train")
  assert len(ex) == 4 and skipped == {}
  batches = list(pipeline.make_speech_iterator(cfg, examples=ex, num_epochs=1))
  assert batches and all(b["audio"].shape == (2, 4000) and b["_bad"] == {} for b in batches)
  assert all(t.startswith("TRAIN-CLEAN-100 WORDS") for b in batches for t in b["_transcripts"])
  assert "tensorflow" not in sys.modules


def test_hash_split_folder_and_resampling(tmp_path):
  tfds.disable_progress_bar()
  manual, data_dir = tmp_path / "clips", str(tmp_path / "tfds")
  manual.mkdir()
  for i in range(12):
    sf.write(str(manual / f"c{i:02d}.wav"), _clip(4410, i).reshape(-1, 1).repeat(2, 1), 44100)
  out = tfds_speech.prepare(str(manual), data_dir, valid_fraction=0.25)
  assert sum(out["splits"].values()) == 12 and set(out["splits"]) <= {"train", "valid"}
  valid_keys = {f"c{i:02d}" for i in range(12) if tfds_speech._hash_unit(f"c{i:02d}") < 0.25}
  got = {e.key for e in tfds_speech.list_examples(split="valid", data_dir=data_dir)} if valid_keys \
      else set()
  assert got == valid_keys
  ex = tfds_speech.list_examples(split="train", data_dir=data_dir)
  assert all(e.num_samples == 1600 and e.transcript == "" for e in ex)  # 44.1 kHz → 16 kHz


def test_missing_or_unprepared_dataset_raises_with_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    tfds_speech.list_examples(split="train", data_dir=str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    tfds_speech.list_examples(split="train", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="missing"):
    tfds_speech.prepare(str(tmp_path / "missing"), str(tmp_path / "out"))
