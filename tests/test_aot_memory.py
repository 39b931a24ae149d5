"""Ahead-of-time memory check (bench/aot_memory.py, issue 8): the compiled step's memory analysis
agrees with what the sharding rules predict, on 8 fake CPU devices."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from d2vjax import configs_lib, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _aot():
  spec = importlib.util.spec_from_file_location("aot_memory",
                                                os.path.join(ROOT, "bench", "aot_memory.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _config(mesh):
  c = configs_lib.data2vec_speech("base")
  configs_lib.test_preset(c)
  # Matrices above the fsdp size floor (2**14 elements), so fsdp has something to shard.
  c.model.encoder.update(dict(dim=128, ffn_dim=256, num_heads=2))
  c.mesh = mesh
  return c


@pytest.mark.slow
def test_compiled_memory_matches_the_sharding_rules():
  aot = _aot()
  fsdp = aot.analyse(_config((("data", 1), ("fsdp", 8))), jax.devices())
  # The whole state is donated: XLA aliases exactly the state shard the rules declare, and the
  # arguments are that shard plus this device's rows of the batch.
  assert fsdp["alias_bytes"] == fsdp["state_shard_bytes"]
  batch_shard = sum(int(np.prod(s)) // 8 * (4 if k == "audio" else 1)
                    for k, s in fsdp["batch"].items())
  assert fsdp["argument_bytes"] == fsdp["state_shard_bytes"] + batch_shard
  assert fsdp["temp_bytes"] > 0
  assert fsdp["peak_bytes"] == (fsdp["argument_bytes"] + fsdp["output_bytes"]
                                - fsdp["alias_bytes"] + fsdp["temp_bytes"])
  # Replicated (data=8) state per device, from the rules alone (no compile): fsdp=8 holds far less.
  setup = train.build(_config((("data", 8), ("fsdp", 1))), jax.devices())
  replicated = aot.state_bytes_per_device(train.abstract_state(setup))
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.state_shape))
  assert replicated == total
  assert fsdp["state_shard_bytes"] < 0.3 * replicated
