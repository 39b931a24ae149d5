"""Classification / regression fine-tuning (issue 7 item 3; fairseq-spec §9.2, §9.3): heads
against NumPy, layer-wise lr decay against its formula, timm Mixup/CutMix and label smoothing
against their formulas, the loss against NumPy, a fixed batch memorised, and end-to-end runs of
``finetune.run`` with resume."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from d2vjax import configs_cls, evaluate, finetune, optim, registry
from d2vjax import step as step_lib
from d2vjax.data import labelled
from d2vjax.models import cls_heads
from d2vjax.probes import vision as vision_probe
from d2vjax.data import image


def _ln(x, scale, bias, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def test_mean_pool_head_matches_numpy_and_ignores_cls_and_padding():
  """Mean over the valid patch tokens (CLS and padding left out) → LayerNorm(1e-6) → Linear."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 8)).astype(np.float32)
  pad = np.zeros((2, 5), bool)
  pad[1, 3:] = True
  head = cls_heads.MeanPoolHead(num_outputs=3)
  params = head.init(jax.random.key(0), x, pad)["params"]
  # Non-trivial norm parameters, so the test sees them.
  params = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), params)
  got = np.asarray(head.apply({"params": params}, x, pad))
  ln = params["fc_norm"]["norm"]
  want = []
  for b, valid in ((0, 5), (1, 3)):
    pooled = x[b, 1:valid].mean(0)
    y = _ln(pooled, np.asarray(ln["scale"]), np.asarray(ln["bias"]), 1e-6)
    want.append(y @ np.asarray(params["out"]["kernel"]) + np.asarray(params["out"]["bias"]))
  np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-5)
  x2 = x.copy()
  x2[:, 0] += 100.0  # CLS
  x2[1, 3:] -= 50.0  # padding
  np.testing.assert_allclose(np.asarray(head.apply({"params": params}, x2, pad)), got, atol=1e-5)


def test_roberta_head_uses_the_first_token():
  """tanh(x₀ W₁ + b₁) W₂ + b₂ on token 0 (dropout off), whatever the other tokens hold."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 4, 8)).astype(np.float32)
  pad = np.zeros((3, 4), bool)
  head = cls_heads.FirstTokenHead(num_outputs=2, dropout=0.1)
  params = head.init(jax.random.key(0), x, pad)["params"]
  got = np.asarray(head.apply({"params": params}, x, pad))
  d, o = params["dense"], params["out_proj"]
  want = np.tanh(x[:, 0] @ np.asarray(d["kernel"]) + np.asarray(d["bias"])) @ np.asarray(
      o["kernel"]) + np.asarray(o["bias"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  x[:, 1:] = 0.0
  np.testing.assert_allclose(np.asarray(head.apply({"params": params}, x, pad)), got, atol=1e-6)


def test_layer_decay_scales_follow_the_formula():
  """Block i (1-based) of n = L + 1 gets decay^(n - i); everything outside the blocks 1; scanned
  stacks get one scale per row; the optimizer's whole update (Adam step and weight decay) is
  multiplied by it."""
  decay, n_layers = 0.65, 3
  params = {"encoder": {"layers": {"fc": {"kernel": jnp.ones((n_layers, 2, 2))}},
                        "layer_norm": {"scale": jnp.ones((2,))}},
            "frontend": {"cls": jnp.ones((2,))}, "head": {"out": {"kernel": jnp.ones((2, 2))}}}
  assert optim.count_blocks(params) == n_layers
  tx = optim.scale_by_layer_decay(decay, n_layers)
  upd, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params))
  want_rows = decay ** (n_layers + 1 - np.arange(1, n_layers + 1))
  np.testing.assert_allclose(np.asarray(upd["encoder"]["layers"]["fc"]["kernel"])[:, 0, 0],
                             want_rows, rtol=1e-6)
  for leaf in (upd["encoder"]["layer_norm"]["scale"], upd["frontend"]["cls"],
               upd["head"]["out"]["kernel"]):
    np.testing.assert_array_equal(np.asarray(leaf), 1.0)
  unrolled = {"encoder": {f"layers_{i}": {"w": jnp.ones((2,))} for i in range(4)}}
  assert optim.count_blocks(unrolled) == 4
  for i in range(4):
    assert optim.layer_decay_scale(f"encoder/layers_{i}/w", (2,), decay, 4) == pytest.approx(
        decay ** (5 - (i + 1)))
  # Through make_optimizer: with layer decay = the plain update times the scale.
  cfg = ml_collections.ConfigDict(dict(clip_norm=0.0, b1=0.9, b2=0.95, eps=1e-8,
                                       weight_decay=0.05, layer_decay=1.0))
  lr = lambda n: jnp.asarray(1e-3)
  grads = jax.tree.map(lambda a: jnp.full(a.shape, 0.3), params)
  plain = optim.make_optimizer(cfg, lr, params)
  cfg.layer_decay = decay
  scaled = optim.make_optimizer(cfg, lr, params)
  u0, _ = plain.update(grads, plain.init(params), params)
  u1, _ = scaled.update(grads, scaled.init(params), params)
  np.testing.assert_allclose(np.asarray(u1["encoder"]["layers"]["fc"]["kernel"]),
                             np.asarray(u0["encoder"]["layers"]["fc"]["kernel"])
                             * want_rows[:, None, None], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(u1["head"]["out"]["kernel"]),
                             np.asarray(u0["head"]["out"]["kernel"]), rtol=1e-7)


def test_cutmix_and_mixup_follow_timm():
  """CutMix: λ ~ Beta(α, α), a box of side sqrt(1-λ) centred uniformly and clipped, pasted from
  the reversed batch, λ corrected to 1 - box/(H·W), targets mixed with the same λ. Mixup:
  λx + (1-λ)x_flip. Both reproduce timm's draws in timm's order."""
  x = np.random.default_rng(2).normal(size=(4, 16, 12, 3)).astype(np.float32)
  y = labelled.smooth_targets(np.array([0, 1, 2, 1]), 3, 0.1)
  cut = labelled.MixConfig(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0)
  for seed in range(5):
    got_x, got_y, lam = labelled.mix_batch(np.random.default_rng(seed), x, y, cut)
    r = np.random.default_rng(seed)
    assert r.random() < 1.0
    lam0 = r.beta(1.0, 1.0)
    ch, cw = int(16 * np.sqrt(1 - lam0)), int(12 * np.sqrt(1 - lam0))
    cy, cx = r.integers(0, 16), r.integers(0, 12)
    yl, yh = np.clip(cy - ch // 2, 0, 16), np.clip(cy + ch // 2, 0, 16)
    xl, xh = np.clip(cx - cw // 2, 0, 12), np.clip(cx + cw // 2, 0, 12)
    want = x.copy()
    want[:, yl:yh, xl:xh] = x[::-1, yl:yh, xl:xh]
    np.testing.assert_array_equal(got_x, want)
    assert lam == pytest.approx(1 - (yh - yl) * (xh - xl) / (16 * 12))
    np.testing.assert_allclose(got_y, lam * y + (1 - lam) * y[::-1], rtol=1e-6)
  mix = labelled.MixConfig(mixup_alpha=0.7, cutmix_alpha=0.0, prob=1.0)
  got_x, got_y, lam = labelled.mix_batch(np.random.default_rng(7), x, y, mix)
  r = np.random.default_rng(7)
  r.random()
  assert lam == pytest.approx(r.beta(0.7, 0.7))
  np.testing.assert_allclose(got_x, lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_y.sum(-1), 1.0, rtol=1e-6)
  # prob 0.9, switch 0.5: the share of mixed batches and of CutMix among them.
  both = labelled.MixConfig(mixup_alpha=0.7, cutmix_alpha=1.0, prob=0.9, switch_prob=0.5)
  draws = [labelled.sample_mix(np.random.default_rng(s), both) for s in range(4000)]
  mixed = [c for lam, c in draws if lam != 1.0]
  assert abs(len(mixed) / 4000 - 0.9) < 0.02 and abs(np.mean(mixed) - 0.5) < 0.03


def test_label_smoothing_cross_entropy_matches_timm():
  """CE against the smoothed one-hot targets = (1 - s)·NLL + s·mean(-log p) (timm's
  LabelSmoothingCrossEntropy)."""
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(6, 5))
  labels = rng.integers(0, 5, 6)
  s = 0.1
  t = labelled.smooth_targets(labels, 5, s)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  soft = -(t * logp).sum(-1)
  timm = (1 - s) * -logp[np.arange(6), labels] + s * -logp.mean(-1)
  np.testing.assert_allclose(soft, timm, rtol=1e-6)


def _resolved(config):
  task = registry.get("finetune_task", config.objective)(config)
  train, _ = task.examples(config, "train")
  c = task.resolve_config(config, pretrained=None, stored=None, train_examples=train, init="")
  return task, c, registry.get("objective", c.objective)(c)


@pytest.mark.parametrize("regression", [False, True])
def test_loss_matches_numpy(regression):
  """The objective's loss on a batch with a filler row = the NumPy soft-target CE (or squared
  error) of its own outputs over the valid rows."""
  c = configs_cls.get_text_config("test,regression" if regression else "test")
  task, c, obj = _resolved(c)
  params = jax.jit(obj.init)(jax.random.key(0), task.dummy_batch(c, obj))
  tokens = np.random.default_rng(4).integers(4, 200, (4, 32)).astype(np.int32)
  tokens[:, 0] = 0
  pad = np.zeros((4, 32), bool)
  pad[2, 20:] = True
  host = {"tokens": tokens, "padding_mask": pad, "_labels": np.array([1.0, 0.0, 1.0, 0.0])}
  fn = labelled.LabelFn(0 if regression else 2, 0.0 if regression else 0.1)
  batch = {k: v for k, v in fn(np.random.default_rng(0), host).items() if k[0] != "_"}
  batch["row_valid"] = np.array([True, True, True, False])
  loss, metrics = obj.loss(params, {}, batch, jax.random.key(1), train=False)
  out = np.asarray(obj.outputs(params, batch), np.float64)
  if regression:
    per = ((out - batch["targets"]) ** 2).sum(-1)
  else:
    logp = out - np.log(np.exp(out).sum(-1, keepdims=True))
    per = -(batch["targets"] * logp).sum(-1)
  assert float(loss) == pytest.approx(per[:3].mean(), rel=1e-5)
  assert float(metrics["masked_count"]) == 3.0


def test_fixed_image_batch_is_memorised():
  """16 generated pattern images (validation view, no augmentation) with the recipe's optimizer
  (layer decay 0.65, label smoothing 0.1) at a constant lr 2e-3: the train step reaches 100 %
  accuracy on the batch within 60 updates, from chance."""
  c = configs_cls.get_vision_config("base", "test")
  task, c, obj = _resolved(c)
  examples, _ = task.examples(c, "train")
  pick = [examples[i] for i in range(0, len(examples), len(examples) // 16)][:16]
  aug = image.augment_from_config(c.data)
  imgs = np.stack([vision_probe.eval_view(image.load_image(e.path)[0], aug) for e in pick])
  host = {"image": imgs, "_labels": np.array([e.label for e in pick], np.float64)}
  batch = {k: v for k, v in labelled.LabelFn(4, 0.1)(np.random.default_rng(0), host).items()
           if k[0] != "_"}
  c.optim.schedule = "constant"
  c.optim.peak_lr = 2e-3
  lr_fn = optim.make_schedule(c.optim, 60, 0)
  dummy = task.dummy_batch(c, obj)
  params_shape = jax.eval_shape(obj.init, jax.random.key(0), dummy)
  tx = obj.make_optimizer(c.optim, lr_fn, params_shape)
  state = step_lib.init_state(obj, tx, jax.random.key(0), dummy)
  step = jax.jit(step_lib.make_train_step(obj, tx, lr_fn, finetune.train.EmaSchedule(1, 1, 0),
                                          0))
  accs = []
  for _ in range(60):
    state, m = step(state, batch)
    accs.append(float(m["accuracy"]))
  assert accs[0] <= 0.5, accs[:3]
  assert max(accs[-5:]) == 1.0, accs[-10:]


def _run(config, workdir):
  assert finetune.run(config, workdir) == 0
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def test_text_finetune_learns_and_resumes(tmp_path, capsys):
  """``finetune.run`` on the text ``:test`` preset (2 × 64, generated two-class sentiment set,
  8 sentences a step, 2 devices) stopped at step 40 and resumed to 80: it continues from step
  40, and the validation accuracy reaches >= 0.7 (chance 0.5 on 64 sentences) with the best
  checkpoint kept by accuracy; ``evaluate.run_task`` reproduces its score."""
  c = configs_cls.get_text_config("test,steps=80")
  c.num_devices = 2
  c.optim.peak_lr = 1e-3
  c.eval.every = 40
  c.ckpt_every = 40
  c.stop_after_steps = 40
  wd = str(tmp_path / "run")
  first = _run(c, wd)
  assert first["stop_reason"] == "stop_after_steps" and first["step"] == 40
  c.stop_after_steps = 0
  second = _run(c, wd)
  assert "resumed from step 40" in capsys.readouterr().out
  assert second["stop_reason"] == "finished" and second["step"] == 80
  best = json.load(open(os.path.join(wd, "best.json")))
  assert best["accuracy"] >= 0.7 and best["step"] == 80, best
  assert best["accuracy"] > first["last_eval"]["accuracy"]
  assert os.path.exists(os.path.join(wd, "export", "params.msgpack"))
  # The evaluate entry point rescores the best checkpoint from the run directory alone.
  report, at = evaluate.run_task(wd)
  assert at == 80 and report.record["accuracy"] == pytest.approx(best["accuracy"])


def test_vision_finetune_smoke(tmp_path):
  """Smoke test: ``finetune.run`` on the vision ``:test`` preset (Mixup/CutMix on, 2 devices)
  runs 4 steps with two validations over all 32 generated images and keeps a best record."""
  c = configs_cls.get_vision_config("base", "test,steps=4")
  c.num_devices = 2
  c.eval.every = 2
  s = _run(c, str(tmp_path / "run"))
  assert s["step"] == 4 and s["last_eval"]["examples"] == 32
  assert set(s["best"]) >= {"step", "accuracy", "loss"}


def test_checkpoint_of_another_modality_is_refused():
  """A speech checkpoint cannot initialise a sentence classifier: a clear error before any work
  (the same modality passes)."""
  c = configs_cls.get_text_config("test")
  task = registry.get("finetune_task", c.objective)(c)
  with pytest.raises(ValueError, match=r"'speech' model .* 'text' one"):
    task.check(c, {"modality": "speech", "model": {}}, "/ckpt/speech")
  task.check(c, {"modality": "text", "model": {}}, "/ckpt/text")
