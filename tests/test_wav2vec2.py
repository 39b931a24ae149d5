"""wav2vec 2.0 objective against NumPy recomputations and published figures (issue 6)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2vjax import configs_lib, registry
from d2vjax.models import quantizer as quantizer_lib
from d2vjax.objectives import wav2vec2 as w2v


def _objective(size="base", preset=True):
  c = configs_lib.wav2vec2_speech(size)
  if preset:
    configs_lib.test_preset(c)
  return c, registry.get("objective", "wav2vec2")(c)


def _batch(c, b=4, seed=0):
  rng = np.random.default_rng(seed)
  batch = {"audio": rng.standard_normal((b, 16000)).astype(np.float32),
           "padding_mask": np.zeros((b, 16000), bool)}
  return registry.get("modality", "speech").mask_fn(c.masking)(rng, batch)


@pytest.mark.parametrize("size,expected", [("base", 95_044_608), ("large", 317_390_592)])
def test_parameter_count_matches_hugging_face(size, expected):
  """Hugging Face Wav2Vec2ForPreTraining: 95,044,608 (Base) / 317,390,592 (Large); paper 95M/317M."""
  c, obj = _objective(size, preset=False)
  dummy = obj.modality.dummy_batch(c.data)
  shapes = jax.eval_shape(obj.init, jax.random.key(0), dummy)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert abs(n - expected) / expected < 0.005
  assert n == expected


def test_temperature_schedule():
  for step in (0, 1000, 100_000, 277_000, 400_000):
    want = max(2.0 * 0.999995 ** step, 0.5)
    np.testing.assert_allclose(float(quantizer_lib.temperature(step)), want, rtol=1e-5)
  assert float(quantizer_lib.temperature(10 ** 7, min_temp=0.1)) == pytest.approx(0.1)


def test_negatives_are_other_masked_frames_of_the_same_row():
  rng = np.random.default_rng(0)
  b, t, n = 6, 50, 100
  mask = np.zeros((b, t), bool)
  lengths = rng.integers(20, t + 1, b)
  for i, length in enumerate(lengths):  # padding beyond `length`, masks inside it only
    mask[i, rng.choice(length, rng.integers(2, length // 2), replace=False)] = True
  idx = np.asarray(w2v.sample_negatives(jax.random.key(1), jnp.asarray(mask), n))
  assert idx.shape == (b, t, n)
  for i in range(b):
    for j in np.flatnonzero(mask[i]):
      assert mask[i, idx[i, j]].all()  # only masked frames (hence never padding)
      assert (idx[i, j] != j).all()  # never the frame itself
      assert (idx[i, j] < lengths[i]).all()
    # With replacement and uniform: every other masked frame is drawn at some point.
    masked = np.flatnonzero(mask[i])
    drawn = set(idx[i, masked].reshape(-1).tolist())
    assert drawn == set(masked.tolist())


def _np_cos(a, b_):
  a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
  b_ = b_ / np.maximum(np.linalg.norm(b_, axis=-1, keepdims=True), 1e-8)
  return np.sum(a * b_, axis=-1)


def test_contrastive_logits_match_numpy_with_neg_is_pos():
  rng = np.random.default_rng(0)
  b, t, f, n, g = 2, 7, 16, 5, 2
  c = rng.standard_normal((b, t, f)).astype(np.float32)
  q = rng.standard_normal((b, t, f)).astype(np.float32)
  codes = rng.integers(0, 50, (b, t, g)).astype(np.int32)
  neg_idx = rng.integers(0, t, (b, t, n)).astype(np.int32)
  # Force collisions: frame 3's first distractor has frame 3's codes exactly.
  codes[0, 5] = codes[0, 3]
  neg_idx[0, 3, 0] = 5
  got = np.asarray(w2v.contrastive_logits(c, q, codes, neg_idx, 0.1))
  want = np.zeros((b, t, 1 + n), np.float32)
  for i in range(b):
    for j in range(t):
      want[i, j, 0] = _np_cos(c[i, j], q[i, j]) / 0.1
      for k in range(n):
        m = neg_idx[i, j, k]
        same = (codes[i, m] == codes[i, j]).all()
        want[i, j, 1 + k] = -np.inf if same else _np_cos(c[i, j], q[i, m]) / 0.1
  assert np.isneginf(got[0, 3, 1])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_loss_equals_numpy_recomputation():
  """Eval-mode loss (no Gumbel noise, no dropout) recomputed in NumPy from the model outputs."""
  c, obj = _objective()
  batch = _batch(c)
  params = obj.init(jax.random.key(0), batch)
  rng = jax.random.key(3)
  loss, m = obj.loss(params, {}, batch, rng, train=False, step=0)
  _, _, k_neg = jax.random.split(rng, 3)
  out = obj.model.apply({"params": params}, batch, jnp.asarray(batch["mask"]), 2.0, False)
  w = np.asarray(batch["mask"]) & ~np.asarray(out["padding_mask"])
  neg_idx = np.asarray(w2v.sample_negatives(k_neg, jnp.asarray(w), 100))
  cc, qq, codes = (np.asarray(out[k]) for k in ("c", "q", "codes"))
  ce_sum, count = 0.0, 0
  for i, j in zip(*np.nonzero(w)):
    negs = neg_idx[i, j]
    logits = [_np_cos(cc[i, j], qq[i, j]) / 0.1]
    for k in negs:
      logits.append(-np.inf if (codes[i, k] == codes[i, j]).all() else
                    _np_cos(cc[i, j], qq[i, k]) / 0.1)
    logits = np.array(logits, np.float64)
    ce_sum += np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[0]
    count += 1
  gv = 640
  diversity = (gv - float(out["prob_ppl"])) / gv
  pen = float(np.mean(np.square(np.asarray(out["cnn"], np.float64))))
  want = (ce_sum + 0.1 * diversity * count + 10.0 * pen * count) / count
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  np.testing.assert_allclose(float(m["loss_contrastive"]), ce_sum / count, rtol=2e-5)
  np.testing.assert_allclose(float(m["diversity"]), diversity, rtol=1e-6)
  assert float(m["masked_count"]) == count


def test_prob_perplexity_matches_numpy():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, 10, 32)).astype(np.float32)
  weights = rng.random((3, 10)) < 0.5
  qz = quantizer_lib.GumbelQuantizer(groups=2, num_vars=8, vq_dim=6)
  p = qz.init({"params": jax.random.key(0)}, x, weights, 2.0, False)
  out = qz.apply(p, x, weights, 2.0, False)
  wp = p["params"]["weight_proj"]
  logits = (x @ np.asarray(wp["kernel"]) + np.asarray(wp["bias"])).reshape(3, 10, 2, 8)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  avg = probs[weights].mean(0)
  want = np.sum(np.exp(-np.sum(avg * np.log(avg + 1e-7), -1)))
  np.testing.assert_allclose(float(out["prob_ppl"]), want, rtol=1e-5)
  hard = np.eye(8)[logits.argmax(-1)][weights].mean(0)
  np.testing.assert_allclose(float(out["code_ppl"]),
                             np.sum(np.exp(-np.sum(hard * np.log(hard + 1e-7), -1))), rtol=1e-5)
  # Evaluation picks the argmax entry of each group's codebook.
  codebook = np.asarray(p["params"]["vars"]).reshape(2, 8, 3)
  want_q = np.concatenate([codebook[0][logits.argmax(-1)[..., 0]],
                           codebook[1][logits.argmax(-1)[..., 1]]], -1)
  np.testing.assert_allclose(np.asarray(out["q"]), want_q, rtol=1e-6)


def test_diversity_term_and_gradient_scale_with_masked_count():
  """The summed loss carries α·diversity·count (fairseq multiplies by the sample size), so its
  gradient w.r.t. diversity is α·count and the normalised loss's is α for any count. The Hugging
  Face Flax bug (user-needs A3) was a diversity term not scaled by the count."""
  c, _ = _objective()
  for count in (10.0, 40.0, 333.0):
    total = lambda d, f: w2v.total_loss_sum(5.0 * count, count, d, f, c.loss)
    d_div, d_pen = jax.grad(total, argnums=(0, 1))(0.5, 0.2)
    np.testing.assert_allclose(float(d_div), 0.1 * count, rtol=1e-6)
    np.testing.assert_allclose(float(d_pen), 10.0 * count, rtol=1e-6)
    d_mean = jax.grad(lambda d: total(d, 0.2) / count)(0.5)
    np.testing.assert_allclose(float(d_mean), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(total(0.5, 0.2)), (5.0 + 0.05 + 2.0) * count, rtol=1e-6)


def test_codebook_and_weight_proj_get_gradients_and_init_loss_is_log_101():
  c, obj = _objective()
  c.model.encoder.dropout = 0.0
  batch = _batch(c, b=8)
  params = obj.init(jax.random.key(0), batch)
  (loss, m), g = jax.value_and_grad(obj.loss, has_aux=True)(params, {}, batch,
                                                            jax.random.key(1), step=0)
  for path in (("quantizer", "vars"), ("quantizer", "weight_proj", "kernel"),
               ("project_q", "kernel"), ("final_proj", "kernel"), ("mask_emb",)):
    node = g
    for k in path:
      node = node[k]
    assert np.abs(np.asarray(node)).max() > 0, path
  # At initialisation the positive is indistinguishable from 100 distractors: CE ≈ log(101),
  # accuracy ≈ 1/101.
  assert abs(float(m["loss_contrastive"]) - math.log(101)) < 0.3
  assert float(m["accuracy"]) < 0.1
  assert float(m["temp"]) == pytest.approx(2.0)


def test_contrastive_task_is_learnable_on_a_fixed_batch():
  """Reliability check (user-needs A1 ii): on one fixed batch without dropout the contrastive
  loss falls far below chance (log 101 ≈ 4.62) and the codebook stays in use (prob ppl ≫ 2)."""
  from d2vjax import optim, step as step_lib
  c, _ = _objective()
  c.model.encoder.update(dict(dropout=0.0, attention_dropout=0.0))
  c.model.update(dict(dropout_input=0.0, dropout_features=0.0))
  obj = registry.get("objective", "wav2vec2")(c)
  batch = _batch(c, b=4, seed=3)
  lr_fn = optim.make_schedule(c.optim, 100, 5)
  tx = optim.make_optimizer(c.optim, lr_fn,
                            jax.eval_shape(obj.init, jax.random.key(0), batch), obj.frozen)
  state = jax.jit(lambda r: step_lib.init_state(obj, tx, r, batch))(jax.random.key(0))
  no_ema = type("NoEma", (), dict(decay=1.0, end_decay=1.0, anneal_steps=0))
  step = jax.jit(step_lib.make_train_step(obj, tx, lr_fn, no_ema, 0), donate_argnums=0)
  first = None
  for _ in range(60):
    state, m = step(state, batch)
    first = first if first is not None else float(m["loss_contrastive"])
  assert abs(first - math.log(101)) < 0.3
  assert float(m["loss_contrastive"]) < 0.5 * first
  assert float(m["prob_ppl"]) > 10
