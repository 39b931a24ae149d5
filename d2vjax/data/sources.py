"""Lists speech examples from a fairseq manifest, a folder of audio, the embedded corpus or tfds.

Every source yields ``Example(path, num_samples, transcript, key)`` with ``num_samples`` in 16 kHz
samples. Listing is cheap (headers only); decoding happens in the pipeline's workers through
``load_waveform``, which dispatches on the path scheme (plain file or ``tfds://``).

Configuration errors (a manifest, folder or tfds directory that does not exist) raise
``FileNotFoundError`` naming the path at start; per-example problems are counted by
``filter_examples`` and never raise.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Callable, Iterable, Sequence

from absl import logging
import numpy as np
import soundfile as sf

from d2vjax.data import audio_io
from d2vjax.data.audio_io import RECEPTIVE_FIELD, SAMPLE_RATE

__all__ = ["Example", "UNREADABLE", "AUDIO_EXTS", "read_manifest", "scan_folder",
           "list_audio_files", "filter_examples", "load_waveform", "examples_from_config",
           "SOURCES"]

AUDIO_EXTS = (".flac", ".wav", ".ogg", ".mp3")
# ``num_samples`` marker for files whose header could not be read while listing.
UNREADABLE = -1


@dataclasses.dataclass(frozen=True)
class Example:
  """One utterance.

  Attributes:
    path: audio file path, or a ``tfds://`` URI (see ``tfds_speech.record_uri``).
    num_samples: length in samples at 16 kHz (``UNREADABLE`` if the header could not be read).
    transcript: word-level transcript, or None when the source has none.
    key: stable id (relative path without extension for files).
  """
  path: str
  num_samples: int
  transcript: str | None = None
  key: str = ""


def _require(path, what: str) -> str:
  path = os.fspath(path)
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"{what} not found: {path!r}")
  return path


def read_manifest(tsv_path, *, transcripts_path=None) -> list[Example]:
  """Reads a fairseq manifest (first line: root dir; then ``relpath<TAB>num_samples``).

  A relative root is resolved against the tsv's folder (fairseq resolves it against the working
  directory, which breaks as soon as the job starts elsewhere). ``transcripts_path`` (a fairseq
  ``.wrd`` file) must have one line per manifest row, in order.
  """
  tsv_path = _require(tsv_path, "manifest")
  with open(tsv_path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  if not lines:
    raise ValueError(f"manifest {tsv_path!r} is empty (expected a root line)")
  root = lines[0].strip()
  if not os.path.isabs(root):
    root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(tsv_path)), root))
  rows = []
  for lineno, line in enumerate(lines[1:], start=2):
    if not line.strip():
      continue
    parts = line.split("\t")
    if len(parts) < 2:
      raise ValueError(f"{tsv_path}:{lineno}: expected 'relpath<TAB>num_samples', got {line!r}")
    rows.append((parts[0], int(parts[1])))
  texts: list[str | None] = [None] * len(rows)
  if transcripts_path is not None:
    transcripts_path = _require(transcripts_path, "transcripts file")
    with open(transcripts_path, encoding="utf-8") as f:
      texts = [t.strip() for t in f.read().splitlines()]
    if texts and texts[-1] == "" and len(texts) == len(rows) + 1:
      texts = texts[:-1]
    if len(texts) != len(rows):
      raise ValueError(f"{transcripts_path!r} has {len(texts)} lines but {tsv_path!r} has "
                       f"{len(rows)} rows")
  return [Example(os.path.join(root, rel), n, t, os.path.splitext(rel)[0].replace(os.sep, "/"))
          for (rel, n), t in zip(rows, texts)]


def _read_trans_files(folder: str, names: Iterable[str]) -> dict[str, str]:
  """LibriSpeech ``<spk>-<chapter>.trans.txt``: one ``UTT-ID WORDS…`` line per utterance."""
  out = {}
  for name in names:
    if name.endswith(".trans.txt"):
      with open(os.path.join(folder, name), encoding="utf-8") as f:
        for line in f:
          utt, _, text = line.strip().partition(" ")
          if utt:
            out[utt] = text.strip()
  return out


def list_audio_files(root, exts: Sequence[str] = AUDIO_EXTS) -> list[tuple[str, str, str | None]]:
  """``(path, key, transcript)`` for every audio file under ``root``, sorted by key.

  Transcripts come from LibriSpeech ``*.trans.txt`` files in the same folder (None if absent).
  """
  root = _require(root, "audio folder")
  if not os.path.isdir(root):
    raise NotADirectoryError(f"audio folder is not a directory: {root!r}")
  exts = tuple(e.lower() for e in exts)
  out = []
  for folder, dirs, files in os.walk(root):
    dirs.sort()
    trans = _read_trans_files(folder, files)
    for name in sorted(files):
      stem, ext = os.path.splitext(name)
      if ext.lower() not in exts:
        continue
      rel = os.path.relpath(os.path.join(folder, stem), root).replace(os.sep, "/")
      out.append((os.path.join(folder, name), rel, trans.get(stem)))
  out.sort(key=lambda r: r[1])
  return out


def scan_folder(root, exts: Sequence[str] = AUDIO_EXTS, *,
                target_sr: int = SAMPLE_RATE) -> list[Example]:
  """Lists audio files under ``root`` (recursively) with lengths from their headers.

  Lengths are converted to ``target_sr`` samples when the file's rate differs (same rounding as
  the resampler). Files whose header cannot be read get ``num_samples = UNREADABLE`` so that
  ``filter_examples`` counts them instead of the scan crashing.
  """
  out = []
  for path, key, text in list_audio_files(root, exts):
    try:
      info = sf.info(path)
      n = int(info.frames)
      if int(info.samplerate) != target_sr:
        n = audio_io.resampled_length(n, int(info.samplerate), target_sr)
    except Exception:  # corrupt/empty headers raise assorted libsndfile errors
      n = UNREADABLE
    out.append(Example(path, n, text, key))
  return out


def filter_examples(examples: Iterable[Example], *, min_samples: int,
                    max_samples: int | None = None) -> tuple[list[Example], dict[str, int]]:
  """Drops unusable examples and counts them by reason (never raises).

  Reasons: ``unreadable`` (header unreadable at scan), ``empty`` (0 samples), ``too_short``
  (< 400 samples, the CNN receptive field), ``below_min_size`` (< ``min_samples``, fairseq
  ``min_sample_size``), ``above_max_size`` (> ``max_samples`` when given; fairseq crops instead, so
  the pipeline normally passes None).
  """
  kept, counts = [], collections.Counter()
  for ex in examples:
    n = ex.num_samples
    if n < 0:
      counts["unreadable"] += 1
    elif n == 0:
      counts["empty"] += 1
    elif n < RECEPTIVE_FIELD:
      counts["too_short"] += 1
    elif n < min_samples:
      counts["below_min_size"] += 1
    elif max_samples is not None and n > max_samples:
      counts["above_max_size"] += 1
    else:
      kept.append(ex)
  return kept, dict(counts)


# ---------------------------------------------------------------------------------------------
# Decoding by path scheme.


def _load_tfds(path, **kw):
  from d2vjax.data import tfds_speech  # Lazy: tfds import costs ~0.5 s.
  return tfds_speech.load_record(path, **kw)


_LOADERS: dict[str, Callable[..., np.ndarray]] = {
    "file": audio_io.load_audio,
    "tfds": _load_tfds,
}


def load_waveform(path: str, *, target_sr: int = SAMPLE_RATE, min_samples: int | None = None,
                  max_samples: int | None = None, rng: np.random.Generator | None = None
                  ) -> np.ndarray:
  """Decodes an ``Example.path`` (file or ``tfds://`` URI) to validated float32 ``[S]``.

  Raises ``audio_io.BadAudioError`` for unusable clips (see ``audio_io.load_audio``).
  """
  scheme = path.split("://", 1)[0] if "://" in path else "file"
  return _LOADERS[scheme](path, target_sr=target_sr, min_samples=min_samples,
                          max_samples=max_samples, rng=rng)


# ---------------------------------------------------------------------------------------------
# Config dispatch.


def _get(cfg, name: str, default=None):
  if isinstance(cfg, dict):
    return cfg.get(name, default)
  try:
    return getattr(cfg, name)
  except (AttributeError, KeyError):  # ml_collections raises AttributeError for missing fields
    return default


def _split_name(cfg, split: str) -> str:
  """Logical ``train``/``valid`` → the configured split (``train_split``/``valid_split``)."""
  if split in ("train", "valid"):
    name = _get(cfg, f"{split}_split")
    return split if name is None else name
  return split


def _with_transcripts(tsv: str) -> list[Example]:
  # fairseq keeps word transcripts beside the manifest as <split>.wrd.
  wrd = os.path.splitext(tsv)[0] + ".wrd"
  return read_manifest(tsv, transcripts_path=wrd if os.path.exists(wrd) else None)


def _from_manifest(cfg, split: str) -> list[Example]:
  field = "valid_manifest" if split == "valid" else "manifest"
  tsv = _get(cfg, field) if split in ("train", "valid") else split
  if not tsv:
    raise FileNotFoundError(f"data.{field} is not set (source='manifest', split={split!r})")
  return _with_transcripts(tsv)


def _from_embedded(cfg, split: str) -> list[Example]:
  from d2vjax.data import embedded  # Lazy: written separately; only this source needs it.
  return _with_transcripts(embedded.speech_manifest(split))


def _from_folder(cfg, split: str) -> list[Example]:
  root = _get(cfg, "folder")
  if not root:
    raise FileNotFoundError("data.folder is not set (source='folder')")
  _require(root, "data.folder")
  # ``<split>_split`` names a subfolder (e.g. LibriSpeech ``train-clean-100``); empty = the root.
  sub = _get(cfg, f"{split}_split") if split in ("train", "valid") else split
  if sub:
    root = _require(os.path.join(root, sub), f"folder for split {split!r}")
  return scan_folder(root)


def _from_tfds(cfg, split: str) -> list[Example]:
  from d2vjax.data import tfds_speech
  return tfds_speech.list_examples(_get(cfg, "tfds_name") or tfds_speech.NAME,
                                   _split_name(cfg, split), _get(cfg, "tfds_data_dir"))


SOURCES: dict[str, Callable[[object, str], list[Example]]] = {
    "embedded": _from_embedded,
    "manifest": _from_manifest,
    "folder": _from_folder,
    "tfds": _from_tfds,
}


def examples_from_config(data_cfg, split: str = "train") -> tuple[list[Example], dict[str, int]]:
  """Lists and filters the examples of ``split`` (``train``/``valid``) from ``data_cfg.source``.

  Returns ``(examples, skipped_counts)``; ``min_sample_size`` is applied here (fairseq drops
  shorter utterances), ``max_sample_size`` is not (long clips are cropped, as in fairseq).
  """
  source = _get(data_cfg, "source", "manifest")
  if source not in SOURCES:
    raise ValueError(f"unknown data.source {source!r}; expected one of {sorted(SOURCES)}")
  examples = SOURCES[source](data_cfg, split)
  min_samples = int(_get(data_cfg, "min_sample_size", 0) or 0)
  kept, skipped = filter_examples(examples, min_samples=min_samples)
  logging.info("data %s/%s: %d examples kept, skipped %s", source, split, len(kept), skipped)
  return kept, skipped
