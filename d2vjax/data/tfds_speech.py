"""A TensorFlow-free tfds builder for a folder of speech (LibriSpeech layout or any audio tree).

Prepare once, offline (user-needs D1: preprocessing is a separate step, not done by every host)::

  from d2vjax.data import tfds_speech
  tfds_speech.prepare("/data/LibriSpeech", "/data/tfds",
                      split_dirs={"train": ["train-clean-100"], "valid": ["dev-clean"]})

then read with random access and no TensorFlow::

  ds = tfds.data_source("d2v_speech_folder", data_dir="/data/tfds", split="train")
  ds[0]  # {'audio': int16[S], 'num_samples': int, 'transcript': bytes, 'id': bytes}

Records are written in the ``array_record`` file format. Features:
  audio        int16 ``[S]`` at 16 kHz, zlib-compressed ``tfds.features.Tensor``. Not
               ``tfds.features.Audio``: its constructor calls ``tf.dtypes`` and fails without TF.
               int16 halves the size of float32 and is lossless for 16-bit sources (LibriSpeech);
               resampled clips are quantised to 16 bits. Read back as ``audio / 32768``.
  num_samples  int64, samples at 16 kHz.
  transcript   text (LibriSpeech ``*.trans.txt`` words, '' when the folder has none).
  id           text, the relative path without extension (unique across the tree).

What works without TF (tfds 4.9.10): ``GeneratorBasedBuilder.download_and_prepare`` with
``file_format='array_record'``, ``tfds.data_source`` (also with
``decoders={'audio': tfds.decode.SkipDecoding()}``, used to list lengths without inflating audio),
``tfds.builder(name, data_dir=...)``. What does not: ``tfds.features.Audio``;
``dataset_info_from_configs`` outside a tfds dataset package (``tfds.core.DatasetInfo(builder=self,
...)`` is used instead); ``DeserializeMethod.DESERIALIZE_NO_DECODE``; anything returning a
``tf.data.Dataset`` (``tfds.load``, ``as_dataset``). tfds' default ``code_path`` also needs the
``importlib_resources`` backport for builders defined inside a package; it is overridden here.
"""

from __future__ import annotations

import collections
import hashlib
import inspect
import json
import os
import threading
import urllib.parse
from typing import Mapping, Sequence

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from d2vjax.data import audio_io, sources
from d2vjax.data.audio_io import SAMPLE_RATE

__all__ = ["NAME", "D2vSpeechFolder", "prepare", "list_examples", "load_record", "record_uri"]

NAME = "d2v_speech_folder"
_INDEX_DIR = "d2vjax_index"  # per-split length/transcript index written beside the records


def _hash_unit(key: str) -> float:
  """A stable number in [0, 1) from a key (md5, so it does not depend on PYTHONHASHSEED)."""
  return int(hashlib.md5(key.encode("utf-8")).hexdigest()[:8], 16) / 2.0**32


def _to_int16(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


class D2vSpeechFolder(tfds.core.GeneratorBasedBuilder):
  """Speech clips from ``manual_dir``, decoded with ``audio_io.load_audio`` at 16 kHz.

  Builder arguments (beyond tfds' ``data_dir``/``file_format``/...):
    split_dirs: ``{split: [subfolder, ...]}`` relative to ``manual_dir`` (a str is one folder),
      e.g. ``{"train": ["train-clean-100", "train-clean-360"], "valid": ["dev-clean"]}``. Split
      names must be identifiers (tfds rejects ``-``). None: every file under ``manual_dir``, split
      into ``train``/``valid`` by a hash of its id (``valid_fraction`` of the ids go to valid).
    valid_fraction: share of ids in the hash ``valid`` split.
    exts: audio file extensions to include.

  Bad clips (unreadable, empty, silent, NaN, < 400 samples) are skipped and counted in
  ``bad_counts``.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "int16 audio at 16 kHz, array_record, TF-free."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Point manual_dir at a LibriSpeech-style tree (<spk>/<chapter>/<spk>-<chapter>-<utt>.flac "
      "with <spk>-<chapter>.trans.txt) or any folder of .flac/.wav/.ogg/.mp3 files.")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds' default probes ``importlib_resources.abc`` (an optional backport that is not installed
    # here) whenever a builder lives inside a package; the plain file path is all it needs.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, split_dirs: Mapping[str, str | Sequence[str]] | None = None,
               valid_fraction: float = 0.05, exts: Sequence[str] = sources.AUDIO_EXTS, **kwargs):
    self._split_dirs = split_dirs
    self._valid_fraction = float(valid_fraction)
    self._exts = tuple(exts)
    self.bad_counts: collections.Counter = collections.Counter()
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Speech clips at 16 kHz (int16) with transcripts, for d2vjax.",
        features=tfds.features.FeaturesDict({
            "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16,
                                          encoding=tfds.features.Encoding.ZLIB),
            "num_samples": np.int64,
            "transcript": tfds.features.Text(),
            "id": tfds.features.Text(),
        }),
        # Keep generation order (sorted ids) so record i is predictable and the index matches.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(sample_rate=SAMPLE_RATE),
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    if self._split_dirs is None:
      files = sources.list_audio_files(root, self._exts)
      by_split = collections.defaultdict(list)
      for row in files:
        by_split["valid" if _hash_unit(row[1]) < self._valid_fraction else "train"].append(row)
      return {name: self._generate_examples(rows) for name, rows in sorted(by_split.items())}
    gens = {}
    for name, dirs in self._split_dirs.items():
      dirs = [dirs] if isinstance(dirs, str) else list(dirs)
      rows = []
      for d in dirs:
        sub = os.path.join(root, d)
        rows += [(p, f"{d}/{k}", t) for p, k, t in sources.list_audio_files(sub, self._exts)]
      gens[name] = self._generate_examples(rows)
    return gens

  def _generate_examples(self, rows):
    for path, key, text in rows:
      try:
        x = audio_io.load_audio(path, target_sr=SAMPLE_RATE)
      except audio_io.BadAudioError as e:
        self.bad_counts[e.reason] += 1
        logging.warning("d2v_speech_folder: skipping %s", e)
        continue
      yield key, {"audio": _to_int16(x), "num_samples": int(x.size),
                  "transcript": text or "", "id": key}


def prepare(manual_dir, data_dir, *, split_dirs=None, valid_fraction: float = 0.05,
            exts: Sequence[str] = sources.AUDIO_EXTS) -> dict:
  """Builds the array_record dataset from ``manual_dir`` into ``data_dir`` (no TensorFlow).

  Also writes a per-split index (lengths, ids, transcripts) so that ``list_examples`` does not have
  to read every record at start-up. Re-running with an existing dataset reuses it.

  Returns:
    ``{"dir": dataset version dir, "splits": {name: num_examples}, "bad": {reason: count}}``.
  """
  manual_dir = sources._require(manual_dir, "manual_dir")
  builder = D2vSpeechFolder(data_dir=os.fspath(data_dir), file_format="array_record",
                            split_dirs=split_dirs, valid_fraction=valid_fraction, exts=exts)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  splits = {}
  for name in builder.info.splits:
    splits[name] = len(_write_index(builder, name, os.fspath(data_dir)))
  return {"dir": os.fspath(builder.data_dir), "splits": splits, "bad": dict(builder.bad_counts)}


def _index_path(builder, split: str) -> str:
  return os.path.join(os.fspath(builder.data_dir), _INDEX_DIR, f"{split}.json")


def _scan_records(name: str, split: str, data_dir) -> dict:
  # SkipDecoding leaves the audio compressed: listing costs a read, not an inflate.
  ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                        decoders={"audio": tfds.decode.SkipDecoding()})
  index = {"num_samples": [], "id": [], "transcript": []}
  for i in range(len(ds)):
    rec = ds[i]
    index["num_samples"].append(int(rec["num_samples"]))
    index["id"].append(_text(rec["id"]))
    index["transcript"].append(_text(rec["transcript"]))
  return index


def _write_index(builder, split: str, data_dir) -> list[int]:
  index = _scan_records(builder.name, split, data_dir)
  path = _index_path(builder, split)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(index, f)
  return index["num_samples"]


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def record_uri(name: str, split: str, index: int, data_dir=None) -> str:
  """``tfds://<name>?split=…&index=…&data_dir=…``: an ``Example.path`` for a tfds record."""
  q = {"split": split, "index": int(index)}
  if data_dir:
    q["data_dir"] = os.fspath(data_dir)
  return f"tfds://{name}?{urllib.parse.urlencode(q)}"


def list_examples(name: str = NAME, split: str = "train", data_dir=None) -> list[sources.Example]:
  """Examples of a prepared tfds speech dataset, each addressed by a ``tfds://`` URI.

  Uses the index written by ``prepare`` when present, else reads every record once.

  Raises:
    FileNotFoundError: ``data_dir`` or the prepared dataset/split is missing (path in message).
  """
  if data_dir:
    sources._require(data_dir, "tfds data_dir")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:
    raise FileNotFoundError(f"tfds dataset {name!r} not found in data_dir {data_dir!r}: {e}") from e
  if not builder.is_prepared():
    raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in "
                            f"{os.fspath(builder.data_dir)!r} (run tfds_speech.prepare first)")
  if split not in builder.info.splits:
    raise FileNotFoundError(f"split {split!r} not in {os.fspath(builder.data_dir)!r}; "
                            f"available: {sorted(builder.info.splits)}")
  path = _index_path(builder, split)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      index = json.load(f)
  else:
    logging.info("tfds %s/%s: no index at %s, reading every record once", name, split, path)
    index = _scan_records(name, split, data_dir)
  return [sources.Example(record_uri(name, split, i, data_dir), n, t, k) for i, (n, t, k)
          in enumerate(zip(index["num_samples"], index["transcript"], index["id"]))]


_SOURCES: dict = {}
_SOURCES_LOCK = threading.Lock()


def _data_source(name: str, split: str, data_dir):
  # One open data source per (process, dataset, split): grain workers each open their own.
  key = (name, split, data_dir, os.getpid())
  with _SOURCES_LOCK:
    if key not in _SOURCES:
      _SOURCES[key] = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    return _SOURCES[key]


def load_record(uri: str, *, target_sr: int = SAMPLE_RATE, min_samples: int | None = None,
                max_samples: int | None = None, rng: np.random.Generator | None = None
                ) -> np.ndarray:
  """Decodes the record behind a ``tfds://`` URI to validated float32 ``[S]`` at ``target_sr``.

  Same contract as ``audio_io.load_audio`` (raises ``BadAudioError``).
  """
  parsed = urllib.parse.urlsplit(uri)
  q = dict(urllib.parse.parse_qsl(parsed.query))
  try:
    rec = _data_source(parsed.netloc, q["split"], q.get("data_dir"))[int(q["index"])]
  except Exception as e:
    raise audio_io.BadAudioError(uri, "unreadable", str(e)) from None
  x = np.asarray(rec["audio"], np.float32) / 32768.0
  if target_sr != SAMPLE_RATE and x.size:
    x = audio_io._resample(x, SAMPLE_RATE, target_sr)
  x = audio_io.validate_waveform(x, uri, min_samples=min_samples)
  if max_samples is not None and x.size > max_samples:
    off = 0 if rng is None else int(rng.integers(0, x.size - max_samples + 1))
    x = np.ascontiguousarray(x[off:off + max_samples])
  return x
