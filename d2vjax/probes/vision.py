"""Image probe data: labelled images (ImageFolder class indices, tfds labels) with the standard
evaluation view — resize the shorter side to ``image_size / 0.875``, centre crop ``image_size``,
normalise — for a linear classifier on mean-pooled patch features.

The embedded images carry no labels: probes need ``data.source='folder'`` (one subfolder per
class) or a labelled tfds dataset.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from d2vjax import probe, registry
from d2vjax.data import image

EVAL_CROP = 0.875  # 224 / 256, the timm/BEiT evaluation crop ratio


def eval_view(img: Image.Image, aug: image.Augment) -> np.ndarray:
  """Normalised float32 ``[S, S, 3]``: shorter side → S / 0.875 (bicubic), centre S × S crop."""
  s = aug.size
  short = int(round(s / EVAL_CROP))
  w, h = img.size
  scale = short / min(w, h)
  img = img.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.Resampling.BICUBIC)
  w, h = img.size
  left, top = (w - s) // 2, (h - s) // 2
  return aug.normalize(np.asarray(img.crop((left, top, left + s, top + s)), np.uint8))


@registry.register("probe_data", "vision")
def vision_probe_data(config, split: str, max_examples: int, batch_multiple: int = 1
                      ) -> probe.ProbeData:
  """``max_examples`` labelled images of ``split`` (a fixed subset; unreadable ones skipped) in
  batches of 32 rows rounded up to ``batch_multiple``; targets are class ids."""
  modality = registry.get("modality", config.modality)
  examples, _ = image.examples_from_config(config.data, split)
  labelled = [e for e in examples if e.label >= 0]
  chosen = probe.first(labelled, max_examples, seed=int(config.get("seed", 0)))
  aug = image.augment_from_config(config.data)
  items = []
  for e in chosen:
    try:
      img, _ = image.load_image(e.path)
    except image.BadImageError:
      continue
    items.append((eval_view(img, aug), e.label))
  num_classes = 1 + max((e.label for e in labelled), default=-1)
  rows = -(-32 // batch_multiple) * batch_multiple

  def fill(batch, r, item):
    batch["image"][r] = item[0]

  batches = probe.fill_batches(lambda n: modality.dummy_batch(config.data, n), items, fill, rows)
  return probe.ProbeData(batches, "classify", [y for _, y in items], num_classes)
