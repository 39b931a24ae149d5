"""The fine-tuning program (issue 7, items 1–2): initialisation from a pre-training export, the
normalisation check, the loop with validation WER/CER and the best checkpoint, resume, export,
and the ``evaluate`` entry point."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import serialization

from d2vjax import asr, checkpointing, configs_ctc, configs_lib, export, features
from d2vjax import finetune, registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _export(tmp_path, normalize: bool = True) -> str:
  """A pre-training export (msgpack + sidecar, as ``d2vjax.export`` writes) of a randomly
  initialised ``:test``-size data2vec model."""
  c = configs_lib.data2vec_speech("base")
  configs_lib.test_preset(c)
  c.data.normalize = normalize
  obj = registry.get("objective", "data2vec")(c)
  params = jax.jit(obj.init)(jax.random.key(0), obj.modality.dummy_batch(c.data))
  path = tmp_path / "pre.msgpack"
  path.write_bytes(serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))
  (tmp_path / "pre.json").write_text(json.dumps({"config": json.loads(c.to_json_best_effort())}))
  return str(path)


def _config(init: str, steps: int = 6):
  c = configs_ctc.ctc_config("base", "10m")
  configs_ctc.test_preset(c, total_steps=steps)
  c.init = init
  c.num_devices = 2  # rows split over two (fake CPU) devices
  c.eval.every = 2
  return c


def test_normalization_mismatch_is_refused(tmp_path):
  """A checkpoint pre-trained on normalised waveforms cannot be fine-tuned on raw ones (and the
  error names the fix); unset, the checkpoint's setting is used."""
  init = _export(tmp_path, normalize=True)
  c = _config(init)
  c.data.normalize = False
  with pytest.raises(finetune.NormalizeMismatchError,
                     match=r"normalize=True.*--config\.data\.normalize=true"):
    finetune.run(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")  # refused before any work
  _, pre = finetune.load_init(init, with_params=False)
  vocab = asr.Vocabulary.build(["A"])
  c.data.normalize = None
  r = finetune.resolve_config(c, pretrained=pre, vocab=vocab, init=init)
  assert r.data.normalize is True and r.masking.min_masks == 1
  assert r.finetune.mask_kind == "learned" and r.finetune.pretrained_objective == "data2vec"
  assert r.model.encoder.dim == 64 and r.vocab == list(vocab.tokens)
  with pytest.raises(ValueError, match="from-scratch"):
    finetune.resolve_config(c, pretrained=None, vocab=vocab)
  w2v = dict(pre, objective="wav2vec2")
  assert finetune.resolve_config(c, pretrained=w2v, vocab=vocab).masking.min_masks == 2
  d2v2 = finetune.resolve_config(c, pretrained=dict(pre, objective="data2vec2"), vocab=vocab)
  assert d2v2.finetune.mask_kind == "noise" and d2v2.masking.min_masks == 1


@pytest.mark.slow
def test_finetune_resume_best_checkpoint_evaluate(tmp_path):
  """4 steps, a new run resumes to 6: validation every 2 steps, the lowest-WER params kept in
  best/, the encoder initialised from the export, the fine-tuned export loads, and the evaluate
  CLI reproduces the loop's numbers from the best checkpoint."""
  init = _export(tmp_path)
  workdir = str(tmp_path / "ft")
  c = _config(init)
  c.stop_after_steps = 4
  assert finetune.run(c, workdir) == 0
  assert checkpointing.latest_step(os.path.join(workdir, "checkpoints")) == 4
  pre = export.load_params(init)
  assert finetune.run(_config(init), workdir) == 0

  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = {r["step"]: r for r in rows if "loss" in r}
  assert sorted(train_rows) == list(range(1, 7))
  assert [train_rows[s]["frozen"] for s in (1, 2, 3)] == [1.0, 1.0, 0.0]
  assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in train_rows.values())
  valid = {r["step"]: r for r in rows if "valid/wer" in r}
  assert sorted(valid) == [2, 4, 6]
  for r in valid.values():
    assert 0 <= r["valid/cer"] and r["valid/utterances"] == 20  # clips ≤ 2.5 s of 30
  best = json.load(open(os.path.join(workdir, "best.json")))
  assert best["wer"] == min(r["valid/wer"] for r in valid.values())
  assert checkpointing.latest_step(os.path.join(workdir, "best")) == best["step"]
  text = [json.loads(l) for l in open(os.path.join(workdir, "text.jsonl"))]
  assert any(t["tag"] == "valid/samples" and "REF:" in t["text"] for t in text)
  assert open(os.path.join(workdir, "dict.ltr.txt")).readline().startswith("| ")
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["stop_reason"] == "finished" and summary["step"] == 6
  assert summary["compiles"] == 1  # one bucket: one fine-tuning step program (resumed run)

  # Pre-trained parts were loaded (the CNN never trains, so it still equals the export's).
  final = checkpointing.restore_params_only(os.path.join(workdir, "checkpoints"))
  jax.tree.map(np.testing.assert_array_equal, final["frontend"]["cnn"], pre["frontend"]["cnn"])
  assert "head" not in final and final["proj"]["kernel"].shape[0] == 64

  # The export rebuilds the fine-tuned model; its features come from the fine-tuned encoder.
  objective, params, config = export.load_model(os.path.join(workdir, "export", "params.msgpack"))
  assert config.objective == "ctc" and len(objective.vocab) == len(config.vocab)
  wav = np.random.default_rng(0).standard_normal((1, 16000)).astype(np.float32)
  f = features.extract(params, config, {"audio": wav}, layers=[-1])
  assert f.layers[2].shape == (1, 49, 64)

  # The evaluate entry point decodes the best checkpoint to the loop's numbers. Two devices, as
  # in the loop: the same per-device programs give the same argmaxes.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-m", "d2vjax.evaluate", f"--workdir={workdir}",
                         f"--out={tmp_path / 'eval.json'}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert f"valid @ step {best['step']}: WER" in proc.stdout and "REF:" in proc.stdout
  out = json.load(open(tmp_path / "eval.json"))
  assert out["step"] == best["step"] and len(out["hypotheses"]) == 20
  assert out["checkpoint"].endswith("best") and out["utterances"] == 20
  assert out["wer"] == pytest.approx(best["wer"]) and out["cer"] == pytest.approx(best["cer"])
  assert out["loss"] == pytest.approx(best["loss"], rel=1e-4)
