"""data2vec 2.0 model pieces and objective against NumPy references (fairseq-spec §1.7, §2.6,
§6.2–6.8): gather/restore, ALiBi, 2-D sin-cos positions, Decoder1d/2d (output shape, residual
rule, SamePad), no leak of masked content through the conv positions, teacher targets, the loss
wiring, the CLS loss formula, one teacher pass per ORIGINAL sample (jaxpr row count), EMA scopes
and a single compiled program per batch shape.

Tolerances: fp32 JAX vs float64 NumPy, ``rtol=1e-4`` / ``atol=1e-5``.
"""

import functools
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from d2vjax import registry
from d2vjax.models import d2v2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = dict(rtol=1e-4, atol=1e-5)


def load_config(name, arg="test"):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def first_batch(c, objective):
  mod = objective.modality
  ex, _ = mod.examples(c.data, "train")
  it = mod.make_iterator(c.data, examples=ex, seed=0, batch_multiple=1, process_index=0,
                         process_count=1, batch_fn=mod.mask_fn(c.masking))
  for _ in range(3):
    b = next(it)
    yield {k: v for k, v in b.items() if not k.startswith("_")}


@functools.lru_cache(maxsize=None)
def setup(name):
  """(config, objective, params) of a config's test preset (cached: compiling is the cost)."""
  c = load_config(name)
  obj = registry.get("objective", c.objective)(c)
  params = jax.jit(obj.init)(jax.random.key(0), obj.modality.dummy_batch(c.data))
  return c, obj, params


def np_gelu(x):
  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def np_ln(x, eps=1e-5):
  m = x.mean(-1, keepdims=True)
  return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + eps)


# ----------------------------------------------------------------------------- gather / restore


def test_gather_restore_round_trip():
  rng = np.random.default_rng(0)
  n, t, d, k = 5, 12, 3, 7
  mask = np.ones((n, t), bool)
  for r in range(n):
    mask[r, rng.choice(t, k, replace=False)] = False
  x = rng.standard_normal((n, t, d)).astype(np.float32)
  fill = rng.standard_normal((n, t - k, d)).astype(np.float32)
  keep, restore = d2v2.mask_order(jnp.asarray(mask), k)
  keep = np.asarray(keep)
  # Stable argsort: kept positions ascending.
  for r in range(n):
    np.testing.assert_array_equal(keep[r], np.flatnonzero(~mask[r]))
  kept = d2v2.gather_rows(jnp.asarray(x), jnp.asarray(keep))
  np.testing.assert_array_equal(np.asarray(kept), np.stack([x[r, ~mask[r]] for r in range(n)]))
  out = np.asarray(d2v2.restore_rows(kept, jnp.asarray(fill), restore))
  want = x.copy()
  for r in range(n):
    want[r, mask[r]] = fill[r]  # fill goes to the masked positions in ascending order
  np.testing.assert_array_equal(out, want)


# ----------------------------------------------------------------------------- positions


def test_alibi_slopes_and_gathered_bias():
  s12 = d2v2.alibi_slopes(12)
  want = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]
  np.testing.assert_allclose(s12, want)  # spec §1.7
  np.testing.assert_allclose(d2v2.alibi_slopes(16), [2.0 ** (-0.5 * (h + 1)) for h in range(16)])
  np.testing.assert_allclose(d2v2.alibi_slopes(8), [2.0 ** -(h + 1) for h in range(8)])
  # Full T×T bias gathered at kept rows/cols == bias from the kept positions (spec §1.7).
  t, pos = 10, np.array([[0, 3, 4, 9], [1, 2, 5, 8]])
  slopes = s12[:4] * np.array([1.0, 0.5, 2.0, 0.0])
  full = -slopes[:, None, None] * np.abs(np.arange(t)[:, None] - np.arange(t)[None, :])
  want = np.stack([full[:, p][:, :, p] for p in pos])
  got = d2v2.alibi_bias(jnp.asarray(pos), jnp.asarray(slopes))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_sincos_2d_matches_mae():
  side, dim = 4, 16

  def one(d, pos):  # MAE get_1d_sincos_pos_embed_from_grid
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64))
  want = np.concatenate([one(dim // 2, grid[0]), one(dim // 2, grid[1])], axis=1)
  np.testing.assert_allclose(d2v2.sincos_2d(side, dim), want, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- decoders


def np_conv(x, w, b, groups, k, spatial):
  """Grouped conv, zero padding k//2 per side, first ``size`` outputs kept (SamePad).
  x [N, *S, C], w [*k, C/g, O] → [N, *S, O]."""
  n, c = x.shape[0], x.shape[-1]
  sizes = x.shape[1:-1]
  o = w.shape[-1]
  cg, og = c // groups, o // groups
  xp = np.pad(x, [(0, 0)] + [(k // 2, k // 2)] * spatial + [(0, 0)])
  out = np.zeros((n,) + sizes + (o,))
  for g in range(groups):
    xs = xp[..., g * cg:(g + 1) * cg]
    ws = w[..., g * og:(g + 1) * og]
    for off in np.ndindex(*(k,) * spatial):
      sl = tuple(slice(off[a], off[a] + sizes[a]) for a in range(spatial))
      out[..., g * og:(g + 1) * og] += xs[(slice(None),) + sl] @ ws[off]
  return out + b


def np_decoder(p, x, groups, k, spatial, residual, proj_layers):
  body = p["body"]
  j = 0
  while f"conv_{j}" in body:
    y = np_conv(x, body[f"conv_{j}"]["kernel"], body[f"conv_{j}"]["bias"], groups, k, spatial)
    y = np_gelu(np_ln(y))
    x = y + x if residual and y.shape[-1] == x.shape[-1] else y
    j += 1
  if proj_layers == 2:
    x = np_gelu(x @ body["proj_0"]["kernel"] + body["proj_0"]["bias"])
    return x @ body["proj_1"]["kernel"] + body["proj_1"]["bias"]
  return x @ body["proj"]["kernel"] + body["proj"]["bias"]


@pytest.mark.parametrize("kw", [
    dict(decoder_dim=16, kernel=7, num_layers=3, groups=4, residual=True, projection_layers=1),
    dict(decoder_dim=24, kernel=4, num_layers=2, groups=1, residual=False, projection_layers=2),
])
def test_decoder1d_matches_numpy_and_residual_rule(kw):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 9, 8)).astype(np.float32)
  dec = d2v2.Decoder1d(8, **kw)
  out, variables = jax.jit(dec.init_with_output)(jax.random.key(0), jnp.asarray(x))
  out, params = np.asarray(out), variables["params"]
  assert out.shape == (2, 9, 8)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want = np_decoder(p, x.astype(np.float64), kw["groups"], kw["kernel"], 1, kw["residual"],
                    kw["projection_layers"])
  np.testing.assert_allclose(out, want, **TOL)
  if kw["residual"]:
    # The first block changes the width (8 → 16) so it has no residual; the others do. A
    # reference that adds a residual to every same-width block must disagree when we drop it.
    wrong = np_decoder(p, x.astype(np.float64), kw["groups"], kw["kernel"], 1, False, 1)
    assert not np.allclose(out, wrong, **TOL)


def test_decoder2d_matches_numpy():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 16, 8)).astype(np.float32)
  dec = d2v2.Decoder2d(8, decoder_dim=8, kernel=3, num_layers=2, groups=2)
  out, variables = jax.jit(dec.init_with_output)(jax.random.key(0), jnp.asarray(x))
  out, params = np.asarray(out), variables["params"]
  assert out.shape == (2, 16, 8)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want = np_decoder(p, x.reshape(2, 4, 4, 8).astype(np.float64), 2, 3, 2, True, 1)
  np.testing.assert_allclose(out, want.reshape(2, 16, 8), **TOL)


# ----------------------------------------------------------------------------- objective


def test_masked_content_does_not_leak_into_student():
  """Conv positions run on the zero-masked sequence and only kept frames are encoded: changing
  the features at masked positions leaves the student's encoder output unchanged."""
  c, obj, params = setup("speech_d2v2_base")
  rng = np.random.default_rng(0)
  n, t, d = 4, 20, obj.encoder_cfg.dim
  k = obj.num_kept(t)
  mask = np.ones((n, t), bool)
  for r in range(n):
    mask[r, rng.choice(t, k, replace=False)] = False
  x = rng.standard_normal((n, t, d)).astype(np.float32)
  x2 = np.where(mask[..., None], rng.standard_normal((n, t, d)) * 5, x).astype(np.float32)
  keep, _ = d2v2.mask_order(jnp.asarray(mask), k)
  pad = jnp.zeros((n, t), bool)
  run = jax.jit(lambda v: obj.model.apply({"params": params}, v, pad, False, jnp.asarray(mask),
                                          keep, method="contextualize")[0])
  a, b = run(x), run(x2)
  assert a.shape == (n, k, d)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  # Without zeroing (mask=None but the same kept positions), the masked content would leak.
  leak = jax.jit(lambda v: obj.model.apply({"params": params}, v, pad, False, None, keep,
                                           method="contextualize")[0])
  assert not np.allclose(np.asarray(leak(x)), np.asarray(leak(x2)), atol=1e-3)


def np_instance_norm(x, pad, eps=1e-5):
  """Over the valid time steps of each row (x [..., B, T, D], pad [B, T])."""
  out = np.empty_like(x)
  for r in range(x.shape[-3]):
    v = x[..., r, ~pad[r], :]
    mu = v.mean(-2, keepdims=True)
    out[..., r, :, :] = (x[..., r, :, :] - mu) / np.sqrt(((v - mu) ** 2).mean(-2, keepdims=True)
                                                         + eps)
  return out


@pytest.mark.parametrize("name", ["speech_d2v2_base", "vision_d2v2_base", "text_d2v2_base"])
def test_targets_and_loss_match_numpy(name):
  c, obj, params = setup(name)
  batch = next(first_batch(c, obj))
  teacher = jax.tree.map(lambda a: a * 1.01, obj.init_teacher(params))
  b, m, t = batch["mask"].shape
  rng = jax.random.key(3)
  mask = np.asarray(batch["mask"]).reshape(b * m, t)
  keep, restore = d2v2.mask_order(jnp.asarray(mask), obj.num_kept(t))

  @jax.jit
  def parts(params, teacher, batch):
    """Every intermediate the NumPy reference needs, from separate model calls."""
    inputs = obj.modality.teacher_inputs(batch)
    f = obj.model.apply({"params": params}, inputs, False, method="features")
    local, pad = f["features"], f["padding_mask"]
    t_params = {**params, **teacher}
    t_local = (obj.model.apply({"params": t_params}, inputs, False, method="features")[
        "features"] if "frontend" in teacher else local)
    # The teacher's layer results with the extra tokens (stripped by the reference).
    _, res = obj.model.apply({"params": t_params}, t_local, pad, False, None, None, True,
                             method="contextualize")
    y = obj.targets(params, teacher, inputs, local, pad)
    pad_m = jnp.repeat(pad, m, axis=0)
    enc, _ = obj.model.apply({"params": params}, jnp.repeat(local, m, axis=0), pad_m, False,
                             jnp.asarray(mask), keep, True, method="contextualize")
    rngs = {"dropout": jax.random.fold_in(rng, 0), "noise": jax.random.fold_in(rng, 1)}
    pred = obj.model.apply({"params": params}, enc[:, obj.extra_tokens:], restore, False,
                           method="decode", rngs=rngs)
    loss, met = obj.loss(params, teacher, batch, rng, train=False)
    return dict(pad=pad, res=res, y=y, enc=enc, pred=pred, loss=loss, met=met)

  out = jax.tree.map(np.asarray, parts(params, teacher, batch))
  pad, res = out["pad"], out["res"]
  res = np.asarray(res, np.float64)[:, :, obj.extra_tokens:]
  assert res.shape[:3] == (c.model.encoder.num_layers or 2, b, t)
  k = c.targets.top_k
  norms = {"instance": lambda v: np_instance_norm(v, pad), "layer": np_ln, "none": lambda v: v}
  y = norms[c.targets.final_norm](norms[c.targets.layer_norm](res[-k:]).mean(0))
  np.testing.assert_allclose(out["y"], y, rtol=1e-4, atol=1e-4)

  # Loss wiring (eval mode: no dropout; the noise tokens come from the 'noise' stream).
  loss, met, enc = out["loss"], out["met"], out["enc"]
  pred = out["pred"].astype(np.float64)
  pad_m = np.repeat(pad, m, axis=0)
  y_rep = np.repeat(y, m, axis=0)  # sample-major clones
  scale = c.loss.scale if c.loss.scale > 0 else pred.shape[-1] ** -0.5
  per = ((pred - y_rep) ** 2).sum(-1) * scale
  w = mask & ~pad_m  # padded positions never enter the loss
  want = per[w].sum() / w.sum()
  assert float(met["masked_count"]) == w.sum()
  assert (mask.sum(1) == t - obj.num_kept(t)).all()
  if c.loss.cls_weight > 0:
    cls = np.asarray(enc[:, 0], np.float64)
    tgt = np.repeat(np.stack([y[r, ~pad[r]].mean(0) for r in range(b)]), m, axis=0)
    rows = c.loss.cls_rows or b * m
    cls_want = c.loss.cls_weight * rows * (((cls - tgt) ** 2).sum(-1) * scale).mean()
    np.testing.assert_allclose(float(met["cls_loss"]), cls_want, rtol=1e-4)
    want += cls_want
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)


def test_cls_loss_formula():
  c = load_config("vision_d2v2_base")
  c.loss.cls_rows = 256
  obj = registry.get("objective", c.objective)(c)
  rng = np.random.default_rng(0)
  b, m, t, d = 2, 3, 5, 4
  y = rng.standard_normal((b, t, d))
  pred = rng.standard_normal((b * m, d))
  pad = np.zeros((b, t), bool)
  pad[1, 3:] = True  # padded positions do not enter the CLS target
  got = obj.cls_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(y, jnp.float32),
                     jnp.asarray(pad), m)
  tgt = np.stack([y[0].mean(0), y[1, :3].mean(0)])
  per = ((pred - np.repeat(tgt, m, axis=0)) ** 2).sum(-1) / np.sqrt(d)
  np.testing.assert_allclose(float(got), 0.01 * 256 * per.mean(), rtol=1e-5)


def _dot_lhs_shapes(jaxpr):
  """lhs shapes of every dot_general in a jaxpr, recursing into scans/pjits/custom rules."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(tuple(eqn.invars[0].aval.shape))
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out.extend(_dot_lhs_shapes(inner))
  return out


@pytest.mark.parametrize("name", ["speech_d2v2_base", "vision_d2v2_base"])
def test_teacher_runs_once_per_original_sample(name):
  """The loss's jaxpr has trunk matmuls over (B, T, D) (teacher, one row per sample) and over
  (B·M, E+K, D) (student, kept tokens only), and none over (B·M, T, D): the teacher never sees
  the clones and the student never encodes masked positions."""
  c, obj, params = setup(name)
  batch = next(first_batch(c, obj))
  b, m, t = batch["mask"].shape
  d, e, k = obj.encoder_cfg.dim, obj.extra_tokens, obj.num_kept(t)
  teacher = obj.init_teacher(params)
  jaxpr = jax.make_jaxpr(lambda p: obj.loss(p, teacher, batch, jax.random.key(0)))(params)
  shapes = [s[:2] for s in _dot_lhs_shapes(jaxpr.jaxpr) if len(s) == 3 and s[-1] == d]
  # q, k, v and fc1 of the (scanned) block body; fc2 contracts the FFN width.
  assert shapes.count((b, e + t)) >= 4, shapes
  assert shapes.count((b * m, e + k)) >= 4, shapes
  assert (b * m, t) not in shapes and (b * m, e + t) not in shapes, shapes
  assert b * m != b  # the test would be vacuous with one clone


@pytest.mark.parametrize("name,scope", [
    ("speech_d2v2_base", {"context", "encoder"}),
    ("vision_d2v2_base", {"frontend", "context", "encoder"}),
    ("text_d2v2_base", {"encoder"})])
def test_ema_scopes_and_param_layout(name, scope):
  """Teacher scopes of spec §5.4/§6.6: the decoder is never EMA'd; speech reuses the student's
  CNN features, vision re-embeds with an EMA patch embedding, text EMAs the blocks only."""
  c, obj, params = setup(name)
  assert set(obj.init_teacher(params)) == scope
  assert "decoder" in params
  if name.startswith("speech"):
    assert params["context"]["alibi_scale"].shape == (c.model.encoder.num_heads,)
    np.testing.assert_array_equal(params["context"]["alibi_scale"], 1.0)
  if name.startswith("vision"):
    assert params["context"]["extra_tokens"].shape == (1, c.model.encoder.dim)
    assert "prenet" in params["context"]


def test_one_program_per_batch_shape():
  c, obj, params = setup("speech_d2v2_base")
  teacher = obj.init_teacher(params)
  fn = jax.jit(obj.loss)
  for batch in first_batch(c, obj):
    fn(params, teacher, batch, jax.random.key(0))
  assert fn._cache_size() == 1


def test_objective_names_no_modality():
  names = re.compile(r"\b(speech|audio|vision|image|images|text|waveform)\b", re.I)
  src = open(os.path.join(ROOT, "d2vjax", "objectives", "data2vec2.py")).read()
  assert not [l for l in src.splitlines() if names.search(l)]
