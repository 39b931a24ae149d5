"""Checkpoints: round trips, other meshes, retention, interval, interrupted writes, preemption."""

import json
import os
import shutil
import signal

import chex
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from d2vjax import checkpointing as ckpt


def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _state(sharding=None, seed=0):
  """A small train state shaped like the trainer's: params, teacher, adam opt_state, step."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {"encoder": {"w": jax.random.normal(k1, (8, 6)), "b": jnp.arange(8.0)},
            "head": {"w": jax.random.normal(k2, (16, 3))}}
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  # One real update so mu/nu/count are not all zeros.
  grads = jax.tree.map(jnp.ones_like, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  state = {"params": params, "teacher": jax.tree.map(lambda x: x * 0.5, params),
           "opt_state": opt_state, "step": jnp.int32(1)}
  if sharding is not None:
    state = jax.tree.map(lambda x: jax.device_put(x, sharding(x)), state)
  return state


def _abstract(state, sharding_fn):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)),
                      state)


def _leading(mesh, axis="data"):
  """Leading dim over ``axis`` where it divides, replicated otherwise (scalars, count)."""
  def fn(x):
    n = mesh.shape[axis]
    if x.ndim and x.shape[0] % n == 0:
      return NamedSharding(mesh, P(axis))
    return NamedSharding(mesh, P())
  return fn


def _single(x):
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def test_round_trip_with_adam_state_and_config(tmp_path):
  state = _state()
  cfg = ml_collections.ConfigDict({"optim": {"peak_lr": 5e-4}, "name": "x"})
  mngr = ckpt.make_manager(tmp_path, save_interval_steps=1, with_data_iter=False)
  assert ckpt.save(mngr, 1, state, config=cfg)
  ckpt.wait(mngr)
  restored, step = ckpt.restore_latest(mngr, _abstract(state, _single))
  assert step == 1
  chex.assert_trees_all_equal(restored, state)
  # The optax state comes back as the same namedtuples, not lists.
  chex.assert_trees_all_equal_structs(restored["opt_state"], state["opt_state"])
  assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
  assert ckpt.read_config(tmp_path) == {"optim": {"peak_lr": 5e-4}, "name": "x"}
  assert ckpt.latest_step(tmp_path) == 1


def test_async_save_survives_deleting_the_state(tmp_path):
  """The trainer donates the state to the next step right after ``save`` returns."""
  mesh8 = _mesh((8,), ("data",))
  state = _state(_leading(mesh8))
  want = jax.tree.map(np.asarray, state)
  abstract = _abstract(state, _leading(mesh8))
  mngr = ckpt.make_manager(tmp_path, save_interval_steps=1, with_data_iter=False)
  assert ckpt.save(mngr, 2, state)
  jax.tree.map(lambda a: a.delete(), state)
  ckpt.wait(mngr)
  restored, _ = ckpt.restore_latest(mngr, abstract)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, restored), want)


def test_restore_latest_empty_dir(tmp_path):
  mngr = ckpt.make_manager(tmp_path / "none", with_data_iter=False)
  assert ckpt.restore_latest(mngr, _abstract(_state(), _single)) is None
  assert ckpt.latest_step(tmp_path / "nothing_here") is None
  assert ckpt.read_config(tmp_path / "nothing_here") is None


@pytest.mark.parametrize("target", ["mesh_4x2", "single"])
def test_restore_onto_other_mesh(tmp_path, target):
  mesh8 = _mesh((8,), ("data",))
  state = _state(_leading(mesh8))
  assert state["params"]["encoder"]["w"].sharding.spec == P("data")
  mngr = ckpt.make_manager(tmp_path, save_interval_steps=1, with_data_iter=False)
  ckpt.save(mngr, 3, state)
  ckpt.wait(mngr)

  if target == "mesh_4x2":
    mesh = _mesh((4, 2), ("data", "model"))
    fn = _leading(mesh)
  else:
    fn = _single
  # A fresh manager, as after a restart on another machine.
  restored, step = ckpt.restore_latest(ckpt.make_manager(tmp_path, with_data_iter=False),
                                       _abstract(state, fn))
  assert step == 3
  host = lambda t: jax.tree.map(np.asarray, t)
  chex.assert_trees_all_equal(host(restored), host(state))
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(_abstract(state, fn))):
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding, want.sharding)


def test_max_to_keep(tmp_path):
  state = _state()
  mngr = ckpt.make_manager(tmp_path, max_to_keep=2, save_interval_steps=1, with_data_iter=False)
  for s in range(1, 6):
    assert ckpt.save(mngr, s, state)
  ckpt.wait(mngr)
  assert list(mngr.all_steps()) == [4, 5]
  assert ckpt.complete_steps(tmp_path) == [4, 5]


def test_interval_and_force(tmp_path):
  state = _state()
  mngr = ckpt.make_manager(tmp_path, max_to_keep=None, save_interval_steps=3,
                           with_data_iter=False)
  started = [s for s in range(1, 11) if ckpt.save(mngr, s, state)]
  assert started == [3, 6, 9]  # not the first step either
  assert ckpt.save(mngr, 10, state, force=True)
  assert not ckpt.save(mngr, 10, state, force=True)  # already saved: no error, no rewrite
  ckpt.wait(mngr)
  assert ckpt.complete_steps(tmp_path) == [3, 6, 9, 10]


def _good_steps(tmp_path, steps):
  mngr = ckpt.make_manager(tmp_path, max_to_keep=None, save_interval_steps=1,
                           with_data_iter=False)
  states = {}
  for s in steps:
    states[s] = _state(seed=s)
    ckpt.save(mngr, s, states[s])
  ckpt.wait(mngr)
  mngr.close()
  return states


@pytest.mark.parametrize("damage", ["tmp_dir", "no_commit_marker", "no_metadata", "empty_dir"])
def test_interrupted_write_is_skipped(tmp_path, damage):
  """A killed save leaves step 3 half-written; the resumed run gets step 2 and can save 3."""
  states = _good_steps(tmp_path, [1, 2])
  # Fake the remains of a save of step 3 that was killed part-way.
  if damage == "tmp_dir":
    shutil.copytree(tmp_path / "2", tmp_path / "3.orbax-checkpoint-tmp-1234567")
  elif damage == "no_commit_marker":
    shutil.copytree(tmp_path / "2", tmp_path / "3")
    os.remove(tmp_path / "3" / "commit_success.txt")
  elif damage == "no_metadata":
    shutil.copytree(tmp_path / "2", tmp_path / "3")
    os.remove(tmp_path / "3" / "_CHECKPOINT_METADATA")
  else:
    os.makedirs(tmp_path / "3" / "state")
  assert ckpt.latest_step(tmp_path) == 2
  # A watcher (cleanup_incomplete=False) skips it too, without touching the directory.
  watcher = ckpt.make_manager(tmp_path, with_data_iter=False, cleanup_incomplete=False)
  assert ckpt.restore_latest(watcher, _abstract(states[2], _single))[1] == 2
  assert len(list(tmp_path.iterdir())) == 3

  mngr = ckpt.make_manager(tmp_path, max_to_keep=None, save_interval_steps=1,
                           with_data_iter=False)
  restored, step = ckpt.restore_latest(mngr, _abstract(states[2], _single))
  assert step == 2
  chex.assert_trees_all_equal(restored, states[2])
  # The resumed run can save step 3 again (a stale "3" would make orbax refuse it).
  assert ckpt.save(mngr, 3, restored)
  ckpt.wait(mngr)
  assert ckpt.latest_step(tmp_path) == 3


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unloadable_step_falls_back(tmp_path):
  states = _good_steps(tmp_path, [1, 2])
  # Committed but with its array data gone (e.g. a truncated copy).
  shutil.rmtree(tmp_path / "2" / "state" / "ocdbt.process_0")
  shutil.rmtree(tmp_path / "2" / "state" / "d", ignore_errors=True)
  mngr = ckpt.make_manager(tmp_path, with_data_iter=False)
  restored, step = ckpt.restore_latest(mngr, _abstract(states[1], _single))
  assert step == 1
  chex.assert_trees_all_equal(restored, states[1])


def test_data_iterator_round_trip(tmp_path):
  ds = grain.MapDataset.range(100).to_iter_dataset()
  it = iter(ds)
  for _ in range(7):
    next(it)
  state = _state()
  mngr = ckpt.make_manager(tmp_path, save_interval_steps=1)
  ckpt.save(mngr, 7, state, data_iter=it)
  # The position is captured during save (async): advancing now must not leak into it.
  next(it)
  next(it)
  ckpt.wait(mngr)

  fresh = iter(ds)
  restored, step = ckpt.restore_latest(ckpt.make_manager(tmp_path), _abstract(state, _single),
                                       data_iter=fresh)
  assert step == 7
  assert next(fresh) == 7
  assert next(fresh) == 8
  assert json.loads((tmp_path / "7" / "data_iter" / "process_0-of-1.json").read_text())


def test_restore_params_only(tmp_path):
  mesh8 = _mesh((8,), ("data",))
  state = _state(_leading(mesh8))
  mngr = ckpt.make_manager(tmp_path, save_interval_steps=1, with_data_iter=False)
  ckpt.save(mngr, 5, state)
  ckpt.wait(mngr)
  params = ckpt.restore_params_only(tmp_path)
  assert set(params) == {"encoder", "head"}
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(state["params"])):
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, np.asarray(want))
  teacher_w = ckpt.restore_params_only(tmp_path, 5, subtree="teacher/encoder")["w"]
  np.testing.assert_array_equal(teacher_w, np.asarray(state["teacher"]["encoder"]["w"]))
  with pytest.raises(KeyError, match="ema_params"):
    ckpt.restore_params_only(tmp_path, subtree="ema_params")


def test_preemption_handler_sets_flag_and_restores_handlers():
  seen = []
  original = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
  try:
    before_term = signal.getsignal(signal.SIGTERM)
    before_usr1 = signal.getsignal(signal.SIGUSR1)
    with ckpt.PreemptionHandler() as handler:
      assert not handler.should_stop()
      os.kill(os.getpid(), signal.SIGTERM)
      assert handler.requested and handler.should_stop()
      assert handler.signal_number == signal.SIGTERM
      handler.reset()
      os.kill(os.getpid(), signal.SIGUSR1)
      assert handler.should_stop()
    assert signal.getsignal(signal.SIGTERM) is before_term
    assert signal.getsignal(signal.SIGUSR1) is before_usr1
    assert not seen  # the previous handler did not run while ours was installed
    os.kill(os.getpid(), signal.SIGTERM)  # the restored handler runs again
    assert seen == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, original)


def test_preemption_handler_consults_manager(tmp_path):
  class FakeManager:
    def reached_preemption(self, step):
      return step == 4

  handler = ckpt.PreemptionHandler().install()
  try:
    assert not handler.should_stop(FakeManager(), 3)
    assert handler.should_stop(FakeManager(), 4)
    mngr = ckpt.make_manager(tmp_path, with_data_iter=False)  # the real one: no preemption
    assert not handler.should_stop(mngr, 4)
  finally:
    handler.uninstall()
