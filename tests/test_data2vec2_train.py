"""data2vec 2.0 configs and the shared trainer: parameter counts of every d2v2 config against
closed-form counts of the spec's architecture (§6.2, §6.5, §8.1), config invariants, and an
end-to-end ``train.run`` of the speech test preset (checkpoint, export, metrics)."""

import json
import os

import jax
import numpy as np
import pytest

from d2vjax import checkpointing, export, registry, summary, train
from test_data2vec2_model import load_config


def _block(d, f):
  """Params of one post-LN block: qkv + out-proj with biases, fc1/fc2, two affine LNs."""
  return 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d


def _conv_decoder(d, dd, k, layers, groups, proj, spatial=1):
  n, c = 0, d
  for _ in range(layers):
    n += k ** spatial * (c // groups) * dd + dd
    c = dd
  return n + (dd * 2 * dd + 2 * dd + 2 * dd * d + d if proj == 2 else dd * d + d)


@pytest.mark.parametrize("name,want", [
    ("speech_d2v2_base", dict(encoder=12 * _block(768, 3072),
                              decoder=_conv_decoder(768, 384, 7, 4, 16, 1))),
    ("speech_d2v2_large", dict(encoder=16 * _block(1024, 4096),
                               decoder=_conv_decoder(1024, 768, 7, 4, 16, 1))),
    ("vision_d2v2_base", dict(encoder=10 * _block(768, 3072),
                              decoder=_conv_decoder(768, 768, 3, 6, 16, 1, spatial=2),
                              frontend=16 * 16 * 3 * 768 + 768)),
    ("vision_d2v2_large", dict(encoder=24 * _block(1024, 4096),
                               decoder=_conv_decoder(1024, 1024, 5, 3, 16, 1, spatial=2))),
    ("text_d2v2_base", dict(encoder=12 * _block(768, 3072),
                            decoder=_conv_decoder(768, 768, 9, 5, 1, 2),
                            frontend=50265 * 768 + 514 * 768 + 2 * 768)),
    ("text_d2v2_large", dict(encoder=24 * _block(1024, 4096),
                             decoder=_conv_decoder(1024, 768, 9, 5, 1, 2))),
])
def test_parameter_counts_match_the_architecture(name, want):
  c = load_config(name, None)
  text = summary.summarize(c)
  rows = {line.split()[0]: int(line.split()[2].replace(",", "")) for line in
          text.splitlines()[1:-1]}
  for module, n in want.items():
    assert rows[module] == n, (name, module, rows[module], n)
  prenet = c.model.context.prenet_depth
  if prenet:  # Large speech: 8 prenet blocks; Base vision: 2 (spec §8.1)
    d, f = (1024, 4096) if "large" in name else (768, 3072)
    assert rows["context"] >= prenet * _block(d, f)
  assert text.splitlines()[-1] == f"total_params: {sum(rows.values())}"


def test_configs_follow_the_spec_tables():
  s, v, t = (load_config(n, None) for n in ("speech_d2v2_base", "vision_d2v2_base",
                                            "text_d2v2_base"))
  assert (s.masking.clones, v.masking.clones, t.masking.clones) == (8, 16, 8)
  assert (s.targets.top_k, v.targets.top_k, t.targets.top_k) == (8, 10, 12)
  assert v.loss.cls_weight == 0.01 and s.loss.cls_weight == 0 == t.loss.cls_weight
  assert s.model.context.alibi and not v.model.context.alibi and not t.model.context.alibi
  obj = registry.get("objective", "data2vec2")
  assert obj(v).num_kept(196) == 39 and obj(t).num_kept(512) == 266
  assert obj(s).num_kept(999) == 500
  # The CPU presets keep the structure (prenet, CLS, ALiBi, clones) at CPU scale.
  vc = load_config("vision_d2v2_base", "cpu")
  assert vc.model.context.prenet_depth == 1 and vc.model.context.extra_tokens == 1
  assert load_config("speech_d2v2_base", "cpu").total_steps == 300


def test_train_run_end_to_end_speech_test_preset(tmp_path):
  """Smoke test plus checks: 8 steps through the shared trainer, metrics per step with exactly
  half of the frames masked, a checkpoint holding the EMA teacher, and an export."""
  c = load_config("speech_d2v2_base", "test")
  c.num_devices = 1
  workdir = str(tmp_path / "run")
  assert train.run(c, workdir) == 0
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  logged = [r for r in rows if "loss" in r]
  assert [r["step"] for r in logged] == list(range(1, 9))
  for r in logged:
    assert np.isfinite(r["loss"]) and r["masked_frac"] == pytest.approx(24 / 49)
  assert checkpointing.latest_step(os.path.join(workdir, "checkpoints")) == 8
  _, params, config = export.load_model(os.path.join(workdir, "export", "params.msgpack"))
  assert config.objective == "data2vec2" and set(params) == {"frontend", "context", "encoder",
                                                             "decoder"}
