"""Scale-out on 8 fake CPU devices (issue 8): sharded step == single-device step (data, fsdp and
tensor axes), declared shardings, activation constraints, one compile and the compile bound,
hybrid ICI × DCN device grids, cross-mesh restore, gradient accumulation, bf16 policy."""

import functools

import chex
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from d2vjax import checkpointing, configs_lib, optim, registry, sharding, step as step_lib


def _setup(mesh_axes, *, rows=8, accum=1, dtype="float32", seed=0, residual_tensor=False):
  c = configs_lib.data2vec_speech("base")
  configs_lib.test_preset(c)
  c.model.encoder.dtype = dtype
  c.model.encoder.residual_tensor = residual_tensor
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


def _step(fn, mesh, shardings, **kw):
  """The trainer's jitted step: under the mesh, sharded in/out, donated state, counted."""
  return sharding.MeshStep(fn, mesh, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                           out_shardings=(shardings, None), donate_argnums=0, **kw)


def _run(mesh_axes, steps=3, **kw):
  c, obj, batch, mesh, shardings, state, fn = _setup(mesh_axes, **kw)
  bs = sharding.batch_sharding(mesh)
  step = _step(fn, mesh, shardings)
  losses = []
  for _ in range(steps):
    state, m = step(state, sharding.global_batch(batch, bs))
    losses.append(float(m["loss"]))
  return losses, jax.device_get(state), state, shardings


@pytest.fixture(scope="module")
def reference():
  """Three steps on one device: the numbers every mesh must reproduce."""
  return _run((("data", 1), ("fsdp", 1)))[:2]


def _assert_leaves_close_in_norm(tree, ref, rtol=1e-5, atol=1e-6):
  """Per leaf ‖a − b‖ ≤ rtol·‖b‖ + atol·√n: assert_allclose's bound, taken over the whole tensor.

  Tensor parallelism splits contractions, so partial sums are added in another order (~1e-7
  relative); after a few Adam steps that is amplified elementwise wherever the first moment nearly
  cancels (m/√v is ill-conditioned there), while every tensor as a whole stays within 1e-5.
  """
  def one(path, a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err, bound = np.linalg.norm(a - b), rtol * np.linalg.norm(b) + atol * np.sqrt(a.size)
    assert err <= bound, (jax.tree_util.keystr(path), err, bound)

  jax.tree_util.tree_map_with_path(one, tree, ref)


# (data, fsdp) meshes match elementwise; the tensor mesh also splits D between blocks
# (residual_tensor) and is compared per tensor (see _assert_leaves_close_in_norm).
@pytest.mark.parametrize("axes,residual_tensor", [
    ((("data", 4), ("fsdp", 2)), False), ((("data", 8), ("fsdp", 1)), False),
    ((("data", 2), ("fsdp", 2), ("tensor", 2)), True)])
def test_sharded_step_equals_single_device(axes, residual_tensor, reference):
  ref_losses, ref_state = reference
  losses, state, live, shardings = _run(axes, residual_tensor=residual_tensor)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  close = _assert_leaves_close_in_norm if residual_tensor else functools.partial(
      chex.assert_trees_all_close, rtol=1e-5, atol=1e-6)
  close(state["params"], ref_state["params"])
  close(state["teacher"], ref_state["teacher"])
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


def test_step_compiles_once_over_varied_batches_and_the_bound_stops_a_new_shape():
  c, obj, _, mesh, shardings, state, fn = _setup((("data", 4), ("fsdp", 2)))
  bs = sharding.batch_sharding(mesh)
  step = _step(fn, mesh, shardings, max_compiles=1)

  def batch(seed, rows=8):
    rng = np.random.default_rng(seed)
    b = {"audio": rng.standard_normal((rows, 16000)).astype(np.float32),
         "padding_mask": np.zeros((rows, 16000), bool)}
    return sharding.global_batch(obj.modality.mask_fn(c.masking)(rng, b), bs)

  for seed in range(5):
    state, m = step(state, batch(seed))
    assert np.isfinite(float(m["loss"]))
  assert step.compiles == 1 and step._jit._cache_size() == 1
  # A batch shape outside the plan would be a second program: refused before compiling, and the
  # donated state is still alive.
  with pytest.raises(sharding.CompileLimitError, match=r"max_step_compiles=1.*\(16, 16000\)"):
    step(state, batch(9, rows=16))
  assert step.compiles == 2
  assert np.isfinite(np.asarray(state["params"]["mask_emb"])).all()


def test_tensor_rules_split_attention_and_mlp_megatron_style():
  """fc1/q/k/v on their output dim, fc2/out_proj on their input dim, fsdp on the largest free dim;
  the same layout for optimizer moments and teacher; tiny tensors and the rest unchanged."""
  c, _, _, mesh, shardings, state, _ = _setup((("data", 2), ("fsdp", 2), ("tensor", 2)))
  layer = lambda tree, name: _get(tree, ("encoder", "layers") + name + ("kernel",))
  expected = {  # scanned [L, ...]; D=128, F=256, H=2, dh=64
      ("fc1",): P(None, "fsdp", "tensor"),  # [L, D, F]
      ("fc2",): P(None, "tensor", "fsdp"),  # [L, F, D]
      ("self_attn", "q_proj"): P(None, "fsdp", "tensor", None),  # [L, D, H, dh]
      ("self_attn", "k_proj"): P(None, "fsdp", "tensor", None),
      ("self_attn", "v_proj"): P(None, "fsdp", "tensor", None),
      ("self_attn", "out_proj"): P(None, "tensor", None, "fsdp"),  # [L, H, dh, D]
  }
  mu = shardings["opt_state"][0][0].mu
  for name, spec in expected.items():
    assert layer(shardings["params"], name).spec == spec, name
    assert layer(shardings["teacher"], name).spec == spec, name
    assert layer(mu, name).spec == spec, name
  fc2 = layer(state["params"], ("fc2",))
  assert fc2.addressable_shards[0].data.shape == (2, 128, 64)
  # Biases and the CNN follow the fsdp rule only (no tensor axis).
  assert "tensor" not in str(_get(shardings, ("params", "encoder", "layers", "fc1", "bias")).spec)
  # Without a tensor axis the tensor rules change nothing (the data × fsdp layout above).
  plain = sharding.state_shardings(state, sharding.make_mesh((("data", 4), ("fsdp", 2))),
                                   c.sharding_rules)
  assert layer(plain["params"], ("fc1",)).spec == P(None, None, "fsdp")
  # A head count the tensor axis cannot split is an error naming the parameter.
  with pytest.raises(ValueError, match=r"q_proj.*tensor=4"):
    sharding._param_spec("params/encoder/layers/self_attn/q_proj/kernel", (2, 128, 2, 64),
                         sharding.make_mesh((("data", 2), ("tensor", 4))),
                         configs_lib.data2vec_speech("base").sharding_rules)


def test_activation_constraints_only_under_a_mesh():
  """The residual stream is pinned at every block boundary when the step runs under its mesh
  (batch over data × fsdp, D over tensor when asked); plain jit without a mesh has none."""
  c, obj, batch, mesh, shardings, state, fn = _setup((("data", 2), ("fsdp", 2), ("tensor", 2)),
                                                     residual_tensor=True)
  bs = sharding.batch_sharding(mesh)
  gb = sharding.global_batch(batch, bs)
  hlo = _step(fn, mesh, shardings).lower(state, gb).as_text()
  constraints = [l for l in hlo.splitlines() if "sharding_constraint" in l]
  # Per layer body (scanned once): the block output and the FFN result; plus the encoder input.
  assert any('{"data", "fsdp"}, {}, {"tensor"}' in l for l in constraints), constraints[:3]
  assert len(constraints) >= 3
  assert "sharding_constraint" not in jax.jit(fn).lower(state, gb).as_text()
  x = jnp.ones((8, 5, 128))
  assert sharding.constrain_activation(x) is x  # no mesh: untouched


class _FakeDevice:
  """What mesh_utils reads from a multi-slice TPU device (id, platform, kind, slice)."""
  platform = device_kind = "fake"

  def __init__(self, i, slice_index=None):
    self.id = i
    if slice_index is not None:
      self.slice_index = slice_index

  def __repr__(self):
    return f"D{self.id}"


def test_hybrid_dcn_grid_puts_slices_on_the_outer_blocks():
  """2 slices × 4 devices, data=4 (2 over DCN) × fsdp=2: each slice fills one half of the data
  axis; fsdp (the chatty axis) stays inside a slice."""
  devices = [_FakeDevice(i, slice_index=i // 4) for i in range(8)]
  grid = sharding.device_grid((("data", -1), ("fsdp", 2)), devices, (("data", 2),))
  assert grid.shape == (4, 2)
  slices = np.vectorize(lambda d: d.slice_index)(grid)
  np.testing.assert_array_equal(slices, [[0, 0], [0, 0], [1, 1], [1, 1]])
  assert sorted(d.id for d in grid.ravel()) == list(range(8))
  # DCN over fsdp instead: slices split the fsdp axis.
  grid = sharding.device_grid((("data", 4), ("fsdp", 2)), devices, (("fsdp", 2),))
  np.testing.assert_array_equal(np.vectorize(lambda d: d.slice_index)(grid), [[0, 1]] * 4)
  with pytest.raises(ValueError, match="spans 4 slices but the devices come from 2"):
    sharding.device_grid((("data", -1), ("fsdp", 2)), devices, (("data", 4),))
  with pytest.raises(ValueError, match="not divisible by its dcn_mesh size"):
    sharding.device_grid((("data", 1), ("fsdp", 8)), devices, (("data", 2),))
  with pytest.raises(ValueError, match="not mesh axes"):
    sharding.device_grid((("data", -1),), devices, (("tensor", 2),))
  # CPU devices have no slice_index: a clear error, and dcn size 1 is the plain mesh.
  with pytest.raises(ValueError, match=r"needs multi-slice TPU devices.*\['cpu'\]"):
    sharding.make_mesh((("data", -1), ("fsdp", 1)), jax.devices(), (("data", 2),))
  mesh = sharding.make_mesh((("data", -1), ("fsdp", 1)), jax.devices(), (("data", 1),))
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1}


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
