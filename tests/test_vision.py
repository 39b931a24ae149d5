"""data2vec 1.0 vision (BEiT ViT) against independent references: BEiT block masks (count,
regions, determinism, a pure-Python BEiT reimplementation), the relative position index (BEiT's
loop definition), patch embedding (NumPy conv), BEiT init, the published parameter count, targets
and smooth-L1 (NumPy), the full loss wiring, an end-to-end ``train.run`` and the summary CLI.

Tolerances: fp32 JAX vs float64 NumPy, ``rtol=1e-5, atol=1e-6``.
"""

import functools
import json
import math
import os
import random
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from d2vjax import checkpointing, configs_vision, ema, export, masking, optim, registry, train
from d2vjax.models import vision
from d2vjax.objectives import losses, targets

TOL = dict(rtol=1e-5, atol=1e-6)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Hugging Face Data2VecVisionModel() default (ViT-B/16: patch embedding, CLS, 12 layers with q/v
# biases and layer scale; no relative bias, no mask token, no final norm): 85,655,040.
HF_BASE_PARAMS = 85_655_040


def _config(preset="test", size="base"):
  c = configs_vision.data2vec_vision(size)
  getattr(configs_vision, f"{preset}_preset")(c)
  return c


@functools.lru_cache(maxsize=None)
def _test_model():
  """``(config, objective, params)`` of the ``:test`` preset, initialised once (jit)."""
  c = _config("test")
  obj = registry.get("objective", "data2vec")(c)
  return c, obj, jax.jit(obj.init)(jax.random.key(0), obj.modality.dummy_batch(c.data))


# ----------------------------------------------------------------------------- BEiT masks


def _beit_reference(r: random.Random, h, w, n, mn, mx, min_aspect=0.3):
  """BEiT's MaskingGenerator as published (Python ``random``): may under-fill, may leave isolated
  blocks below the minimum."""
  lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
  mask = np.zeros((h, w), bool)
  count = 0
  while count < n:
    budget = min(n - count, mx)
    delta = 0
    for _ in range(10):
      area = r.uniform(mn, budget)
      ar = math.exp(r.uniform(lo, hi))
      bh, bw = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
      if bw < w and bh < h:
        top, left = r.randint(0, h - bh), r.randint(0, w - bw)
        new = bh * bw - mask[top:top + bh, left:left + bw].sum()
        if 0 < new <= budget:
          mask[top:top + bh, left:left + bw] = True
          delta = new
      if delta > 0:
        break
    if delta == 0:
      break
    count += delta
  return mask


@pytest.mark.parametrize("grid,n,mn,mx", [((14, 14), 120, 16, 196), ((8, 8), 39, 5, 64),
                                          ((4, 4), 10, 3, 16), ((14, 14), 75, 16, None)])
def test_beit_mask_exact_count_and_every_region_is_a_block(grid, n, mn, mx):
  rng = np.random.default_rng(0)
  for _ in range(300):
    m, blocks, grown = masking.beit_block_mask(rng, grid, n, mn, mx, return_blocks=True)
    assert m.shape == grid and m.dtype == bool and m.sum() == n
    labels, k = ndimage.label(m)  # 4-connectivity
    assert k >= 1 and np.bincount(labels.ravel())[1:].min() >= min(n, mn)
    assert blocks and blocks[0][2] * blocks[0][3] >= mn  # the first block has the minimum area
    for top, left, h, w in blocks:  # BEiT: blocks strictly smaller than the grid, inside it
      assert 0 < h < grid[0] and 0 < w < grid[1]
      assert 0 <= top <= grid[0] - h and 0 <= left <= grid[1] - w
      assert m[top:top + h, left:left + w].all()
    union = np.zeros(grid, bool)
    for top, left, h, w in blocks:
      union[top:top + h, left:left + w] = True
    assert union.sum() + grown == n  # the rest was grown


def test_beit_mask_deterministic_per_seed_and_different_across_seeds():
  a = [masking.beit_block_mask(np.random.default_rng(s)) for s in range(20)]
  b = [masking.beit_block_mask(np.random.default_rng(s)) for s in range(20)]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert len({x.tobytes() for x in a}) == 20


def test_beit_mask_statistics_match_the_beit_loop():
  """Where BEiT fills the mask, ours is the same process: the per-patch masking frequency maps
  over 1500 masks agree, and ours tops up about as many patches as BEiT leaves out."""
  r = random.Random(0)
  ref = [_beit_reference(r, 14, 14, 120, 16, 196) for _ in range(1500)]
  rng = np.random.default_rng(0)
  ours = [masking.beit_block_mask(rng, (14, 14), 120, 16, 196, return_blocks=True)
          for _ in range(1500)]
  freq_ref = np.mean(ref, axis=0)
  freq = np.mean([m for m, _, _ in ours], axis=0)
  assert np.abs(freq - freq_ref).max() < 0.06
  missing = 120 - np.mean([m.sum() for m in ref])
  grown = np.mean([g for _, _, g in ours])
  assert 0 < missing < 2 and abs(grown - missing) < 0.5
  # BEiT leaves isolated regions below 16 patches in some masks; ours never does.
  small = [np.bincount(ndimage.label(m)[0].ravel())[1:].min() < 16 for m in ref]
  assert np.mean(small) > 0.02


def test_beit_mask_edge_cases():
  rng = np.random.default_rng(1)
  assert not masking.beit_block_mask(rng, (14, 14), 0).any()
  assert masking.beit_block_mask(rng, (6, 6), 36, 4).all()
  m = masking.beit_block_mask(rng, (14, 14), 7, 16)  # below the minimum: one grown region
  assert m.sum() == 7 and ndimage.label(m)[1] == 1
  with pytest.raises(ValueError, match="num_masking_patches"):
    masking.beit_block_mask(rng, (4, 4), 17)


# ----------------------------------------------------------------------------- model pieces


def _beit_index_reference(gh, gw):
  """BEiT RelativePositionBias index, written as its loop definition."""
  coords = [(i, j) for i in range(gh) for j in range(gw)]
  n = gh * gw
  r = (2 * gh - 1) * (2 * gw - 1)
  idx = np.zeros((n + 1, n + 1), np.int64)
  for a, (hi, wi) in enumerate(coords):
    for b, (hj, wj) in enumerate(coords):
      idx[a + 1, b + 1] = (hi - hj + gh - 1) * (2 * gw - 1) + (wi - wj + gw - 1)
  idx[0, :] = r       # cls → token
  idx[:, 0] = r + 1   # token → cls
  idx[0, 0] = r + 2   # cls → cls
  return idx


@pytest.mark.parametrize("grid", [(14, 14), (3, 3), (2, 3)])
def test_relative_position_index_matches_beit(grid):
  np.testing.assert_array_equal(vision.relative_position_index(grid), _beit_index_reference(*grid))


def test_shared_bias_gathers_the_table():
  mod = registry.get("attn_bias", "beit_shared")(num_heads=3)
  params = mod.init(jax.random.key(0), 17)["params"]
  table = params["relative_position_bias_table"]
  assert table.shape == ((2 * 4 - 1) ** 2 + 3, 3) and not np.asarray(table).any()  # zero init
  t = np.random.default_rng(0).standard_normal(table.shape).astype(np.float32)
  out = np.asarray(mod.apply({"params": {"relative_position_bias_table": t}}, 17))
  ref = t[_beit_index_reference(4, 4)].transpose(2, 0, 1)[None]
  assert out.shape == (1, 3, 17, 17) and out.dtype == np.float32
  np.testing.assert_array_equal(out, ref)
  with pytest.raises(ValueError, match="square grid"):
    mod.apply({"params": {"relative_position_bias_table": t}}, 18)


def test_patch_embedding_and_frontend_match_numpy():
  rng = np.random.default_rng(0)
  b, s, p, d = 2, 32, 8, 5
  img = rng.standard_normal((b, s, s, 3)).astype(np.float32)
  fe = vision.ImageFrontend(d, p)
  params = jax.tree.map(np.asarray, jax.jit(fe.init)(jax.random.key(0), {"image": img})["params"])
  kernel = rng.standard_normal((p, p, 3, d)).astype(np.float32)
  bias = rng.standard_normal(d).astype(np.float32)
  params["patch_embed"]["proj"] = {"kernel": kernel, "bias": bias}
  # NumPy conv k = stride = p: each output is one patch (row-major over the grid) · kernel.
  g = s // p
  patches = img.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
  ref = patches.astype(np.float64) @ kernel.reshape(-1, d) + bias
  mask = np.zeros((b, 1 + g * g), bool)
  mask[0, [0, 3, 7]] = True  # column 0 (CLS) must be ignored
  apply = jax.jit(fe.apply)
  out = apply({"params": params}, {"image": img, "mask": mask})
  f = np.asarray(out["features"])
  assert f.shape == (b, 1 + g * g, d) and not np.asarray(out["padding_mask"]).any()
  np.testing.assert_allclose(f[:, 0], np.broadcast_to(params["cls_token"], (b, d)), **TOL)
  expect = ref.copy()
  expect[0, [2, 6]] = params["mask_token"]
  np.testing.assert_allclose(f[:, 1:], expect, rtol=1e-5, atol=1e-5)
  plain = np.asarray(apply({"params": params}, {"image": img})["features"])
  np.testing.assert_allclose(plain[:, 1:], ref, rtol=1e-5, atol=1e-5)


def test_beit_init_distribution_and_depth_scaling():
  """timm trunc_normal_(std=.02, a=-.02, b=.02): std 0.02·0.5396 (N(0,1) truncated at ±1), all
  values in ±0.02; proj/fc2 of layer l (from 1) divided by sqrt(2l); biases and the table 0."""
  _, _, params = _test_model()
  tn_std = 0.02 * math.sqrt(1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / math.erf(
      1 / math.sqrt(2)))
  layers = params["encoder"]["layers"]
  for name, ref_scale in (("q_proj", None), ("v_proj", None), ("out_proj", True)):
    k = np.asarray(layers["self_attn"][name]["kernel"])
    for l in range(k.shape[0]):
      scale = math.sqrt(2 * (l + 1)) if ref_scale else 1.0
      x = k[l] * scale
      assert np.abs(x).max() <= 0.02 + 1e-7 and abs(x.std() / tn_std - 1) < 0.05, (name, l)
  fc2 = np.asarray(layers["fc2"]["kernel"])
  for l in range(fc2.shape[0]):
    x = fc2[l] * math.sqrt(2 * (l + 1))
    assert np.abs(x).max() <= 0.02 + 1e-7 and abs(x.std() / tn_std - 1) < 0.05
  for k in (params["head"]["proj"]["kernel"], params["frontend"]["patch_embed"]["proj"]["kernel"],
            layers["fc1"]["kernel"]):
    k = np.asarray(k)
    assert np.abs(k).max() <= 0.02 + 1e-7 and abs(k.std() / tn_std - 1) < 0.05
  assert not np.asarray(params["head"]["proj"]["bias"]).any()
  assert not np.asarray(layers["self_attn"]["q_proj"]["bias"]).any()
  assert "bias" not in layers["self_attn"]["k_proj"]  # BEiT: no key bias
  np.testing.assert_allclose(np.asarray(layers["gamma_1"]), 1e-4)
  assert not np.asarray(params["encoder"]["attn_bias"]["relative_position_bias_table"]).any()


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_parameter_count_base_matches_published():
  c = configs_vision.data2vec_vision("base")
  obj = registry.get("objective", "data2vec")(c)
  shapes = jax.eval_shape(obj.init, jax.random.key(0), obj.modality.dummy_batch(c.data))
  no_head = _count(shapes) - _count(shapes["head"])
  assert abs(no_head / HF_BASE_PARAMS - 1) < 0.01
  # Exactly: the HF figure + final LayerNorm + shared bias table + mask token (+ a mask_emb if
  # the shared objective still creates one for input-masking modalities).
  extra = 2 * 768 + (27 * 27 + 3) * 12 + 768 + (_count(shapes["mask_emb"]) if "mask_emb" in
                                                shapes else 0)
  assert no_head == HF_BASE_PARAMS + extra
  assert _count(shapes["head"]) == 768 * 768 + 768


def test_summary_cli_prints_the_total_with_head():
  c = configs_vision.data2vec_vision("base")
  obj = registry.get("objective", "data2vec")(c)
  total = _count(jax.eval_shape(obj.init, jax.random.key(0), obj.modality.dummy_batch(c.data)))
  out = subprocess.run([sys.executable, "-m", "d2vjax.summary",
                        f"--config={os.path.join(ROOT, 'configs', 'vision_base.py')}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip().splitlines()[-1] == f"total_params: {total}"


# ----------------------------------------------------------------------------- targets / loss


def _np_ln(x, eps=1e-5):
  x = x.astype(np.float64)
  m = x.mean(-1, keepdims=True)
  return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + eps)


@pytest.mark.parametrize("layer_norm", ["layer", "none"])
def test_layer_norm_of_average_targets_match_numpy(layer_norm):
  rng = np.random.default_rng(0)
  lr = (rng.standard_normal((5, 2, 7, 16)) * 3 + 1).astype(np.float32)
  y = targets.build_targets(jnp.asarray(lr), None, top_k=3, layer_norm_type=layer_norm,
                            final_norm_type="layer", eps=1e-5)
  per = _np_ln(lr[-3:]) if layer_norm == "layer" else lr[-3:].astype(np.float64)
  np.testing.assert_allclose(np.asarray(y), _np_ln(per.mean(0)), rtol=1e-5, atol=1e-5)


def test_smooth_l1_beta_2_matches_the_engine_mean():
  """engine_for_cyclical: F.smooth_l1_loss(pred, target, beta=2) (mean over masked rows × D) ==
  regression_loss(beta=2, scale=1/D) / count."""
  rng = np.random.default_rng(0)
  d = 8
  pred = rng.standard_normal((3, 5, d)).astype(np.float32) * 3  # |diff| both sides of β = 2
  tgt = rng.standard_normal((3, 5, d)).astype(np.float32)
  w = rng.random((3, 5)) < 0.6
  diff = np.abs(pred - tgt).astype(np.float64)[w]
  assert (diff < 2).any() and (diff >= 2).any()
  ref = np.where(diff < 2, 0.5 * diff ** 2 / 2, diff - 1).mean()
  s, n = losses.regression_loss(jnp.asarray(pred), jnp.asarray(tgt), jnp.asarray(w), beta=2.0,
                                scale=1.0 / d)
  np.testing.assert_allclose(float(s) / float(n), ref, **TOL)


def test_loss_wiring_matches_numpy():
  """Student: masked patches → mask token → encoder → final LN → head; teacher: EMA'd frontend
  + encoder on the clean image; targets LN → mean of the top K → LN; smooth L1 at masked
  patches only."""
  c, obj, params = _test_model()
  batch = obj.modality.dummy_batch(c.data, 2)
  rng = np.random.default_rng(0)
  batch["image"] = rng.standard_normal(batch["image"].shape).astype(np.float32)
  fn = obj.modality.mask_fn(c.masking)
  batch = {k: v for k, v in fn(np.random.default_rng(1), batch).items()}

  @jax.jit
  def run(params, batch):
    # A teacher that differs from the student (as after EMA steps).
    teacher = jax.tree.map(lambda x: x + 0.01, obj.init_teacher(params))
    loss, metrics = obj.loss(params, teacher, batch, jax.random.key(0), train=False)
    pred = obj.model.apply({"params": params}, obj.modality.student_inputs(batch), False)
    _, lr, _ = obj.encode({**params, **teacher}, {"image": batch["image"]})
    return loss, metrics, pred, lr

  assert sorted(obj.ema_scope) == ["encoder", "frontend"]  # the whole network (ModelEmaV2)
  loss, metrics, pred, lr = run(params, batch)
  y = _np_ln(_np_ln(np.asarray(lr)[-c.targets.top_k:]).mean(0))
  diff = np.abs(np.asarray(pred, np.float64) - y)[batch["mask"]]
  ref = np.where(diff < 2, 0.25 * diff ** 2, diff - 1).sum(-1).mean() * c.loss.scale
  np.testing.assert_allclose(float(loss), ref, rtol=1e-4)
  assert float(metrics["masked_count"]) == 2 * c.masking.num_masking_patches
  assert not batch["mask"][:, 0].any()


def test_beit_weight_decay_exemptions_and_cosine_floor():
  """BEiT's optim_factory: no decay for 1-D params and biases (LN, γ, q/v biases) and the CLS
  token; the mask token, bias table and kernels are decayed. The cosine ends at min_lr 1e-5."""
  c, obj, params = _test_model()
  ones = jax.tree.map(jnp.ones_like, params)  # zero gradients: the update is -lr·wd·p or 0
  lr = 0.5
  tx = optim.make_optimizer(c.optim, lambda n: lr, ones, obj.frozen)
  upd, _ = tx.update(jax.tree.map(jnp.zeros_like, ones), tx.init(ones), ones)
  step = {ema.path_str(k): float(np.asarray(u).reshape(-1)[0])
          for k, u in jax.tree_util.tree_flatten_with_path(upd)[0]}
  decayed = {k for k, u in step.items() if u == pytest.approx(-lr * c.optim.weight_decay)}
  assert decayed | {k for k, u in step.items() if u == 0.0} == set(step)
  assert decayed == {
      "frontend/mask_token", "frontend/patch_embed/proj/kernel", "head/proj/kernel",
      "encoder/attn_bias/relative_position_bias_table", "encoder/layers/fc1/kernel",
      "encoder/layers/fc2/kernel"} | {f"encoder/layers/self_attn/{n}/kernel" for n in (
          "q_proj", "k_proj", "v_proj", "out_proj")}
  lr_fn = optim.make_schedule(c.optim, 100, 10)
  assert float(lr_fn(0)) == 0.0 and float(lr_fn(10)) == pytest.approx(c.optim.peak_lr)
  assert float(lr_fn(100)) == pytest.approx(1e-5)


# ----------------------------------------------------------------------------- end to end


def test_train_run_end_to_end_test_preset(tmp_path):
  c = _config("test")
  c.num_devices = 1
  workdir = str(tmp_path / "run")
  assert train.run(c, workdir) == 0
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  logged = [r for r in rows if "loss" in r]
  assert [r["step"] for r in logged] == list(range(1, 9))
  for r in logged:
    assert np.isfinite(r["loss"]) and r["target_var"] > c.guard.min_value
    assert r["masked_frac"] == pytest.approx(10 / 17)
  # Embedded images include grey and RGBA files: converted and counted, never fatal.
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["stop_reason"] == "finished" and summary["total_images"] == 32
  assert summary["bad_inputs"].get("converted_gray", 0) > 0
  assert checkpointing.latest_step(os.path.join(workdir, "checkpoints")) == 8
  out = os.path.join(workdir, "export", "params.msgpack")
  _, params, config = export.load_model(out)  # checks the tree against the rebuilt model
  assert config.modality == "vision" and params["frontend"]["cls_token"].shape == (64,)


def _code_words(path):
  """Identifiers, attribute names and string literals of a module, without comments and
  docstrings (prose may name modalities; code must not branch on them)."""
  import ast
  tree = ast.parse(open(path, encoding="utf-8").read())
  docs = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        docs.add(id(body[0].value))
  words = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Name):
      words.append(node.id)
    elif isinstance(node, ast.Attribute):
      words.append(node.attr)
    elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      words.append(node.name)
    elif isinstance(node, ast.arg):
      words.append(node.arg)
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
      words.append(node.value)
  return " ".join(words).lower()


def test_shared_code_names_no_modality():
  names = ("speech", "vision", "text", "audio", "image")
  for rel in ("d2vjax/objectives/data2vec.py", "d2vjax/step.py", "d2vjax/train.py"):
    # MetricWriter.write_text writes a text record; it names no modality.
    code = _code_words(os.path.join(ROOT, rel)).replace("write_text", "")
    # Whole words ('speech_', '"text"'), not substrings ('contextualize').
    found = [w for w in names if re.search(rf"(?<![a-z]){w}(?![a-z])", code)]
    assert not found, (rel, found)
  # The check sees code: a modality branch would be caught.
  assert re.search(r"(?<![a-z])vision(?![a-z])",
                   _code_words(os.path.join(ROOT, "d2vjax", "modalities", "vision.py")))
