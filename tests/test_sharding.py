"""Scale-out on 8 fake CPU devices (issue 8): sharded step == single-device step, declared
shardings, one compile, cross-mesh restore, gradient accumulation, bf16 policy."""

import chex
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from d2vjax import checkpointing, configs_lib, optim, registry, sharding, step as step_lib


def _setup(mesh_axes, *, rows=8, accum=1, dtype="float32", seed=0):
  c = configs_lib.data2vec_speech("base")
  configs_lib.test_preset(c)
  c.model.encoder.dtype = dtype
  # Big enough matrices that the fsdp rule shards them (min size 2**14 elements).
  c.model.encoder.update(dict(dim=128, ffn_dim=256, num_heads=2))
  obj = registry.get("objective", "data2vec")(c)
  rng = np.random.default_rng(seed)
  batch = {"audio": rng.standard_normal((rows, 16000)).astype(np.float32),
           "padding_mask": np.zeros((rows, 16000), bool)}
  batch = obj.modality.mask_fn(c.masking)(rng, batch)
  lr_fn = optim.make_schedule(c.optim, 100, 0)
  dummy = obj.modality.dummy_batch(c.data)
  tx = optim.make_optimizer(c.optim, lr_fn, jax.eval_shape(obj.init, jax.random.key(0), dummy))
  init = lambda r: step_lib.init_state(obj, tx, r, dummy)
  shape = jax.eval_shape(init, jax.random.key(0))
  mesh = sharding.make_mesh(mesh_axes, jax.devices()[:int(np.prod([s for _, s in mesh_axes]))])
  shardings = sharding.state_shardings(shape, mesh, c.sharding_rules)
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  fn = step_lib.make_train_step(obj, tx, lr_fn, c.ema, 0, accum_steps=accum)
  return c, obj, batch, mesh, shardings, state, fn


def _run(mesh_axes, steps=3, **kw):
  c, obj, batch, mesh, shardings, state, fn = _setup(mesh_axes, **kw)
  bs = sharding.batch_sharding(mesh)
  step = jax.jit(fn, in_shardings=(shardings, bs), out_shardings=(shardings, None),
                 donate_argnums=0)
  losses = []
  for _ in range(steps):
    state, m = step(state, sharding.global_batch(batch, bs))
    losses.append(float(m["loss"]))
  return losses, jax.device_get(state), state, shardings


@pytest.fixture(scope="module")
def reference():
  """Three steps on one device: the numbers every mesh must reproduce."""
  return _run((("data", 1), ("fsdp", 1)))[:2]


@pytest.mark.parametrize("axes", [(("data", 4), ("fsdp", 2)), (("data", 8), ("fsdp", 1))])
def test_sharded_step_equals_single_device(axes, reference):
  ref_losses, ref_state = reference
  losses, state, live, shardings = _run(axes)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  chex.assert_trees_all_close(state["params"], ref_state["params"], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state["teacher"], ref_state["teacher"], rtol=1e-5, atol=1e-6)
  # Every leaf lives with the sharding the rules declared (params, optimizer state, teacher).
  jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim) or pytest.fail(str(s)),
               live, shardings)


def test_fsdp_rule_shards_large_params_and_optimizer_state_alike():
  _, _, _, mesh, shardings, state, _ = _setup((("data", 4), ("fsdp", 2)))
  spec = lambda tree, *path: _get(tree, path).spec
  fc1 = spec(shardings, "params", "encoder", "layers", "fc1", "kernel")  # [L, 128, 256]
  assert fc1 == P(None, None, "fsdp")  # largest dim, never the stacked-layer axis
  assert spec(shardings, "teacher", "encoder", "layers", "fc1", "kernel") == fc1
  mu = shardings["opt_state"][0][0].mu  # adamw's ScaleByAdamState
  assert _get(mu, ("encoder", "layers", "fc1", "kernel")).spec == fc1
  assert spec(shardings, "params", "mask_emb") == P()  # small: replicated
  assert spec(shardings, "step") == P()
  fc1_param = _get(state, ("params", "encoder", "layers", "fc1", "kernel"))
  assert fc1_param.addressable_shards[0].data.shape == (2, 128, 128)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def test_step_compiles_once_over_varied_batches():
  c, obj, _, mesh, shardings, state, fn = _setup((("data", 4), ("fsdp", 2)))
  bs = sharding.batch_sharding(mesh)
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(fn, n=1), in_shardings=(shardings, bs),
                 out_shardings=(shardings, None), donate_argnums=0)
  for seed in range(5):
    rng = np.random.default_rng(seed)
    b = {"audio": rng.standard_normal((8, 16000)).astype(np.float32),
         "padding_mask": np.zeros((8, 16000), bool)}
    b = obj.modality.mask_fn(c.masking)(rng, b)
    state, m = step(state, sharding.global_batch(b, bs))
    assert np.isfinite(float(m["loss"]))
  assert step._cache_size() == 1
  chex.clear_trace_counter()


def test_checkpoint_from_4x2_restores_on_1_and_8x1(tmp_path):
  _, host_state, live, _ = _run((("data", 4), ("fsdp", 2)), steps=1)
  mngr = checkpointing.make_manager(str(tmp_path / "ck"), async_save=False)
  assert checkpointing.save(mngr, 1, live, force=True)
  checkpointing.wait(mngr)
  for axes in ((("data", 1), ("fsdp", 1)), (("data", 8), ("fsdp", 1))):
    mesh = sharding.make_mesh(axes, jax.devices()[:int(np.prod([n for _, n in axes]))])
    target = sharding.state_shardings(live, mesh)
    abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                            live, target)
    restored, step = checkpointing.restore_latest(
        checkpointing.make_manager(str(tmp_path / "ck"), async_save=False), abstract)
    assert step == 1
    jax.tree.map(lambda a, sh: a.sharding.is_equivalent_to(sh, a.ndim) or pytest.fail(str(sh)),
                 restored, target)
    chex.assert_trees_all_equal(jax.device_get(restored), host_state)


def test_accumulation_of_4_micro_batches_equals_the_4x_batch():
  """k micro-batches of b rows == one batch of k·b rows: same loss and gradients (fp32)."""
  c, obj, batch, _, _, state, _ = _setup((("data", 1), ("fsdp", 1)), rows=8)
  rng = jax.random.key(7)
  # Dropout streams differ between the two layouts (one key per micro-batch): compare without.
  c.model.encoder.update(dict(dropout=0.0, attention_dropout=0.0))
  obj = registry.get("objective", "data2vec")(c)
  full = step_lib.accumulated_grads(obj, state["params"], state["teacher"], batch, rng, 0, 1)
  acc = step_lib.accumulated_grads(obj, state["params"], state["teacher"], batch, rng, 0, 4)
  np.testing.assert_allclose(float(acc[0]), float(full[0]), rtol=1e-5)
  assert float(acc[1]["masked_count"]) == float(full[1]["masked_count"])
  chex.assert_trees_all_close(acc[2], full[2], rtol=1e-5, atol=1e-7)


def test_bf16_forward_close_to_fp32_and_bf16_steps_stay_finite():
  _, obj32, batch, _, _, state, _ = _setup((("data", 1), ("fsdp", 1)))
  _, obj16, _, _, _, _, fn16 = _setup((("data", 1), ("fsdp", 1)), dtype="bfloat16")
  params = state["params"]
  x32, lr32, _ = obj32.encode(params, batch)
  x16, lr16, _ = obj16.encode(params, batch)
  assert x16.dtype == jnp.bfloat16
  # bf16 has an 8-bit mantissa: outputs of LayerNorm-ed activations agree to a few 1e-2.
  err = np.abs(np.asarray(x16, np.float32) - np.asarray(x32))
  assert err.mean() < 0.02 and err.max() < 0.25
  # Losses in fp32 on top of bf16 compute: close to the fp32 loss, finite gradients for a few steps.
  l32, _ = obj32.loss(params, state["teacher"], batch, jax.random.key(0), train=False)
  l16, _ = obj16.loss(params, state["teacher"], batch, jax.random.key(0), train=False)
  assert l16.dtype == jnp.float32
  np.testing.assert_allclose(float(l16), float(l32), rtol=0.03)
  step = jax.jit(fn16, donate_argnums=0)
  for _ in range(3):
    state, m = step(state, batch)
    assert float(m["nonfinite"]) == 0 and np.isfinite(float(m["grad_norm"]))
  # Params and teacher stay fp32 under a bf16 compute policy.
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["teacher"]))
