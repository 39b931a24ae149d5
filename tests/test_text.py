"""data2vec 1.0 text: model, masks, objective and training, against independent references.

References: the published RoBERTa/data2vec-text parameter count, NumPy recomputations of the
frontend, targets and losses, the exact coverage of fairseq's span masking, BERT's 15 % × 80/10/10
proportions, EMA semantics of fairseq-spec §5 (embeddings hard-copied, encoder averaged).
Tolerances: fp32 JAX vs float64 NumPy, ``rtol=1e-5``.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import text_base
from d2vjax import checkpointing, export, masking, metrics, optim, registry, train
from d2vjax import step as step_lib
from d2vjax.data import text as text_data
from d2vjax.data import tokenizer as tok_lib
from d2vjax.modalities.text import Text
from d2vjax.models import text as text_model
from d2vjax.objectives import losses

TOL = dict(rtol=1e-5, atol=1e-6)
V = 1000  # vocabulary of the synthetic batches: specials 0..3 and <mask> = 999
SPECIAL = tok_lib.special_ids(V)


def _config(num_layers=3, top_k=2):
  c = text_base.get_config("test")
  c.model.vocab_size = V
  c.model.encoder.num_layers = num_layers
  c.targets.top_k = top_k
  return c


def _token_batch(rng, b=4, t=32, lengths=(32, 20, 9, 27), vocab=V):
  """Rows ``<s> ids... </s> ids... </s> <pad>...`` with the given valid lengths."""
  tokens = np.full((b, t), tok_lib.PAD_ID, np.int32)
  for r, n in enumerate(lengths):
    tokens[r, :n] = rng.integers(4, vocab - 1, n)
    tokens[r, 0] = tok_lib.BOS_ID
    tokens[r, n - 1] = tok_lib.EOS_ID
    if n > 12:
      tokens[r, n // 2] = tok_lib.EOS_ID  # a sentence boundary inside the block
  pad = np.arange(t)[None, :] >= np.asarray(lengths)[:, None]
  return {"tokens": tokens, "padding_mask": pad}


def np_layer_norm(x, eps=1e-5):
  x = x.astype(np.float64)
  m = x.mean(-1, keepdims=True)
  return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + eps)


def np_smooth_l1(d, beta):
  ad = np.abs(d)
  return np.where(ad < beta, 0.5 * d ** 2 / beta, ad - 0.5 * beta)


def _perturbed(tree, rng, scale):
  return jax.tree.map(
      lambda a: np.asarray(a) + scale * rng.standard_normal(a.shape).astype(np.float32), tree)


# ----------------------------------------------------------------------------- model


def test_base_parameter_count_matches_roberta_base():
  """text Base with the RoBERTa vocabulary (50,265), regression head excluded: 124,054,272.
  Hugging Face reports 124,644,864 for Data2VecTextModel without its token-type table; that
  includes a pooler Linear(768→768) (590,592) which data2vec pre-training does not have:
  124,644,864 − 590,592 = 124,054,272 exactly (RobertaModel's 124,645,632 adds a 1 × 768
  token-type table on top)."""
  c = text_base.get_config()
  assert c.model.vocab_size == c.masking.vocab_size == c.data.vocab_size == 50265
  obj = registry.get("objective", "data2vec")(c)
  params = jax.eval_shape(obj.init, jax.random.key(0), Text.dummy_batch(c.data))
  rows = {name: n for name, _, n in metrics.parameter_table(params)[0]}
  assert set(rows) == {"frontend", "encoder", "head"}  # no mask_emb for input masking
  without_head = rows["frontend"] + rows["encoder"]
  assert without_head == 124_644_864 - 590_592
  assert abs(without_head - 124_644_864) / 124_644_864 < 0.01
  fe = params["frontend"]
  assert fe["embed_tokens"]["embedding"].shape == (50265, 768)
  assert fe["embed_positions"]["embedding"].shape == (514, 768)  # 512 + padding_idx + 1
  assert rows["head"] == 768 * 1536 + 1536 + 1536 * 768 + 768


def test_frontend_matches_numpy_and_fairseq_positions():
  """LN(E_tok[ids] + E_pos[padding_idx + 1 + t]) with pads zeroed; tables start N(0, 0.02) with a
  zero padding row; the bug-4881 view renumbers positions over the kept tokens (make_positions)."""
  rng = np.random.default_rng(0)
  mod = text_model.TextEmbedding(32, vocab_size=V, max_positions=40)
  batch = _token_batch(rng, t=32)
  params = jax.jit(mod.init)(jax.random.key(0), batch)["params"]
  for name in ("embed_tokens", "embed_positions"):
    w = np.asarray(params[name]["embedding"])
    assert np.all(w[1] == 0) and 0.015 < w[2:].std() < 0.025
  params = _perturbed(params, rng, 0.3)
  out = jax.jit(mod.apply)({"params": params}, batch)
  tok, pos = params["embed_tokens"]["embedding"], params["embed_positions"]["embedding"]
  ln = params["layernorm_embedding"]["norm"]
  pad = batch["padding_mask"]
  x = tok[batch["tokens"]] + pos[2 + np.arange(32)][None]
  want = np_layer_norm(x) * ln["scale"] + ln["bias"]
  want[pad] = 0
  np.testing.assert_allclose(np.asarray(out["features"]), want, **TOL)
  np.testing.assert_array_equal(np.asarray(out["padding_mask"]), pad)
  # make_positions: fairseq's cumsum over non-pad positions.
  holes = np.array([[False, True, False, False, True, True]])
  np.testing.assert_array_equal(np.asarray(text_model.make_positions(jnp.asarray(holes))),
                                [[2, 1, 3, 4, 1, 1]])
  with pytest.raises(ValueError, match="max_positions"):
    mod.apply({"params": params}, _token_batch(rng, b=1, t=48, lengths=(48,)))


# ----------------------------------------------------------------------------- masking


def test_bert_mask_proportions_and_special_tokens():
  """15 % of the non-special, non-pad tokens are chosen (per row floor(0.15 n + u)); of those 80 %
  become <mask>, 10 % a random regular id, 10 % stay; specials and pads are never touched."""
  rng = np.random.default_rng(1)
  lengths = rng.integers(20, 129, 3000)
  batch = _token_batch(rng, b=3000, t=128, lengths=lengths)
  tokens, pad = batch["tokens"], batch["padding_mask"]
  out, mask = masking.bert_mask(np.random.default_rng(2), tokens, pad, mask_token_id=V - 1,
                                vocab_size=V, special_ids=SPECIAL)
  assert out.dtype == np.int32 and mask.dtype == bool and out.shape == mask.shape == tokens.shape
  special = np.isin(tokens, SPECIAL)
  cand = ~pad & ~special
  assert not (mask & (pad | special)).any()
  np.testing.assert_array_equal(out[~mask], tokens[~mask])  # nothing outside the mask changes
  n = cand.sum(1)
  per_row = mask.sum(1)
  assert np.all((per_row == np.floor(0.15 * n)) | (per_row == np.floor(0.15 * n) + 1))
  total = mask.sum()
  # Expected chosen count sum(0.15 n) (probabilistic rounding is unbiased); 4σ of a Bernoulli sum.
  assert abs(total - 0.15 * n.sum()) < 4 * math.sqrt(len(n) / 4)
  as_mask = (out == V - 1) & mask
  kept = (out == tokens) & mask
  rand = mask & ~as_mask & ~kept
  for got, p in ((as_mask.sum(), 0.8), (kept.sum(), 0.1), (rand.sum(), 0.1)):
    assert abs(got / total - p) < 4 * math.sqrt(p * (1 - p) / total), (got / total, p)
  assert not np.isin(out[rand], SPECIAL).any()  # random ids are regular tokens
  assert out[rand].min() >= 4 and out[rand].max() < V - 1


def _span_coverage(sz, p, L):
  """Exact expected masked fraction of fairseq's span masking of one row of ``sz`` tokens:
  n = floor(p·sz/L + u) distinct starts from [0, sz); position i is covered unless none of its
  c_i = min(i + 1, L) covering starts is drawn: P = C(sz - c_i, n) / C(sz, n)."""
  x = p * sz / L
  lo = math.floor(x)
  total = 0.0
  for n, w in ((lo, 1 - (x - lo)), (lo + 1, x - lo)):
    for i in range(sz):
      total += w * (1 - math.comb(sz - min(i + 1, L), n) / math.comb(sz, n))
  return total / sz


def test_span_text_mask_coverage_matches_formula():
  rng = np.random.default_rng(3)
  sz, rows = 100, 4000
  batch = _token_batch(rng, b=rows, t=128, lengths=[sz] * rows)
  out, mask = masking.span_text_mask(np.random.default_rng(4), batch["tokens"],
                                     batch["padding_mask"], mask_token_id=V - 1,
                                     special_ids=SPECIAL)
  assert not (mask & batch["padding_mask"]).any()
  np.testing.assert_array_equal(out[mask], V - 1)  # all replaced by <mask>, none left or random
  np.testing.assert_array_equal(out[~mask], batch["tokens"][~mask])
  want = _span_coverage(sz, 0.35, 4)
  assert 0.29 < want < 0.32  # spans overlap and merge: under 35 % (30.6 % for 100 tokens)
  got = mask[:, :sz].mean()
  assert abs(got - want) < 0.004, (got, want)  # σ of the mean ≈ 0.0008
  # Position-wise: the first token is covered only by a start at 0 (fairseq covers <s>/</s>).
  np.testing.assert_allclose(mask[:, 0].mean(), 0.35 * sz / 4 / sz, atol=0.015)
  # mask_special=False keeps specials out of the mask.
  _, m2 = masking.span_text_mask(np.random.default_rng(4), batch["tokens"],
                                 batch["padding_mask"], mask_token_id=V - 1,
                                 special_ids=SPECIAL, mask_special=False)
  np.testing.assert_array_equal(m2, mask & ~np.isin(batch["tokens"], SPECIAL))


def test_mask_fn_dispatch_and_process_count_invariance():
  """``Text.mask_fn`` picks the masker by ``masking.kind``; a row's mask depends on its global
  row, not on how many processes share the batch."""
  c = _config()
  rng = np.random.default_rng(5)
  batch = _token_batch(rng, b=4, t=32)
  for kind in ("bert", "span"):
    c.masking.kind = kind
    fn = Text.mask_fn(c.masking)
    whole = fn(np.random.default_rng(7), dict(batch, _global_rows=4, _row_offset=0))
    halves = [fn(np.random.default_rng(7), {"tokens": batch["tokens"][o:o + 2],
                                            "padding_mask": batch["padding_mask"][o:o + 2],
                                            "_global_rows": 4, "_row_offset": o})
              for o in (0, 2)]
    for key in ("masked_tokens", "mask"):
      np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))
    assert whole["mask"].any()
  c.masking.kind = "whole_word"
  with pytest.raises(ValueError, match="masking.kind"):
    Text.mask_fn(c.masking)


# ----------------------------------------------------------------------------- losses / targets


def test_smooth_l1_beta4_matches_numpy_on_both_sides():
  rng = np.random.default_rng(6)
  pred = (6 * rng.standard_normal((3, 7, 16))).astype(np.float32)
  tgt = rng.standard_normal((3, 7, 16)).astype(np.float32)
  w = rng.random((3, 7)) < 0.6
  d = pred.astype(np.float64) - tgt
  assert 0.2 < (np.abs(d) >= 4).mean() < 0.8  # both branches exercised
  s, n = losses.regression_loss(jnp.asarray(pred), jnp.asarray(tgt), jnp.asarray(w), beta=4.0,
                                scale=1.0)
  np.testing.assert_allclose(float(s), np_smooth_l1(d, 4.0).sum(-1)[w].sum(), rtol=1e-5)
  assert float(n) == w.sum()


@pytest.fixture(scope="module")
def objective_setup():
  """A 3-layer × 64 text objective (K = 2), random student and teacher params, one masked batch."""
  c = _config()
  obj = registry.get("objective", "data2vec")(c)
  rng = np.random.default_rng(8)
  batch = Text.mask_fn(c.masking)(np.random.default_rng(9), _token_batch(rng, t=32))
  params = _perturbed(jax.jit(obj.init)(jax.random.key(0), batch), rng, 0.05)
  # Large head outputs put |pred − target| on both sides of β = 4.
  params["head"]["fc2"]["kernel"] = params["head"]["fc2"]["kernel"] * 60
  teacher = _perturbed(obj.init_teacher(params), rng, 0.05)
  return c, obj, batch, params, teacher


def _np_loss(obj, params, teacher, batch, teacher_inputs):
  """Reference: student prediction on the corrupted ids, targets = mean over the top-K teacher
  FFN outputs of a per-layer LayerNorm, smooth L1 (β 4) summed over channels, mean over masked."""
  c = obj.config

  @jax.jit
  def forward(params, teacher, student_inputs, teacher_inputs):
    pred = obj.model.apply({"params": params}, student_inputs, False)
    return pred, obj.encode({**params, **teacher}, teacher_inputs)[1]

  pred, lr = jax.tree.map(np.asarray, forward(params, teacher, Text.student_inputs(batch),
                                              teacher_inputs))
  y = np.mean(np_layer_norm(lr[-c.targets.top_k:]), axis=0)
  w = batch["mask"] & ~batch["padding_mask"]
  per = np_smooth_l1(pred.astype(np.float64) - y, 4.0).sum(-1)
  return per[w].sum() / w.sum(), y, pred, w


def test_loss_uses_targets_of_the_teacher_on_the_original_tokens(objective_setup):
  """The teacher's layer results are those of the encoder run on the ORIGINAL tokens (the
  paper); targets from the corrupted tokens would give a different loss."""
  c, obj, batch, params, teacher = objective_setup
  loss, m = jax.jit(lambda p, t, b: obj.loss(p, t, b, jax.random.key(0), train=False))(
      params, teacher, batch)
  full = {"tokens": batch["tokens"], "padding_mask": batch["padding_mask"]}
  want, y, pred, w = _np_loss(obj, params, teacher, batch, full)
  assert 0.1 < (np.abs(pred - y)[w] >= 4).mean() < 0.9
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(m["target_var"]),
                             np.mean(np.sqrt(y[w].var(0, ddof=1) + 1e-6)), rtol=1e-4)
  assert float(m["masked_count"]) == w.sum()
  corrupted = {"tokens": batch["masked_tokens"], "padding_mask": batch["padding_mask"]}
  wrong, *_ = _np_loss(obj, params, teacher, batch, corrupted)
  assert abs(wrong - want) > 1e-3 * want


def test_fairseq_bug4881_teacher_view(objective_setup):
  """``model.teacher_input='fairseq_bug4881'``: the teacher sees <pad> outside the masked
  positions and attends only to them (fairseq issue #4881)."""
  c, _, batch, params, teacher = objective_setup
  c = _config()
  c.model.teacher_input = "fairseq_bug4881"
  obj = registry.get("objective", "data2vec")(c)
  loss, _ = jax.jit(lambda p, t, b: obj.loss(p, t, b, jax.random.key(0), train=False))(
      params, teacher, batch)
  keep = batch["mask"] & ~batch["padding_mask"]
  view = {"tokens": np.where(keep, batch["tokens"], tok_lib.PAD_ID),
          "padding_mask": ~keep}
  want, *_ = _np_loss(obj, params, teacher, batch, view)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_ema_copies_embeddings_and_averages_encoder(objective_setup):
  """After one update: teacher frontend == student frontend bit for bit (skip_keys, spec §4.2);
  teacher encoder == τ·θT + (1 − τ)·θS (spec §5.1)."""
  c, obj, batch, params, teacher = objective_setup
  lr_fn = optim.make_schedule(c.optim, c.total_steps, 0)
  tx = optim.make_optimizer(c.optim, lr_fn, params, obj.frozen)
  state = {"params": params, "teacher": teacher, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32)}
  t0 = jax.tree.map(np.asarray, teacher)
  new, m = jax.jit(step_lib.make_train_step(obj, tx, lr_fn, train.EmaSchedule(
      0.999, 0.9999, c.ema.anneal_steps), 0))(state, batch)
  tau = float(m["ema_decay"])
  assert tau == pytest.approx(0.9999 - 0.0009 * (1 - 1 / c.ema.anneal_steps), abs=1e-7)
  s1 = jax.tree.map(np.asarray, new["params"])
  t1 = jax.tree.map(np.asarray, new["teacher"])
  jax.tree.map(np.testing.assert_array_equal, t1["frontend"], s1["frontend"])
  assert not np.allclose(s1["frontend"]["embed_tokens"]["embedding"],
                         np.asarray(params["frontend"]["embed_tokens"]["embedding"]))
  jax.tree.map(lambda a, b, s: np.testing.assert_allclose(a, tau * b + (1 - tau) * s, **TOL),
               t1["encoder"], t0["encoder"], s1["encoder"])
  assert not np.allclose(t1["encoder"]["layers"]["fc1"]["kernel"],
                         s1["encoder"]["layers"]["fc1"]["kernel"])


# ----------------------------------------------------------------------------- end to end


def test_train_run_end_to_end_on_one_device(tmp_path):
  """``:test`` preset through ``train.run`` on the embedded corpus: finite falling-or-flat loss,
  healthy targets, BERT masking rate, checkpoint and export that rebuild the model."""
  c = text_base.get_config("test,steps=6")
  c.num_devices = 1
  c.ckpt_every = 3
  c.data.buckets = [64]  # one batch shape: one compilation
  workdir = str(tmp_path / "run")
  assert train.run(c, workdir) == 0
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  logged = [r for r in rows if "loss" in r]
  assert [r["step"] for r in logged] == list(range(1, 7))
  for r in logged:
    assert np.isfinite(r["loss"]) and r["target_var"] > c.guard.min_value
    assert 0.08 < r["masked_frac"] < 0.17  # 15 % of the non-special tokens
  assert checkpointing.latest_step(os.path.join(workdir, "checkpoints")) == 6
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["stop_reason"] == "finished" and summary["tokens_per_s"] > 0
  out = os.path.join(workdir, "export", "params.msgpack")
  obj, params, _ = export.load_model(out)
  tokens = np.array([[0, 100, 200, 2, 300, 2, 1, 1]], np.int32)
  x, lr, pad = jax.jit(obj.encode)(params, {"tokens": tokens, "padding_mask": tokens == 1})
  assert x.shape == (1, 8, 64) and lr.shape == (2, 1, 8, 64)
  np.testing.assert_array_equal(np.asarray(pad), tokens == 1)
  assert np.isfinite(np.asarray(x)).all()
