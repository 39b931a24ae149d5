"""The embedded speech corpus: layout, sizes, audio sanity and transcript consistency."""

from __future__ import annotations

import functools
import os
import re

import numpy as np
import pytest
import soundfile as sf

from d2vjax.data import embedded

SR = 16000
MIN_SAMPLES = 2 * SR  # pre-training drops clips shorter than 2 s


def _rows(split: str) -> tuple[str, list[tuple[str, int]]]:
  with open(embedded.speech_manifest(split)) as f:
    lines = f.read().splitlines()
  rows = []
  for line in lines[1:]:
    rel, n = line.split("\t")
    rows.append((rel, int(n)))
  return lines[0], rows


@functools.lru_cache(maxsize=None)
def _decoded(split: str) -> list[tuple[str, int, np.ndarray, int]]:
  """(relative path, tsv num_samples, decoded audio [T, C], sample rate) per manifest row."""
  root, rows = _rows(split)
  base = os.path.join(os.path.dirname(embedded.speech_manifest(split)), root)
  out = []
  for rel, n in rows:
    x, sr = sf.read(os.path.join(base, rel), dtype="float32", always_2d=True)
    out.append((rel, n, x, sr))
  return out


def test_speech_dir_layout():
  assert embedded.SPEECH_DIR.is_dir()
  for split in ("train", "valid"):
    for ext in ("tsv", "wrd", "ltr"):
      assert (embedded.SPEECH_DIR / f"{split}.{ext}").is_file()
    assert (embedded.SPEECH_DIR / split).is_dir()
    assert embedded.speech_manifest(split) == str(embedded.SPEECH_DIR / f"{split}.tsv")
  assert (embedded.SPEECH_DIR / "voices.tsv").is_file()
  assert (embedded.SPEECH_DIR.parent / "PROVENANCE.md").is_file()


def test_unknown_split_raises_naming_valid_splits():
  with pytest.raises(ValueError, match="train.*valid"):
    embedded.speech_manifest("test")
  with pytest.raises(ValueError, match="train.*valid"):
    embedded.speech_transcripts("dev")


def test_manifest_format():
  for split in ("train", "valid"):
    root, rows = _rows(split)
    assert root == "."
    assert rows
    for rel, n in rows:
      assert re.fullmatch(rf"{split}/\d{{4}}\.ogg", rel), rel
      assert n > 0
    assert len({rel for rel, _ in rows}) == len(rows)
  # Every audio file on disk is listed.
  for split in ("train", "valid"):
    on_disk = sorted(f"{split}/{p.name}" for p in (embedded.SPEECH_DIR / split).glob("*.ogg"))
    assert on_disk == sorted(rel for rel, _ in _rows(split)[1])


def test_counts_and_total_duration():
  n_train, n_valid = len(_decoded("train")), len(_decoded("valid"))
  assert n_train + n_valid >= 200
  assert n_valid >= 20
  total = sum(x.shape[0] for split in ("train", "valid") for _, _, x, _ in _decoded(split))
  assert total / SR >= 480.0, total / SR


def test_audio_is_sane_and_lengths_match_manifest():
  for split in ("train", "valid"):
    for rel, n, x, sr in _decoded(split):
      assert sr == SR, rel
      assert x.shape[1] == 1, rel
      assert x.shape[0] == n, (rel, x.shape[0], n)
      assert n >= MIN_SAMPLES, (rel, n)
      assert np.all(np.isfinite(x)), rel
      rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
      assert rms > 1e-3, (rel, rms)
      assert float(np.abs(x).max()) <= 1.0, rel


def test_transcripts():
  for split in ("train", "valid"):
    wrd = embedded.speech_transcripts(split)
    assert len(wrd) == len(_rows(split)[1])
    for line in wrd:
      assert re.fullmatch(r"[A-Z' ]+", line), line
      assert line == " ".join(line.split()), line  # single spaces, no padding
    assert len(set(wrd)) == len(wrd)


def test_letters_consistent_with_words():
  for split in ("train", "valid"):
    wrd = embedded.speech_transcripts(split)
    ltr = embedded.speech_letters(split)
    assert len(ltr) == len(wrd)
    for w, l in zip(wrd, ltr):
      assert l == " ".join(w.replace(" ", "|")) + " |", (w, l)
      assert l.replace(" ", "").replace("|", " ").strip() == w


def test_splits_disjoint():
  train, valid = embedded.speech_transcripts("train"), embedded.speech_transcripts("valid")
  assert not set(train) & set(valid)
  ids = lambda s: {os.path.basename(rel) for rel, _ in _rows(s)[1]}  # noqa: E731
  assert not ids("train") & ids("valid")


def test_voices():
  with open(embedded.SPEECH_DIR / "voices.tsv") as f:
    header, *lines = f.read().splitlines()
  assert header.split("\t")[:4] == ["id", "voice", "speed", "pitch"]
  rows = [line.split("\t") for line in lines]
  expected_ids = {os.path.splitext(os.path.basename(rel))[0]
                  for s in ("train", "valid") for rel, _ in _rows(s)[1]}
  assert {r[0] for r in rows} == expected_ids
  assert len({r[1] for r in rows}) >= 8
  for r in rows:
    assert 80 <= int(r[2]) <= 450 and 0 <= int(r[3]) <= 99, r
