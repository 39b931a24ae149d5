"""A TensorFlow-free tfds builder for ImageNet (ILSVRC2012) from a local copy.

Prepare once, offline (user-needs D1: preprocessing is a separate step, not done by every host)::

  from d2vjax.data import tfds_imagenet
  tfds_imagenet.prepare("/data/ILSVRC2012", "/data/tfds")

then train with ``--config.data.source=tfds --config.data.tfds_data_dir=/data/tfds`` (records are
read with random access through ``tfds.data_source``, no TensorFlow)::

  ds = tfds.data_source("d2v_imagenet2012", data_dir="/data/tfds", split="train")
  ds[0]  # {'image': uint8[num_bytes] (the JPEG file), 'label': int, 'wnid': bytes, 'id': bytes}

``manual_dir`` layout (ILSVRC2012 as distributed, or after the usual ``valprep.sh``)::

  train/<wnid>/<wnid>_<n>.JPEG                          1000 class folders
  val/<wnid>/ILSVRC2012_val_<n>.JPEG                    class folders, or
  val/ILSVRC2012_val_<n>.JPEG + a labels file           flat, labels from one of:
      LOC_val_solution.csv              Kaggle: ``ImageId,PredictionString`` (first token = wnid)
      <file> with ``<name> <wnid>``     one image per line (space or comma separated)
      imagenet2012_validation_labels.txt   one wnid per line, in sorted file-name order (tfds)

Features (array_record, ``disable_shuffling`` so record i is the i-th file in sorted order):
  image  uint8 ``[num_bytes]``: the original file, not re-encoded (lossless, and decoding stays in
         the pipeline's workers). Not ``tfds.features.Image``: it needs TensorFlow to encode.
  label  int64: index of the wnid among the sorted training wnids (the standard ImageNet class
         order), -1 when unknown.
  wnid   text, ``id`` text (the file name without extension).

Files that PIL cannot identify, or with a side under ``min_size`` pixels, are skipped at prepare
time and counted (``bad_counts``); decoding errors that only show in the full decode (truncated
JPEGs) are skipped and counted by the training pipeline.
"""

from __future__ import annotations

import collections
import inspect
import json
import os
import threading
import urllib.parse
from collections.abc import Sequence

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from d2vjax.data import image as image_lib

__all__ = ["NAME", "D2vImagenet2012", "prepare", "list_examples", "TfdsImageExamples",
           "load_record_bytes", "record_uri", "read_val_labels"]

NAME = "d2v_imagenet2012"
SPLIT_DIRS = {"train": "train", "val": "val"}
_INDEX_DIR = "d2vjax_index"  # per-split label/id index written beside the records
_LABEL_FILES = ("LOC_val_solution.csv", "imagenet2012_validation_labels.txt", "val_labels.txt")


def read_val_labels(path: str, file_names: Sequence[str]) -> dict[str, str]:
  """``{file stem: wnid}`` from a validation labels file (formats in the module docstring).

  ``file_names``: the flat validation files (for the one-wnid-per-line format, which lists the
  labels in sorted file-name order).
  """
  with open(path, encoding="utf-8") as f:
    lines = [l.strip() for l in f if l.strip()]
  if lines and lines[0].lower().startswith("imageid"):
    lines = lines[1:]  # Kaggle CSV header
  rows = [l.replace(",", " ").split() for l in lines]
  stems = sorted(os.path.splitext(n)[0] for n in file_names)
  if rows and all(len(r) == 1 for r in rows):
    if len(rows) != len(stems):
      raise ValueError(f"{path}: {len(rows)} labels for {len(stems)} validation images")
    return {s: r[0] for s, r in zip(stems, rows)}
  return {os.path.splitext(r[0])[0]: r[1] for r in rows}


class D2vImagenet2012(tfds.core.GeneratorBasedBuilder):
  """ILSVRC2012 images from ``manual_dir`` (layout in the module docstring).

  Builder arguments (beyond tfds' ``data_dir``/``file_format``/...):
    val_labels: labels file for a flat ``val/`` folder (absolute, or relative to manual_dir);
      None: class subfolders, or one of ``LOC_val_solution.csv``,
      ``imagenet2012_validation_labels.txt``, ``val_labels.txt`` found in manual_dir.
    min_size: smallest accepted image side in pixels.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "original encoded files, array_record, TF-free."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Point manual_dir at ILSVRC2012 with train/<wnid>/*.JPEG and val/ (class subfolders, or "
      "flat files plus LOC_val_solution.csv or another labels file).")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds' default probes ``importlib_resources.abc`` (an optional backport that is not installed
    # here) whenever a builder lives inside a package; the plain file path is all it needs.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, val_labels: str | None = None, min_size: int = 16, **kwargs):
    self._val_labels = val_labels
    self._min_size = int(min_size)
    self.bad_counts: collections.Counter = collections.Counter()
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="ILSVRC2012 images (original encoded files) with class labels, for d2vjax.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
            "label": np.int64,
            "wnid": tfds.features.Text(),
            "id": tfds.features.Text(),
        }),
        disable_shuffling=True,
    )

  def _rows(self, root: str, split_dir: str, classes: dict[str, int]):
    """``(path, id, wnid, label)`` of a split folder, sorted by file name."""
    folder = os.path.join(root, split_dir)
    files = image_lib.list_image_files(folder)
    flat = [p for p, k in files if "/" not in k]
    labels: dict[str, str] = {}
    if flat:
      path = self._val_labels
      if path is None:
        path = next((os.path.join(root, n) for n in _LABEL_FILES
                     if os.path.exists(os.path.join(root, n))), None)
      elif not os.path.isabs(path):
        path = os.path.join(root, path)
      if path is not None:
        labels = read_val_labels(path, [os.path.basename(p) for p in flat])
    rows = []
    for p, key in files:
      stem = key.rsplit("/", 1)[-1]
      wnid = key.split("/", 1)[0] if "/" in key else labels.get(stem, "")
      rows.append((p, stem, wnid, classes.get(wnid, -1)))
    rows.sort(key=lambda r: r[1])
    return rows

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    present = {s: d for s, d in SPLIT_DIRS.items() if os.path.isdir(os.path.join(root, d))}
    if not present:
      raise FileNotFoundError(f"no {sorted(SPLIT_DIRS.values())} folder in {root!r}")
    # Class order: sorted training wnids (ImageNet's standard indices); val's when train is absent.
    src = os.path.join(root, present.get("train", present.get("val")))
    wnids = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    classes = {w: i for i, w in enumerate(wnids)}
    return {s: self._generate_examples(self._rows(root, d, classes)) for s, d in present.items()}

  def _generate_examples(self, rows):
    for path, stem, wnid, label in rows:
      try:
        with Image.open(path) as im:  # header only: cheap enough for 1.28M files
          w, h = im.size
      except Exception as e:  # not an image / unreadable header
        self.bad_counts["undecodable"] += 1
        logging.warning("d2v_imagenet2012: skipping %s (%s)", path, e)
        continue
      if min(w, h) < self._min_size:
        self.bad_counts["too_small"] += 1
        logging.warning("d2v_imagenet2012: skipping %s (%d×%d px)", path, w, h)
        continue
      with open(path, "rb") as f:
        data = np.frombuffer(f.read(), np.uint8)
      yield stem, {"image": data, "label": int(label), "wnid": wnid, "id": stem}


def _index_path(builder, split: str) -> str:
  return os.path.join(os.fspath(builder.data_dir), _INDEX_DIR, f"{split}.json")


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _scan_records(name: str, split: str, data_dir) -> dict:
  # SkipDecoding: listing reads labels and ids, never copies the image bytes into arrays.
  ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                        decoders={"image": tfds.decode.SkipDecoding()})
  index = {"label": [], "id": []}
  for i in range(len(ds)):
    rec = ds[i]
    index["label"].append(int(rec["label"]))
    index["id"].append(_text(rec["id"]))
  return index


def prepare(manual_dir, data_dir, *, val_labels: str | None = None, min_size: int = 16) -> dict:
  """Builds the array_record dataset from ``manual_dir`` into ``data_dir`` (no TensorFlow), and
  a per-split label/id index so ``list_examples`` needs no record scan. Re-running reuses an
  existing dataset.

  Returns:
    ``{"dir": dataset version dir, "splits": {name: num_examples}, "bad": {reason: count}}``.
  """
  manual_dir = image_lib._require(manual_dir, "manual_dir")
  builder = D2vImagenet2012(data_dir=os.fspath(data_dir), file_format="array_record",
                            val_labels=val_labels, min_size=min_size)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  splits = {}
  for name in builder.info.splits:
    index = _scan_records(builder.name, name, os.fspath(data_dir))
    path = _index_path(builder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(index, f)
    splits[name] = len(index["id"])
  return {"dir": os.fspath(builder.data_dir), "splits": splits, "bad": dict(builder.bad_counts)}


def record_uri(name: str, split: str, index: int, data_dir=None) -> str:
  """``tfds://<name>?split=…&index=…&data_dir=…``: an ``ImageExample.path`` for a record."""
  q = {"split": split, "index": int(index)}
  if data_dir:
    q["data_dir"] = os.fspath(data_dir)
  return f"tfds://{name}?{urllib.parse.urlencode(q)}"


class TfdsImageExamples(Sequence):
  """The examples of a prepared split as a lazy sequence of ``ImageExample`` (1.28M dataclass
  objects would cost ~0.5 GB per process and per grain worker); pickles small."""

  def __init__(self, name: str, split: str, data_dir, labels: Sequence[int], ids: Sequence[str]):
    self.name, self.split = name, split
    self.data_dir = None if data_dir is None else os.fspath(data_dir)
    self.labels = np.asarray(labels, np.int64)
    self.ids = list(ids)

  def __len__(self) -> int:
    return len(self.ids)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[k] for k in range(*i.indices(len(self)))]
    i = int(i)
    if i < 0:
      i += len(self)
    return image_lib.ImageExample(record_uri(self.name, self.split, i, self.data_dir),
                                  self.ids[i], int(self.labels[i]))


def list_examples(name: str = NAME, split: str = "train", data_dir=None) -> TfdsImageExamples:
  """The examples of a prepared split, each addressed by a ``tfds://`` URI.

  Uses the index written by ``prepare`` when present, else reads every record's label once.

  Raises:
    FileNotFoundError: ``data_dir`` or the prepared dataset/split is missing (path in message).
  """
  if data_dir:
    image_lib._require(data_dir, "tfds data_dir")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:
    raise FileNotFoundError(f"tfds dataset {name!r} not found in data_dir {data_dir!r}: {e}") from e
  if not builder.is_prepared():
    raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in "
                            f"{os.fspath(builder.data_dir)!r} (run tfds_imagenet.prepare first)")
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
  return TfdsImageExamples(name, split, data_dir, index["label"], index["id"])


_SOURCES: dict = {}
_SOURCES_LOCK = threading.Lock()


def _data_source(name: str, split: str, data_dir):
  # One open data source per (process, dataset, split): grain workers each open their own.
  key = (name, split, data_dir, os.getpid())
  with _SOURCES_LOCK:
    if key not in _SOURCES:
      _SOURCES[key] = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    return _SOURCES[key]


def load_record_bytes(uri: str) -> bytes:
  """The encoded image file stored in the record behind a ``tfds://`` URI."""
  parsed = urllib.parse.urlsplit(uri)
  q = dict(urllib.parse.parse_qsl(parsed.query))
  rec = _data_source(parsed.netloc, q["split"], q.get("data_dir"))[int(q["index"])]
  return np.asarray(rec["image"], np.uint8).tobytes()
