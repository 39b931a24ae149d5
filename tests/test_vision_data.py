"""Image data for data2vec vision: decoding and bad inputs, BEiT augmentation (shapes, flip
symmetry, normalisation, crop sampling), sources (embedded, ImageFolder), the grain pipeline
(static shapes, mask contract, process shards, resume) and the TF-free tfds ImageNet builder.
"""

import io
import os
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from d2vjax.data import image as image_lib
from d2vjax.data import tfds_imagenet
from d2vjax.modalities.vision import Vision


def _rgb(w, h, seed=0):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _save(img, path, fmt=None, **kw):
  img.save(path, fmt, **kw)
  return str(path)


def _bad_files(root):
  """One image of each awkward kind, and the reason or conversion it must produce."""
  os.makedirs(root, exist_ok=True)
  base = _rgb(40, 30, seed=1)
  files = {
      "ok.png": (_save(base, os.path.join(root, "ok.png")), ""),
      "gray.png": (_save(base.convert("L"), os.path.join(root, "gray.png")), "gray"),
      "rgba.png": (_save(base.convert("RGBA"), os.path.join(root, "rgba.png")), "alpha"),
      "palette.png": (_save(base.convert("P", palette=Image.Palette.ADAPTIVE),
                            os.path.join(root, "palette.png")), "palette"),
      "cmyk.jpg": (_save(base.convert("CMYK"), os.path.join(root, "cmyk.jpg"), "JPEG"), "cmyk"),
      "deep.png": (_save(Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(
          np.uint16)), os.path.join(root, "deep.png")), "high_depth"),
      "tiny.png": (_save(_rgb(4, 4), os.path.join(root, "tiny.png")), "too_small"),
  }
  corrupt = os.path.join(root, "corrupt.jpg")
  with open(corrupt, "wb") as f:
    f.write(b"\xff\xd8 definitely not a jpeg" * 20)
  files["corrupt.jpg"] = (corrupt, "undecodable")
  buf = io.BytesIO()
  _rgb(64, 64, seed=2).save(buf, "JPEG")
  truncated = os.path.join(root, "truncated.jpg")
  with open(truncated, "wb") as f:
    f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
  files["truncated.jpg"] = (truncated, "undecodable")
  return files


# ----------------------------------------------------------------------------- decoding


def test_bad_images_are_converted_or_rejected_with_a_reason(tmp_path):
  for name, (path, want) in _bad_files(str(tmp_path)).items():
    if want in image_lib.BAD_REASONS:
      with pytest.raises(image_lib.BadImageError) as e:
        image_lib.decode_image(path)
      assert e.value.reason == want, name
    else:
      img, conv = image_lib.decode_image(path)
      assert img.mode == "RGB" and conv == want, name
  # The CMYK JPEG and the grey PNG still look like the source (conversions, not garbage).
  src = np.asarray(_rgb(40, 30, seed=1), np.float64)
  gray, _ = image_lib.decode_image(str(tmp_path / "gray.png"))
  g = np.asarray(gray, np.float64)
  assert np.array_equal(g[..., 0], g[..., 1]) and abs(g.mean() - src.mean()) < 3
  cmyk, _ = image_lib.decode_image(str(tmp_path / "cmyk.jpg"))
  assert np.abs(np.asarray(cmyk, np.float64) - src).mean() < 40
  deep, _ = image_lib.decode_image(str(tmp_path / "deep.png"))  # 16-bit scaled, not clipped
  assert 200 < np.asarray(deep).max() <= 255 and np.asarray(deep).min() == 0
  # Bytes work like files; errors pickle (grain workers send them across processes).
  data = open(str(tmp_path / "ok.png"), "rb").read()
  np.testing.assert_array_equal(np.asarray(image_lib.decode_image(data)[0]), np.asarray(
      image_lib.decode_image(str(tmp_path / "ok.png"))[0]))
  import pickle
  err = pickle.loads(pickle.dumps(image_lib.BadImageError("x.jpg", "too_small", "4×4")))
  assert err.reason == "too_small" and err.path == "x.jpg"


def test_embedded_images_load_offline():
  train = image_lib.embedded_examples("train")
  valid = image_lib.embedded_examples("valid")
  assert len(train) == 20 and len(valid) == 4
  assert not {e.key for e in train} & {e.key for e in valid}
  kinds = set()
  for e in train + valid:
    img, conv = image_lib.decode_image(e.path)
    assert img.mode == "RGB" and min(img.size) >= 100
    kinds.add(conv)
  assert {"", "gray", "alpha"} <= kinds
  with pytest.raises(ValueError, match="valid splits"):
    image_lib.embedded_examples("test")


def test_folder_source_gives_imagefolder_labels(tmp_path):
  for cls, n in (("n02", 2), ("n01", 3)):
    os.makedirs(tmp_path / cls)
    for i in range(n):
      _save(_rgb(20, 20, i), tmp_path / cls / f"{cls}_{i}.JPEG", "JPEG")
  (tmp_path / "n01" / "notes.txt").write_text("not an image")
  ex, skipped = image_lib.examples_from_config(dict(source="folder", folder=str(tmp_path),
                                                    train_split=""), "train")
  assert skipped == {} and len(ex) == 5
  assert [(e.key, e.label) for e in ex] == [("n01/n01_0", 0), ("n01/n01_1", 0), ("n01/n01_2", 0),
                                            ("n02/n02_0", 1), ("n02/n02_1", 1)]
  with pytest.raises(FileNotFoundError, match="nowhere"):
    image_lib.examples_from_config(dict(source="folder", folder=str(tmp_path / "nowhere")))


# ----------------------------------------------------------------------------- augmentation


def test_augment_shapes_determinism_and_ranges():
  aug = image_lib.Augment(size=48)
  img = _rgb(120, 80)
  a = aug(img, np.random.default_rng(3))
  b = aug(img, np.random.default_rng(3))
  assert a.shape == (48, 48, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, aug(img, np.random.default_rng(4)))
  rng = np.random.default_rng(0)
  for _ in range(200):
    p = aug.sample(rng, 120, 80)
    top, left, h, w = p.crop
    assert 0 <= top and top + h <= 80 and 0 <= left and left + w <= 120
    assert all(0.6 <= f <= 1.4 for f in p.factors) and sorted(p.order) == [0, 1, 2]
  # RandomResizedCrop statistics: area fraction in [0.08, 1], aspect in [3/4, 4/3] (± rounding).
  big = [aug.sample_crop(rng, 1000, 1000) for _ in range(300)]
  areas = np.array([h * w for _, _, h, w in big]) / 1e6
  aspects = np.array([w / h for _, _, h, w in big])
  assert areas.min() >= 0.079 and areas.max() <= 1.0
  assert 0.74 < aspects.min() and aspects.max() < 1.34
  # No try fits a 1000 × 20 strip: centred fallback with the ratio clamped to 4/3.
  assert aug.sample_crop(np.random.default_rng(0), 1000, 20) == (0, (1000 - 27) // 2, 20, 27)


def test_flip_symmetry():
  aug = image_lib.Augment(size=32)
  img = _rgb(90, 70, seed=5)
  p = aug.sample(np.random.default_rng(1), 90, 70)
  plain = image_lib.AugmentParams(p.crop, False, p.factors, p.order)
  flipped = image_lib.AugmentParams(p.crop, True, p.factors, p.order)
  x, y = aug.apply(img, plain), aug.apply(img, flipped)
  np.testing.assert_array_equal(y, x[:, ::-1])  # flip of the crop == crop then flip
  # A flip of a flipped view is the view: mirror the source and the crop box.
  mirror = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  top, left, h, w = p.crop
  twice = aug.apply(mirror, image_lib.AugmentParams((top, 90 - left - w, h, w), True, p.factors,
                                                    p.order))
  np.testing.assert_array_equal(twice, x)


def test_normalisation_statistics():
  aug = image_lib.Augment(size=40, color_jitter=0.0)
  img = _rgb(40, 40, seed=7)
  whole = image_lib.AugmentParams((0, 0, 40, 40), False)
  x = aug.normalize(aug.apply(img, whole))  # whole-image crop at the same size: identity resize
  src = np.asarray(img, np.float64) / 255.0
  ref = (src - np.array(image_lib.IMAGENET_MEAN)) / np.array(image_lib.IMAGENET_STD)
  np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-6)
  # An image at the ImageNet mean colour normalises to ~0; uniform noise to the analytic moments.
  mean_img = Image.new("RGB", (40, 40), tuple(int(round(255 * m)) for m in image_lib.IMAGENET_MEAN))
  assert np.abs(aug.normalize(np.asarray(mean_img))).max() < 0.5 / 255 / 0.224
  noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
  z = aug.normalize(noise)
  np.testing.assert_allclose(z.mean((0, 1)), (0.5 - np.array(image_lib.IMAGENET_MEAN)) /
                             np.array(image_lib.IMAGENET_STD), atol=0.02)
  np.testing.assert_allclose(z.std((0, 1)), np.sqrt((256 ** 2 - 1) / 12) / 255 /
                             np.array(image_lib.IMAGENET_STD), rtol=0.02)


# ----------------------------------------------------------------------------- pipeline


def _cfg(**kw):
  c = dict(source="embedded", image_size=32, patch_size=8, batch_size=4, cache_images=32,
           num_workers=0, num_threads=0, seed=0)
  c.update(kw)
  return c


MASK = dict(patch_size=8, num_masking_patches=10, min_num_patches=3, max_num_patches=16)


def _epoch(cfg, ex, **kw):
  return list(image_lib.make_image_iterator(cfg, examples=ex, num_epochs=1,
                                            batch_fn=Vision.mask_fn(MASK), **kw))


def test_pipeline_batch_contract_and_plan():
  cfg = _cfg()
  ex, skipped = Vision.examples(cfg, "train")
  plan = Vision.batch_plan(cfg, ex, 1)
  assert plan.total_batches == 5 and plan.shapes() == {(4, 32, 32, 3): 5} and skipped == {}
  batches = _epoch(cfg, ex)
  assert len(batches) == 5
  keys = [k for b in batches for k in b["_keys"]]
  assert sorted(keys) == sorted(e.key for e in ex)  # one epoch = every image once
  for b in batches:
    assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
    assert np.isfinite(b["image"]).all()
    assert b["mask"].shape == (4, 17) and b["mask"].dtype == bool
    assert not b["mask"][:, 0].any() and (b["mask"].sum(1) == 10).all()
    assert Vision.batch_units(b) == 4.0
  dummy = Vision.dummy_batch(_DataCfg(), 2)
  assert dummy["image"].shape == (2, 32, 32, 3) and dummy["mask"].shape == (2, 17)
  with pytest.raises(ValueError, match="multiple of the patch size"):
    image_lib.plan_from_config(_cfg(image_size=30), ex)
  with pytest.raises(ValueError, match="no complete batch"):
    image_lib.make_image_iterator(_cfg(batch_size=64), examples=ex)


class _DataCfg:
  image_size, patch_size = 32, 8


def test_process_shards_rebuild_the_global_batch():
  cfg = _cfg()
  ex, _ = image_lib.examples_from_config(cfg, "train")
  single = _epoch(cfg, ex, batch_multiple=2)
  shards = [_epoch(cfg, ex, batch_multiple=2, process_index=p, process_count=2) for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == len(single)
  for g, b0, b1 in zip(single, *shards):
    for k in ("image", "mask"):
      np.testing.assert_array_equal(np.concatenate([b0[k], b1[k]]), g[k])
    assert b0["_keys"] + b1["_keys"] == g["_keys"]


def test_bad_images_are_replaced_and_counted(tmp_path):
  files = _bad_files(str(tmp_path / "imgs"))
  for i in range(5):
    _save(_rgb(50, 40, seed=10 + i), tmp_path / "imgs" / f"good{i}.png")
  cfg = _cfg(source="folder", folder=str(tmp_path / "imgs"), train_split="", batch_size=2,
             cache_images=0)
  ex, _ = image_lib.examples_from_config(cfg, "train")
  assert len(ex) == 14
  total = {}
  for b in _epoch(cfg, ex):
    assert b["image"].shape == (2, 32, 32, 3) and np.isfinite(b["image"]).all()
    assert not any(k in ("corrupt", "truncated", "tiny") for k in b["_keys"])
    for reason, n in b["_bad"].items():
      total[reason] = total.get(reason, 0) + n
  for reason in ("undecodable", "too_small", "converted_gray", "converted_alpha",
                 "converted_palette", "converted_cmyk", "converted_high_depth"):
    assert total.get(reason, 0) >= 1, (reason, total)


def test_iterator_state_resumes_at_the_next_batch():
  cfg = _cfg(num_threads=2)
  ex, _ = image_lib.examples_from_config(cfg, "train")
  fn = Vision.mask_fn(MASK)
  it = image_lib.make_image_iterator(cfg, examples=ex, batch_fn=fn)
  for _ in range(3):
    next(it)
  state = it.get_state()
  ref = [next(it) for _ in range(4)]  # crosses into epoch 1
  assert ref[2]["_epoch"] == 1 and ref[2]["_index"] == 0
  fresh = image_lib.make_image_iterator(cfg, examples=ex, batch_fn=fn)
  fresh.set_state(state)
  for r, b in zip(ref, [next(fresh) for _ in range(4)]):
    assert r["_keys"] == b["_keys"]
    np.testing.assert_array_equal(r["image"], b["image"])
    np.testing.assert_array_equal(r["mask"], b["mask"])


# ----------------------------------------------------------------------------- tfds ImageNet


def _ilsvrc(root):
  """train/<wnid>/*.JPEG (2 classes × 2, plus a corrupt and a tiny file), flat val/ + Kaggle
  labels CSV."""
  files = {}
  for c, wnid in enumerate(("n01440764", "n01443537")):
    os.makedirs(os.path.join(root, "train", wnid))
    for i in range(2):
      p = _save(_rgb(48 + 8 * i, 40, seed=10 * c + i),
                os.path.join(root, "train", wnid, f"{wnid}_{i}.JPEG"), "JPEG")
      files[f"{wnid}_{i}"] = (p, c)
  with open(os.path.join(root, "train", "n01443537", "n01443537_9.JPEG"), "wb") as f:
    f.write(b"garbage" * 30)
  _save(_rgb(8, 8), os.path.join(root, "train", "n01440764", "n01440764_8.JPEG"), "JPEG")
  os.makedirs(os.path.join(root, "val"))
  lines = ["ImageId,PredictionString"]
  for i, wnid in enumerate(("n01443537", "n01440764", "n01443537")):
    name = f"ILSVRC2012_val_{i + 1:08d}"
    p = _save(_rgb(40, 40, seed=100 + i), os.path.join(root, "val", name + ".JPEG"), "JPEG")
    files[name] = (p, ("n01440764", "n01443537").index(wnid))
    lines.append(f"{name},{wnid} 1 2 3 4")
  with open(os.path.join(root, "LOC_val_solution.csv"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return files


def test_tfds_imagenet_round_trip_without_tensorflow(tmp_path):
  tfds.disable_progress_bar()
  manual, data_dir = str(tmp_path / "ILSVRC2012"), str(tmp_path / "tfds")
  files = _ilsvrc(manual)
  out = tfds_imagenet.prepare(manual, data_dir)
  assert out["splits"] == {"train": 4, "val": 3}
  assert out["bad"] == {"undecodable": 1, "too_small": 1}
  for split in ("train", "val"):
    ds = tfds.data_source(tfds_imagenet.NAME, data_dir=data_dir, split=split)
    ids = [ds[i]["id"].decode() for i in range(len(ds))]
    assert ids == sorted(ids)
    for i in range(len(ds)):
      rec = ds[i]
      path, label = files[rec["id"].decode()]
      assert int(rec["label"]) == label
      assert np.asarray(rec["image"], np.uint8).tobytes() == open(path, "rb").read()  # lossless
  cfg = _cfg(source="tfds", tfds_data_dir=data_dir, train_split="val", batch_size=3)
  ex, _ = Vision.examples(cfg, "train")
  assert len(ex) == 3 and [e.label for e in ex] == [1, 0, 1]
  img, conv = image_lib.load_image(ex[0].path)
  np.testing.assert_array_equal(np.asarray(img), np.asarray(Image.open(files[ex[0].key][0])))
  batches = _epoch(cfg, ex)
  assert len(batches) == 1 and batches[0]["image"].shape == (3, 32, 32, 3)
  np.testing.assert_array_equal(batches[0]["_labels"][np.argsort(batches[0]["_keys"])], [1, 0, 1])
  assert "tensorflow" not in sys.modules
  with pytest.raises(FileNotFoundError, match="not prepared"):
    tfds_imagenet.list_examples(split="train", data_dir=str(tmp_path))


def test_val_labels_formats(tmp_path):
  names = ["ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000001.JPEG"]
  (tmp_path / "a.txt").write_text("n1\nn2\n")  # tfds: one wnid per line, sorted file order
  assert tfds_imagenet.read_val_labels(str(tmp_path / "a.txt"), names) == {
      "ILSVRC2012_val_00000001": "n1", "ILSVRC2012_val_00000002": "n2"}
  (tmp_path / "b.txt").write_text("ILSVRC2012_val_00000001.JPEG n7\n")
  assert tfds_imagenet.read_val_labels(str(tmp_path / "b.txt"), names) == {
      "ILSVRC2012_val_00000001": "n7"}
