"""Host-side image data for data2vec vision pre-training: decoding, BEiT augmentation, sources,
BEiT masks and a resumable grain pipeline. Pure NumPy/PIL; JAX never runs here (user-needs B3).

Config fields read from ``data_cfg`` (ConfigDict, dict or attribute object)::

  source          'embedded' | 'folder' | 'tfds'                       (see ``SOURCES``)
  folder          root of an image tree; first-level subfolders are classes   [folder]
  tfds_name       tfds builder name, default 'd2v_imagenet2012'                 [tfds]
  tfds_data_dir   tfds data_dir                                                 [tfds]
  train_split     split name / subfolder for 'train' ('' = folder root)   [folder, tfds]
  valid_split     split name / subfolder for 'valid'                      [folder, tfds]
  image_size      S: square output side in pixels (224 in the recipe)
  patch_size      model patch side (only to check that S is a multiple of it)
  batch_size      images per GLOBAL batch (16 GPUs × 128 = 2048 in the recipe)
  crop_scale      RandomResizedCrop area range (0.08, 1.0)
  crop_ratio      RandomResizedCrop aspect range (3/4, 4/3)
  interpolation   'bicubic' | 'bilinear'
  hflip           horizontal flip probability (0.5)
  color_jitter    brightness = contrast = saturation strength (0.4); 0 disables
  mean, std       per-channel normalisation of [0, 1] pixels (ImageNet defaults)
  min_image_size  images with a side below this many pixels are skipped and counted (16)
  cache_images    decoded images kept per process (LRU; 0 = none; small datasets only)
  num_workers     grain worker processes (0 = threads in this process)
  num_threads     optional, default 2: loader threads per process
  prefetch        optional, default 4: batches buffered per process / worker
  seed            data order, augmentations and masks are pure functions of (seed, epoch, batch)

Batch contract (numpy): ``image`` float32 ``[B, S, S, 3]`` (NHWC, normalised), plus what
``batch_fn`` adds (``BeitMaskFn``: ``mask`` bool ``[B, 1 + (S/p)²]``, CLS column False). One
image size per config, hence one batch shape and one compiled step. Host metadata (keys starting
with ``_``, stripped by the trainer): ``_bad`` {reason: count} (skipped images and RGB
conversions in this batch), ``_keys``, ``_labels`` int64 ``[B]`` (-1 = unknown), ``_row_offset``,
``_epoch``, ``_index``.

Multi-host sharding as in the speech pipeline: every process walks the same global plan (a
permutation per epoch, full batches of R rows, remainder dropped) and process p of P loads rows
``[p·R/P, (p+1)·R/P)``; augmentation randomness is drawn per GLOBAL row and masks per global row,
so the assembled global batch does not depend on the number of processes.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import io
import os
import sys
import threading
from typing import Any, Callable, Sequence

from absl import logging
import grain
import numpy as np
from PIL import Image, ImageEnhance

from d2vjax import masking
from d2vjax.data.sources import _get

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTS", "EMBEDDED_TRAIN", "EMBEDDED_VALID",
    "BAD_REASONS", "BadImageError", "decode_image", "load_image", "AugmentParams", "Augment",
    "augment_from_config", "ImageExample", "list_image_files", "scan_image_folder",
    "embedded_examples", "examples_from_config", "SOURCES", "ImagePlan", "plan_from_config",
    "epoch_order", "BeitMaskFn", "beit_mask_fn", "make_image_dataset", "make_image_iterator",
]

# timm IMAGENET_DEFAULT_MEAN/STD, selected by the recipe's --imagenet_default_mean_and_std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision/BEiT ImageFolder extensions (dataset_folder.IMG_EXTENSIONS).
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Embedded default data: natural and scientific images that ship inside the scikit-image wheel
# (``skimage/data/``) and open offline (most ``skimage.data`` loaders download through pooch).
# Every one is >= 100 px a side; 13 are not plain RGB (gray, RGBA), which exercises conversion.
EMBEDDED_TRAIN = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
    "color.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png",
    "logo.png", "microaneurysms.png", "motorcycle_left.png", "motorcycle_right.png", "page.png",
    "phantom.png", "retina.jpg", "text.png",
)
EMBEDDED_VALID = ("coffee.png", "coins.png", "moon.png", "rocket.jpg")

BAD_REASONS = ("undecodable", "too_small")
# SeedSequence stream tags, FIRST and nonzero (trailing zeros do not separate streams).
_PLAN, _AUG, _HOOK, _MASK = 11, 12, 13, 14


# ---------------------------------------------------------------------------------------------
# Decoding.


class BadImageError(ValueError):
  """An image that cannot be used; ``reason`` is one of ``BAD_REASONS``."""

  def __init__(self, path, reason: str, detail: str = ""):
    if reason not in BAD_REASONS:
      raise ValueError(f"unknown bad-image reason {reason!r}; expected one of {BAD_REASONS}")
    self.path = os.fspath(path)
    self.reason = reason
    self.detail = detail
    super().__init__(f"{self.path}: {reason}" + (f" ({detail})" if detail else ""))

  def __reduce__(self):
    # Grain worker processes pickle exceptions; keep the constructor arguments.
    return (BadImageError, (self.path, self.reason, self.detail))


def _conversion(mode: str) -> str:
  """The counted kind of RGB conversion for a PIL mode ('' for RGB itself)."""
  if mode == "RGB":
    return ""
  if mode in ("L", "1"):
    return "gray"
  if mode == "CMYK":
    return "cmyk"
  if mode in ("RGBA", "RGBa", "LA", "La", "PA", "RGBX"):
    return "alpha"
  if mode == "P":
    return "palette"
  if mode.startswith("I") or mode == "F":
    return "high_depth"
  return "other"  # YCbCr, LAB, HSV


def _to_rgb(im: Image.Image) -> Image.Image:
  """RGB as BEiT's loader (``img.convert('RGB')``: alpha dropped, palette expanded, gray
  replicated, CMYK converted); 16-bit / float pixels are scaled to 8 bits first (PIL's own
  conversion would clip them)."""
  mode = im.mode
  if mode == "RGB":
    return im
  if mode.startswith("I") or mode == "F":
    a = np.asarray(im, np.float64)
    if mode == "F":
      lo, hi = float(a.min()), float(a.max())
      a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    else:
      a = a / 257.0  # 16-bit range → 8-bit range (65535 → 255)
    im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
  elif mode == "P" and "transparency" in im.info:
    # Same RGB as a direct convert, without PIL's warning about byte transparency.
    im = im.convert("RGBA")
  return im.convert("RGB")


def decode_image(source, *, path: str = "", min_size: int = 16) -> tuple[Image.Image, str]:
  """Decodes an image file or encoded bytes to an RGB PIL image.

  Args:
    source: a file path, a binary file object or ``bytes``.
    path: name for error messages (defaults to ``source`` when it is a path).
    min_size: smallest accepted side in pixels.
  Returns:
    ``(rgb_image, conversion)``: ``conversion`` is '' for RGB sources, else the counted kind
    ('gray', 'cmyk', 'alpha', 'palette', 'high_depth', 'other').
  Raises:
    BadImageError: 'undecodable' (not an image, corrupt or truncated data, decompression-bomb
      sized) or 'too_small' (a side below ``min_size``).
  """
  if isinstance(source, (bytes, bytearray, memoryview)):
    source = io.BytesIO(bytes(source))
  name = path or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<bytes>")
  try:
    with Image.open(source) as im:
      im.load()  # full decode here, so truncated or corrupt data fail now, not later
      kind = _conversion(im.mode)
      w, h = im.size
      if min(w, h) < min_size:
        raise BadImageError(name, "too_small", f"{w}×{h} px < {min_size}")
      return _to_rgb(im).copy() if kind else im.copy(), kind
  except BadImageError:
    raise
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError …
    raise BadImageError(name, "undecodable", f"{type(e).__name__}: {e}") from None


def _load_tfds(uri: str) -> bytes:
  from d2vjax.data import tfds_imagenet  # Lazy: tfds import costs ~0.5 s.
  return tfds_imagenet.load_record_bytes(uri)


def load_image(path: str, *, min_size: int = 16) -> tuple[Image.Image, str]:
  """``decode_image`` of an ``ImageExample.path``: a file or a ``tfds://`` record URI."""
  if path.startswith("tfds://"):
    try:
      data = _load_tfds(path)
    except Exception as e:
      raise BadImageError(path, "undecodable", f"record unreadable: {e}") from None
    return decode_image(data, path=path, min_size=min_size)
  return decode_image(path, min_size=min_size)


# ---------------------------------------------------------------------------------------------
# Augmentation (BEiT / data2vec pre-training view).


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """One drawn augmentation: crop box ``(top, left, height, width)`` in source pixels, flip,
  colour-jitter factors ``(brightness, contrast, saturation)`` and their order (indices)."""
  crop: tuple[int, int, int, int]
  flip: bool
  factors: tuple[float, float, float] = (1.0, 1.0, 1.0)
  order: tuple[int, ...] = (0, 1, 2)


_INTERP = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


@dataclasses.dataclass(frozen=True)
class Augment:
  """The data2vec/BEiT pre-training transform (``DataAugmentationForBEiT``, data2vec §4.1):
  RandomResizedCrop(S, scale, ratio, bicubic) + horizontal flip + ColorJitter(b, c, s) (no hue),
  then ToTensor + Normalize. The same view feeds student and teacher.

  BEiT jitters and flips the full image before the crop; here crop → flip → jitter (as timm's
  ImageNet training transform does): crop positions are uniform and flips commute with the
  per-pixel enhancers, so the distribution is the same except that the contrast enhancer's mean
  grey level is taken over the crop instead of the whole image, and jitter costs S² pixels
  instead of the source's (docs/semantics.md, vision).
  """
  size: int = 224
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  interpolation: str = "bicubic"
  hflip: float = 0.5
  color_jitter: float = 0.4
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  def sample_crop(self, rng: np.random.Generator, width: int, height: int
                  ) -> tuple[int, int, int, int]:
    """torchvision/BEiT ``RandomResizedCrop.get_params``: 10 tries of a random area in
    ``scale`` × image area and log-uniform aspect in ``ratio``, else a centred crop with the ratio
    clamped. Returns ``(top, left, h, w)``."""
    area = width * height
    log_lo, log_hi = np.log(self.ratio[0]), np.log(self.ratio[1])
    for _ in range(10):
      target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * rng.random())
      aspect = float(np.exp(log_lo + (log_hi - log_lo) * rng.random()))
      w = int(round(float(np.sqrt(target * aspect))))
      h = int(round(float(np.sqrt(target / aspect))))
      if 0 < w <= width and 0 < h <= height:
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(self.ratio):
      w, h = width, int(round(width / min(self.ratio)))
    elif in_ratio > max(self.ratio):
      h, w = height, int(round(height * max(self.ratio)))
    else:
      w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w

  def sample(self, rng: np.random.Generator, width: int, height: int) -> AugmentParams:
    """Draws crop, flip and jitter for a ``width × height`` source image."""
    crop = self.sample_crop(rng, width, height)
    flip = bool(rng.random() < self.hflip)
    j = float(self.color_jitter)
    if j > 0:
      # torchvision ColorJitter: factors U[max(0, 1-j), 1+j], applied in a random order.
      factors = tuple(float(max(0.0, 1.0 - j) + (1.0 + j - max(0.0, 1.0 - j)) * rng.random())
                      for _ in range(3))
      order = tuple(int(i) for i in rng.permutation(3))
      return AugmentParams(crop, flip, factors, order)
    return AugmentParams(crop, flip)

  def apply(self, img: Image.Image, params: AugmentParams) -> np.ndarray:
    """The augmented view as uint8 ``[S, S, 3]`` (crop → resize → flip → jitter)."""
    top, left, h, w = params.crop
    # torchvision resized_crop on PIL: crop, then resize (not resize with a box).
    out = img.crop((left, top, left + w, top + h)).resize(
        (self.size, self.size), _INTERP[self.interpolation])
    if params.flip:
      out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if self.color_jitter > 0:
      for i in params.order:
        out = _ENHANCERS[i](out).enhance(params.factors[i])
    return np.asarray(out, np.uint8)

  def normalize(self, pixels: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 3]`` → float32 ``(x / 255 - mean) / std`` (ToTensor + Normalize)."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

  def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """One normalised float32 ``[S, S, 3]`` view of an RGB image."""
    return self.normalize(self.apply(img, self.sample(rng, *img.size)))


def augment_from_config(data_cfg) -> Augment:
  """``Augment`` from the data section (fields in the module docstring)."""
  interp = str(_get(data_cfg, "interpolation", "bicubic"))
  if interp not in _INTERP:
    raise ValueError(f"data.interpolation must be one of {sorted(_INTERP)}, got {interp!r}")
  return Augment(
      size=int(_get(data_cfg, "image_size", 224)),
      scale=tuple(float(v) for v in _get(data_cfg, "crop_scale", (0.08, 1.0))),
      ratio=tuple(float(v) for v in _get(data_cfg, "crop_ratio", (3.0 / 4.0, 4.0 / 3.0))),
      interpolation=interp, hflip=float(_get(data_cfg, "hflip", 0.5)),
      color_jitter=float(_get(data_cfg, "color_jitter", 0.4) or 0.0),
      mean=tuple(float(v) for v in _get(data_cfg, "mean", IMAGENET_MEAN)),
      std=tuple(float(v) for v in _get(data_cfg, "std", IMAGENET_STD)))


# ---------------------------------------------------------------------------------------------
# Sources.


@dataclasses.dataclass(frozen=True)
class ImageExample:
  """One image: ``path`` (file or ``tfds://`` URI), stable ``key``, class ``label`` (-1 = none)."""
  path: str
  key: str = ""
  label: int = -1


def _require(path, what: str) -> str:
  path = os.fspath(path)
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"{what} not found: {path!r}")
  return path


def list_image_files(root, exts: Sequence[str] = IMAGE_EXTS) -> list[tuple[str, str]]:
  """``(path, key)`` of every image file under ``root`` (recursive), sorted by key (the relative
  path without extension)."""
  root = _require(root, "image folder")
  if not os.path.isdir(root):
    raise NotADirectoryError(f"image folder is not a directory: {root!r}")
  exts = tuple(e.lower() for e in exts)
  out = []
  for folder, dirs, files in os.walk(root):
    dirs.sort()
    for name in sorted(files):
      stem, ext = os.path.splitext(name)
      if ext.lower() in exts:
        rel = os.path.relpath(os.path.join(folder, stem), root).replace(os.sep, "/")
        out.append((os.path.join(folder, name), rel))
  out.sort(key=lambda r: r[1])
  return out


def scan_image_folder(root, exts: Sequence[str] = IMAGE_EXTS) -> list[ImageExample]:
  """Images under ``root``; ImageFolder labels: the index of the first-level subfolder in the
  sorted list of subfolders (``train/<wnid>/x.JPEG`` → the wnid's class index), -1 for files at
  the root. Nothing is decoded: bad files are found and counted when loaded."""
  files = list_image_files(root, exts)
  classes = sorted({k.split("/", 1)[0] for _, k in files if "/" in k})
  index = {c: i for i, c in enumerate(classes)}
  return [ImageExample(p, k, index[k.split("/", 1)[0]] if "/" in k else -1) for p, k in files]


def embedded_dir() -> str:
  """Folder of the images shipped in the scikit-image wheel (``skimage/data``)."""
  spec = importlib.util.find_spec("skimage")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("scikit-image is not installed (it provides the embedded images)")
  return os.path.join(list(spec.submodule_search_locations)[0], "data")


def embedded_examples(split: str = "train") -> list[ImageExample]:
  """The embedded images of ``split`` ('train': 20, 'valid': 4), read from the skimage wheel."""
  names = {"train": EMBEDDED_TRAIN, "valid": EMBEDDED_VALID}.get(split)
  if names is None:
    raise ValueError(f"unknown embedded image split {split!r}; valid splits: train, valid")
  root = embedded_dir()
  out = []
  for name in names:
    path = os.path.join(root, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"embedded image missing from the scikit-image install: {path}")
    out.append(ImageExample(path, os.path.splitext(name)[0]))
  return out


def _split_sub(cfg, split: str) -> str:
  if split in ("train", "valid"):
    name = _get(cfg, f"{split}_split")
    return split if name is None else name
  return split


def _from_embedded(cfg, split: str) -> list[ImageExample]:
  return embedded_examples(split)


def _from_folder(cfg, split: str) -> list[ImageExample]:
  root = _get(cfg, "folder")
  if not root:
    raise FileNotFoundError("data.folder is not set (source='folder')")
  _require(root, "data.folder")
  sub = _split_sub(cfg, split)
  if sub:
    root = _require(os.path.join(root, sub), f"folder for split {split!r}")
  return scan_image_folder(root)


def _from_tfds(cfg, split: str):
  from d2vjax.data import tfds_imagenet
  return tfds_imagenet.list_examples(_get(cfg, "tfds_name") or tfds_imagenet.NAME,
                                     _split_sub(cfg, split), _get(cfg, "tfds_data_dir") or None)


SOURCES: dict[str, Callable[[Any, str], Sequence[ImageExample]]] = {
    "embedded": _from_embedded,
    "folder": _from_folder,
    "tfds": _from_tfds,
}


def examples_from_config(data_cfg, split: str = "train"
                         ) -> tuple[Sequence[ImageExample], dict[str, int]]:
  """``(examples, skipped_counts)`` of ``split`` from ``data_cfg.source``.

  Listing opens no image (1.28M headers would cost minutes), so nothing is skipped here; bad
  images are skipped, replaced and counted by the pipeline as they are loaded.
  """
  source = _get(data_cfg, "source", "embedded")
  if source not in SOURCES:
    raise ValueError(f"unknown data.source {source!r}; expected one of {sorted(SOURCES)}")
  examples = SOURCES[source](data_cfg, split)
  logging.info("image data %s/%s: %d examples", source, split, len(examples))
  return examples, {}


# ---------------------------------------------------------------------------------------------
# Batch plan.


@dataclasses.dataclass(frozen=True)
class ImagePlan:
  """The epoch-independent batching plan: one static batch shape.

  Attributes:
    rows: global rows R per batch (a multiple of the data-parallel device count).
    image_size: S.
    num_examples: examples in the list.
    counts: ``dropped_remainder`` (examples left out of each epoch by the last partial batch).
  """
  rows: int
  image_size: int
  num_examples: int
  counts: dict

  @property
  def total_batches(self) -> int:
    """Global batches per epoch (identical on every process)."""
    return self.num_examples // self.rows

  def shapes(self) -> dict[tuple[int, int, int, int], int]:
    """``{(R, S, S, 3): batches per epoch}`` (empty when no full batch fits)."""
    n = self.total_batches
    return {(self.rows, self.image_size, self.image_size, 3): n} if n else {}


def plan_from_config(data_cfg, examples: Sequence[ImageExample], batch_multiple: int = 1
                     ) -> ImagePlan:
  """``ImagePlan`` for ``data_cfg`` (``batch_size``, ``image_size``, ``patch_size``)."""
  m = int(batch_multiple)
  size = int(_get(data_cfg, "image_size", 224))
  patch = int(_get(data_cfg, "patch_size", 16) or 1)
  if size % patch:
    raise ValueError(f"data.image_size={size} is not a multiple of the patch size {patch}")
  rows = max(m, int(_get(data_cfg, "batch_size")) // m * m)
  n = len(examples)
  return ImagePlan(rows, size, n, {"dropped_remainder": n % rows} if n % rows else {})


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The epoch's example order, a pure function of ``(seed, epoch)``; global batch j holds
  ``order[j·R : (j+1)·R]``."""
  return np.random.default_rng([_PLAN, int(seed) % 2**64, int(epoch)]).permutation(num_examples)


# ---------------------------------------------------------------------------------------------
# Masks.


@dataclasses.dataclass(frozen=True)
class BeitMaskFn:
  """``batch_fn`` adding ``mask`` bool ``[B, 1 + Gh·Gw]`` (CLS column False): one BEiT block mask
  per row (``masking.beit_block_mask``), grid ``(H/p, W/p)`` from the image shape.

  Each global row draws from its own generator ``[tag, s, g]`` (``s`` from the batch's hook
  generator, ``g`` the global row), so a process computes only its rows and the global batch's
  masks do not depend on the process count.
  """
  patch_size: int
  num_masking_patches: int
  min_num_patches: int = 16
  max_num_patches: int | None = None
  min_aspect: float = 0.3
  max_aspect: float | None = None

  def __call__(self, rng: np.random.Generator, batch: dict) -> dict:
    b, h, w = batch["image"].shape[:3]
    grid = (h // self.patch_size, w // self.patch_size)
    base = int(rng.integers(0, 2**63))
    off = int(batch.get("_row_offset", 0))
    mask = np.zeros((b, 1 + grid[0] * grid[1]), bool)
    for r in range(b):
      row_rng = np.random.default_rng([_MASK, base, off + r])
      mask[r, 1:] = masking.beit_block_mask(
          row_rng, grid, self.num_masking_patches, self.min_num_patches, self.max_num_patches,
          self.min_aspect, self.max_aspect).reshape(-1)
    return {**batch, "mask": mask}


def beit_mask_fn(mask_cfg) -> BeitMaskFn:
  """``BeitMaskFn`` from the masking section: ``patch_size``, ``num_masking_patches`` and
  optionally ``min_num_patches`` (16), ``max_num_patches`` (None), ``min_aspect`` (0.3),
  ``max_aspect`` (None → 1/min_aspect)."""
  max_n = _get(mask_cfg, "max_num_patches")
  return BeitMaskFn(
      patch_size=int(_get(mask_cfg, "patch_size")),
      num_masking_patches=int(_get(mask_cfg, "num_masking_patches")),
      min_num_patches=int(_get(mask_cfg, "min_num_patches", 16)),
      max_num_patches=None if max_n is None else int(max_n),
      min_aspect=float(_get(mask_cfg, "min_aspect", 0.3)),
      max_aspect=_get(mask_cfg, "max_aspect"))


# ---------------------------------------------------------------------------------------------
# Grain pipeline.


class _ImageBatchLoader:
  """Global-batch index → this process's rows of that batch (a grain ``map`` function).

  Picklable (grain workers receive a copy); caches are per process and rebuilt after unpickling.
  """

  def __init__(self, examples: Sequence[ImageExample], plan: ImagePlan, augment: Augment, *,
               seed: int, start_epoch: int, process_index: int, process_count: int,
               min_size: int, cache_images: int, batch_fn):
    self.examples = examples
    self.plan, self.augment = plan, augment
    self.seed, self.start_epoch = int(seed) % 2**64, int(start_epoch)  # SeedSequence: >= 0
    self.p, self.P = int(process_index), int(process_count)
    self.min_size, self.cache_images = int(min_size), int(cache_images)
    self.batch_fn = batch_fn
    self._init_caches()

  def _init_caches(self):
    self._lock = threading.Lock()
    self._orders: dict[int, np.ndarray] = {}
    self._known_bad: dict[int, str] = {}  # example index → reason; bad files stay bad
    self._cache: collections.OrderedDict = collections.OrderedDict()

  def __getstate__(self):
    state = dict(self.__dict__)
    for k in ("_lock", "_orders", "_known_bad", "_cache"):
      state.pop(k)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_caches()

  def _order(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._orders:
        if len(self._orders) >= 2:
          self._orders.pop(min(self._orders))
        self._orders[epoch] = epoch_order(self.plan.num_examples, self.seed, epoch)
      return self._orders[epoch]

  def _load(self, idx: int) -> tuple[Image.Image, str]:
    with self._lock:
      reason = self._known_bad.get(idx)
      hit = self._cache.get(idx)
      if hit is not None:
        self._cache.move_to_end(idx)
    if reason is not None:
      raise BadImageError(self.examples[idx].path, reason, "cached")
    if hit is not None:
      return hit
    try:
      out = load_image(self.examples[idx].path, min_size=self.min_size)
    except BadImageError as e:
      with self._lock:
        self._known_bad[idx] = e.reason
      raise
    if self.cache_images > 0:
      with self._lock:
        self._cache[idx] = out
        while len(self._cache) > self.cache_images:
          self._cache.popitem(last=False)
    return out

  def __call__(self, i: int) -> dict:
    total = self.plan.total_batches
    epoch, j = self.start_epoch + int(i) // total, int(i) % total
    order = self._order(epoch)
    n, r_global, s = len(order), self.plan.rows, self.plan.image_size
    b = r_global // self.P
    row0 = self.p * b
    images = np.zeros((b, s, s, 3), np.float32)
    labels = np.full((b,), -1, np.int64)
    bad = collections.Counter()
    keys = []
    for r in range(b):
      g = row0 + r
      for attempt in range(n):
        # A bad image is replaced by the next one of the epoch order (wrapping): the batch
        # keeps its shape and the choice is the same on every run and every process count.
        idx = int(order[(j * r_global + g + attempt) % n])
        try:
          img, converted = self._load(idx)
          break
        except BadImageError as e:
          bad[e.reason] += 1
      else:
        raise RuntimeError(f"every image failed to load: {dict(bad)}")
      if converted:
        bad[f"converted_{converted}"] += 1
      rng = np.random.default_rng([_AUG, self.seed, epoch, j, g])
      images[r] = self.augment(img, rng)
      ex = self.examples[idx]
      labels[r] = ex.label
      keys.append(ex.key)
    batch = {"image": images, "_bad": dict(bad), "_keys": keys, "_labels": labels,
             "_row_offset": row0, "_epoch": epoch, "_index": j}
    if self.batch_fn is not None:
      # Same generator on every process: hooks draw per global row and keep theirs.
      batch = self.batch_fn(np.random.default_rng([_HOOK, self.seed, epoch, j]), batch)
    return batch


def make_image_dataset(data_cfg, *, examples: Sequence[ImageExample], seed: int | None = None,
                       batch_multiple: int = 1, process_index: int = 0, process_count: int = 1,
                       batch_fn: Callable[[np.random.Generator, dict], dict] | None = None,
                       num_epochs: int | None = None, start_epoch: int = 0) -> grain.IterDataset:
  """The pipeline as a grain ``IterDataset`` (arguments: ``make_image_iterator``)."""
  if batch_multiple % process_count:
    raise ValueError(f"batch_multiple={batch_multiple} (data-parallel devices) must be a multiple "
                     f"of process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  seed = int(_get(data_cfg, "seed", 0) if seed is None else seed)
  plan = plan_from_config(data_cfg, examples, batch_multiple)
  if plan.total_batches == 0:
    raise ValueError(f"no complete batch: {len(examples)} images for {plan.rows} rows per batch "
                     "(lower data.batch_size or add data)")
  loader = _ImageBatchLoader(
      examples, plan, augment_from_config(data_cfg), seed=seed, start_epoch=start_epoch,
      process_index=process_index, process_count=process_count,
      min_size=int(_get(data_cfg, "min_image_size", 16)),
      cache_images=int(_get(data_cfg, "cache_images", 0) or 0), batch_fn=batch_fn)
  # sys.maxsize elements ≈ unbounded epochs; grain's MapDataset needs a length.
  length = sys.maxsize if num_epochs is None else int(num_epochs) * plan.total_batches
  ds = grain.MapDataset.range(length).map(loader)
  read = grain.ReadOptions(num_threads=int(_get(data_cfg, "num_threads", 2) or 0),
                           prefetch_buffer_size=int(_get(data_cfg, "prefetch", 4) or 1))
  ids = ds.to_iter_dataset(read)
  workers = int(_get(data_cfg, "num_workers", 0) or 0)
  if workers > 0:
    from absl import flags  # grain's worker start-up reads absl flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=int(_get(data_cfg, "prefetch", 4) or 1)))
  logging.info("image pipeline: %d images, batch %s, %d batches/epoch, counts %s", len(examples),
               sorted(plan.shapes()), plan.total_batches, plan.counts)
  return ids


def make_image_iterator(data_cfg, *, examples: Sequence[ImageExample], seed: int | None = None,
                        batch_multiple: int = 1, process_index: int = 0, process_count: int = 1,
                        batch_fn: Callable[[np.random.Generator, dict], dict] | None = None,
                        num_epochs: int | None = None, start_epoch: int = 0):
  """Iterator over this process's share of the global image batches.

  Args:
    data_cfg: see the module docstring for the fields.
    examples: from ``examples_from_config`` (the same list, same order, on every process).
    seed: data seed (default ``data_cfg.seed``); order, augmentations and hook randomness are
      pure functions of ``(seed, epoch, batch index, global row)``.
    batch_multiple: data-parallel device count; rows per batch are multiples of it.
    process_index, process_count: this host's rows ``[p·R/P, (p+1)·R/P)`` of each global batch.
    batch_fn: ``(rng, batch) -> batch`` hook, e.g. ``beit_mask_fn(config.masking)``; picklable
      when ``num_workers > 0``.
    num_epochs: None = endless, else stop after that many epochs.
    start_epoch: epoch of the first element.

  Returns:
    A grain ``DatasetIterator`` of batch dicts; ``get_state()`` / ``set_state()`` resume at
    exactly the next batch (saved with the trainer's orbax checkpoints). Call ``close()`` on a
    multi-worker iterator when done.
  """
  return iter(make_image_dataset(
      data_cfg, examples=examples, seed=seed, batch_multiple=batch_multiple,
      process_index=process_index, process_count=process_count, batch_fn=batch_fn,
      num_epochs=num_epochs, start_epoch=start_epoch))
