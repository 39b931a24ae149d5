"""Round trip d2vjax → Hugging Face export (safetensors + config.json) → HF PyTorch forward equals
the d2vjax forward; the CLI converts an HF directory and exports it back (issue #9)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from _convert_util import (assert_layers_match, assert_text_matches, d2v_forward, hf_layers,
                           rel_err, torch_or_skip)
from d2vjax import convert, export, registry
from d2vjax.convert import hf_export

torch, transformers = torch_or_skip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _d2v_params(config_spec, seed=0):
  """Test-size d2vjax model with every leaf perturbed (norm gains/biases included)."""
  c = convert.load_config(os.path.join(ROOT, "configs", config_spec))
  objective = registry.get("objective", c.objective)(c)
  params = jax.jit(objective.init)(jax.random.key(seed), objective.modality.dummy_batch(c.data))
  rng = np.random.default_rng(seed)
  noisy = jax.tree.map(lambda a: np.asarray(a) + 0.05 * rng.standard_normal(a.shape).astype(
      np.float32), params)
  return noisy, c


def _load_hf(out_dir, **kw):
  cfg = json.load(open(os.path.join(out_dir, "config.json")))
  cls = getattr(transformers, cfg["architectures"][0])
  model, info = cls.from_pretrained(out_dir, output_loading_info=True, **kw)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  return model.eval(), cfg


@pytest.mark.parametrize("spec", ["w2v2_base.py:test", "w2v2_large.py:test",
                                  "speech_base.py:test"])
def test_speech_round_trip(spec, tmp_path):
  params, c = _d2v_params(spec)
  out = hf_export.export_hf(params, c, str(tmp_path / "hf"))
  model, cfg = _load_hf(out)
  base = model.wav2vec2 if cfg["architectures"] == ["Wav2Vec2ForPreTraining"] else model
  wav = np.random.default_rng(0).standard_normal((2, 8000)).astype(np.float32)
  pad = np.zeros(wav.shape, bool)
  pad[1, 5000:] = True
  wav[pad] = 0
  got = d2v_forward(params, c, {"audio": wav, "padding_mask": pad})
  kw = {"input_values": torch.from_numpy(wav), "attention_mask": torch.from_numpy(~pad).long()}
  if c.model.encoder.pos_encoder == "conv_stack":  # HF leaks padding through the conv stack
    kw = {"input_values": torch.from_numpy(wav[:1])}
    got = (got[0][:1], got[1][:, :1], got[2][:1])
  last, layers = hf_layers(base, base.encoder.layers, **kw)
  assert_layers_match(got, last, layers, valid=~got[2])
  if "final_proj" in params:  # pre-training heads exported as ForPreTraining's
    np.testing.assert_allclose(model.project_hid.weight.detach().numpy(),
                               params["final_proj"]["kernel"].T)
    np.testing.assert_allclose(model.quantizer.codevectors.detach().numpy()[0],
                               params["quantizer"]["vars"])


def test_vision_round_trip(tmp_path):
  params, c = _d2v_params("vision_base.py:test")
  model, _ = _load_hf(hf_export.export_hf(params, c, str(tmp_path / "hf")))
  s = int(c.data.image_size)
  images = np.random.default_rng(0).standard_normal((2, s, s, 3)).astype(np.float32)
  got = d2v_forward(params, c, {"image": images})
  last, layers = hf_layers(model, model.encoder.layer,
                           pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  assert_layers_match(got, last, layers)


def test_text_round_trip(tmp_path):
  params, c = _d2v_params("text_base.py:test")
  model, _ = _load_hf(hf_export.export_hf(params, c, str(tmp_path / "hf")),
                      add_pooling_layer=False)
  assert_text_matches(model, params, c, length=16, pad_from=9, vocab=200)


def test_cli_hf_directory_to_msgpack_and_back(tmp_path):
  """``python -m d2vjax.convert --from=hf`` on a save_pretrained directory, ``load_model`` on the
  result, ``--to=hf`` back: the re-exported weights equal the original ones."""
  cfg = transformers.Data2VecAudioConfig(
      hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
      conv_dim=[32] * 7, num_conv_pos_embedding_groups=4, num_conv_pos_embeddings=3,
      conv_pos_kernel_size=5, mask_time_prob=0.05)
  torch.manual_seed(0)
  src = transformers.Data2VecAudioModel(cfg)
  src.save_pretrained(str(tmp_path / "src"))
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  run = lambda *a: subprocess.run([sys.executable, "-m", "d2vjax.convert", *a], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=300)
  msg = str(tmp_path / "p.msgpack")
  r = run("--from=hf", f"--in={tmp_path / 'src'}", f"--out={msg}")
  assert r.returncode == 0, r.stderr[-2000:]
  sidecar = json.load(open(str(tmp_path / "p.json")))
  assert sidecar["converted_from"]["initialised"].keys() == {"head/proj/kernel", "head/proj/bias"}
  objective, params, config = export.load_model(msg)
  assert config.model.encoder.num_layers == 2
  r = run("--to=hf", f"--in={msg}", f"--out={tmp_path / 'back'}")
  assert r.returncode == 0, r.stderr[-2000:]
  back, _ = _load_hf(str(tmp_path / "back"))
  a, b = src.state_dict(), back.state_dict()
  assert set(a) == set(b)
  for k in a:
    assert rel_err(b[k].numpy(), a[k].numpy()) < 1e-6, k
