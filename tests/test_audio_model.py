"""Speech model pieces against independent NumPy references (fairseq-spec §1.2-1.5,
pitfalls §11.22-28).

Every reference below is written from the spec in float64 NumPy; module parameters are random
(drawn from the shapes ``jax.eval_shape`` reports, so no init program has to be compiled) to make
sure affine terms, biases and gains are actually exercised. Tolerances: fp32 JAX vs float64 NumPy,
``rtol=atol=1e-5`` unless stated.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from d2vjax import configs_lib, registry
from d2vjax.models import audio, layers, transformer

TOL = dict(rtol=1e-5, atol=1e-5)
SPEC_CONV = [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2  # (kernel, stride), fairseq-spec §1.2


# ----------------------------------------------------------------------------- NumPy references


def np_gelu(x):
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def np_ln(x, scale=None, bias=None, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  y = (x - mean) / np.sqrt(var + eps)
  if scale is not None:
    y = y * scale + bias
  return y


def np_conv_valid(x, kernel, stride, bias=None):
  """PyTorch Conv1d, no padding: x [B, L, Cin], kernel [k, Cin, Cout] → [B, T, Cout] with
  T = floor((L - k) / s) + 1."""
  k = kernel.shape[0]
  win = np.lib.stride_tricks.sliding_window_view(x, k, axis=1)[:, ::stride]  # [B, T, Cin, k]
  y = np.einsum("btck,kco->bto", win, kernel)
  return y if bias is None else y + bias


def np_grouped_same_conv(x, kernel, bias, groups):
  """Conv1d(D→D, groups, padding k//2) + SamePad (drop the last frame for even k). x [B, T, D]."""
  k, cg, d = kernel.shape
  t = x.shape[1]
  xp = np.pad(x, ((0, 0), (k // 2, k // 2), (0, 0)))
  win = np.lib.stride_tricks.sliding_window_view(xp, k, axis=1)  # [B, T', D, k]
  og = d // groups
  outs = [np.einsum("btck,kco->bto", win[:, :, j * cg:(j + 1) * cg],
                    kernel[:, :, j * og:(j + 1) * og]) for j in range(groups)]
  y = np.concatenate(outs, -1) + bias
  if k % 2 == 0:
    y = y[:, :-1]
  assert y.shape[1] == t
  return y


def np_mha(x, pad, p, num_heads):
  dh = x.shape[-1] // num_heads
  proj = lambda n: np.einsum("btd,dhe->bthe", x, p[n]["kernel"]) + p[n]["bias"]
  q = proj("q_proj") * dh ** -0.5  # scaled after the projection, bias included (spec §1.5)
  k, v = proj("k_proj"), proj("v_proj")
  logits = np.einsum("bqhe,bkhe->bhqk", q, k)
  logits = np.where(pad[:, None, None, :], -np.inf, logits)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhe->bqhe", probs, v)
  return np.einsum("bqhe,hed->bqd", out, p["out_proj"]["kernel"]) + p["out_proj"]["bias"]


def np_layer(x, pad, p, num_heads, layer_norm_first):
  """One TransformerSentenceEncoderLayer (spec §1.4), dropout 0. Returns (x, layer_result)."""
  ln = lambda n, y: np_ln(y, p[n]["norm"]["scale"], p[n]["norm"]["bias"])
  ffn = lambda y: (np_gelu(y @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"]
                   + p["fc2"]["bias"])
  if layer_norm_first:
    x = x + np_mha(ln("self_attn_layer_norm", x), pad, p["self_attn"], num_heads)
    f = ffn(ln("final_layer_norm", x))
    return x + f, f
  x = ln("self_attn_layer_norm", x + np_mha(x, pad, p["self_attn"], num_heads))
  f = ffn(x)
  return ln("final_layer_norm", x + f), f


# ----------------------------------------------------------------------------- helpers


def random_params(shapes, rng, kernel_gain=1.0):
  """Random float32 params with the structure of ``shapes``: LN scales ~1, biases ~0.1, kernels
  ~N(0, gain²/fan_in) with fan_in = all axes but the last (leading scan axes of size 1 ignored)."""

  def leaf(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    shape = s.shape
    if name == "scale":
      a = 1.0 + 0.2 * rng.standard_normal(shape)
    elif name in ("bias",) or name.endswith("_bias"):
      a = 0.1 * rng.standard_normal(shape)
    elif name == "weight_g":
      a = 0.5 + rng.random(shape)
    else:
      fan_in = int(np.prod([d for d in shape[:-1] if d != 1] or [1]))
      a = kernel_gain * rng.standard_normal(shape) / math.sqrt(fan_in)
    return a.astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def tiny_speech_config(pos_depth=5, num_layers=2):
  """The cpu preset, shrunk further (D 64, CNN 32 channels) to keep XLA compiles short on CI."""
  c = configs_lib.data2vec_speech("base")
  configs_lib.cpu_preset(c)
  c.model.conv_channels = 32
  c.model.encoder.dim = 64
  c.model.encoder.ffn_dim = 128
  c.model.encoder.num_heads = 4
  c.model.encoder.num_layers = num_layers
  c.model.encoder.pos_depth = pos_depth
  c.targets.top_k = min(c.targets.top_k, num_layers)
  return c


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_layer_norm_matches_two_pass_numpy(offset):
  """layers.LayerNorm is fairseq's Fp32LayerNorm (PyTorch F.layer_norm in fp32, a numerically stable
  variance): it must match a two-pass float64 reference also when the features carry a DC offset
  (mean/std = 100 here). Tolerance 1e-4: a two-pass fp32 LN (flax ``use_fast_variance=False``) is
  within ~2e-5 of float64 on this input (the fp32 mean of values ~100 is off by ~1 ulp); the
  E[x²] − E[x]² "fast variance" is off by ~1e-2."""
  rng = np.random.default_rng(10)
  x = (offset + rng.standard_normal((4, 64))).astype(np.float32)
  scale = (1 + 0.2 * rng.standard_normal(64)).astype(np.float32)
  bias = (0.1 * rng.standard_normal(64)).astype(np.float32)
  m = layers.LayerNorm()
  p = {"params": {"norm": {"scale": scale, "bias": bias}}}
  got = np.asarray(m.apply(p, x))
  np.testing.assert_allclose(got, np_ln(x.astype(np.float64), scale, bias), rtol=1e-4, atol=1e-4)
  # bf16 in, bf16 out, statistics in fp32.
  got16 = m.apply(p, jnp.asarray(x - offset, jnp.bfloat16))
  assert got16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got16, np.float32),
                             np_ln((x - offset).astype(np.float64), scale, bias), atol=0.05)


def test_exact_gelu():
  x = np.linspace(-6, 6, 241).astype(np.float32)
  np.testing.assert_allclose(np.asarray(layers.gelu(x)), np_gelu(x.astype(np.float64)),
                             rtol=1e-6, atol=1e-7)


def _zero_batch(b, s):
  """All-zero pre-training batch (audio, padding_mask, mask) of b rows × s samples."""
  return {"audio": np.zeros((b, s), np.float32), "padding_mask": np.zeros((b, s), bool),
          "mask": np.zeros((b, audio.num_frames(s)), bool)}


# ----------------------------------------------------------------------------- frame counts


def _np_num_frames(n):
  for k, s in SPEC_CONV:
    n = max(0, math.floor((n - k) / s + 1))
  return n


def test_num_frames_published_values():
  assert audio.num_frames(320000) == 999
  assert audio.num_frames(250000) == 781
  assert audio.num_frames(32000) == 99
  assert audio.num_frames(400) == 1  # receptive field 400 samples
  assert audio.num_frames(399) == 0
  assert audio.num_frames(0) == 0


def test_num_frames_matches_per_layer_formula():
  rng = np.random.default_rng(0)
  lengths = np.concatenate([rng.integers(0, 2000, 300), rng.integers(2000, 400000, 300)])
  got = audio.num_frames(lengths)
  want = np.array([_np_num_frames(int(n)) for n in lengths])
  np.testing.assert_array_equal(got, want)
  # Total stride 320, receptive field 400: T = floor((S - 400) / 320) + 1 for S >= 400.
  big = lengths[lengths >= 400]
  np.testing.assert_array_equal(audio.num_frames(big), (big - 400) // 320 + 1)


def test_frame_padding_mask():
  s = 16000
  valid = np.array([s, 15999, 12345, 8000, 401, 399, 0, 3200])
  sample_pad = np.arange(s)[None, :] >= valid[:, None]
  t = audio.num_frames(s)
  got = np.asarray(audio.frame_padding_mask(jnp.asarray(sample_pad), t))
  want = np.arange(t)[None, :] >= audio.num_frames(valid)[:, None]
  np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("size,expected,published", [
    ("base", 93_164_288, 93.2e6),  # = Hugging Face Data2VecAudioModel default config
    ("large", None, 313.3e6),
])
def test_parameter_count_without_head(size, expected, published):
  c = configs_lib.data2vec_speech(size)
  obj = registry.get("objective", "data2vec")(c)
  shapes = jax.eval_shape(obj.init, jax.random.key(0), _zero_batch(1, 16000))
  n = sum(int(np.prod(x.shape)) for k, v in shapes.items() if k != "head"
          for x in jax.tree.leaves(v))
  assert abs(n - published) / published < 0.005, n
  if expected is not None:
    assert n == expected
  # The head is final_proj Linear(D → D) with bias.
  d = obj.encoder_cfg.dim
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["head"])) == d * d + d


# ----------------------------------------------------------------------------- CNN


def np_cnn(wav, p, mode):
  x = wav[..., None].astype(np.float64)
  for i, (k, s) in enumerate(SPEC_CONV):
    c = p[f"conv_{i}"]
    x = np_conv_valid(x, c["kernel"], s, c.get("bias"))
    if mode == "layer_norm":
      x = np_ln(x, p[f"norm_{i}"]["norm"]["scale"], p[f"norm_{i}"]["norm"]["bias"])
    elif i == 0:  # GroupNorm(C groups, C channels): each channel over time, per utterance
      mean = x.mean(1, keepdims=True)
      var = ((x - mean) ** 2).mean(1, keepdims=True)
      x = (x - mean) / np.sqrt(var + 1e-5) * p["norm_0"]["scale"] + p["norm_0"]["bias"]
    x = np_gelu(x)
  return x


@pytest.mark.parametrize("mode,conv_bias", [("layer_norm", False), ("layer_norm", True),
                                            ("default", False)])
def test_conv_feature_extractor_matches_numpy(mode, conv_bias):
  rng = np.random.default_rng(2)
  wav = rng.standard_normal((2, 2000)).astype(np.float32)
  m = audio.ConvFeatureExtractor(mode, conv_bias, channels=16)
  shapes = jax.eval_shape(m.init, jax.random.key(0), wav)["params"]
  assert ("bias" in shapes["conv_0"]) == conv_bias
  if mode == "default":
    assert set(k for k in shapes if k.startswith("norm")) == {"norm_0"}
  # Kaiming-like gain 2 keeps the no-norm 'default' stack away from vanishing activations.
  p = random_params(shapes, rng, kernel_gain=2.0)
  got = np.asarray(jax.jit(m.apply)({"params": p}, wav))
  want = np_cnn(wav, f64(p), mode)
  assert got.shape == (2, audio.num_frames(2000), 16) == want.shape
  assert np.abs(want).mean() > 0.1  # non-degenerate activations
  np.testing.assert_allclose(got, want, **TOL)


# ----------------------------------------------------------------------------- positional convs


@pytest.mark.parametrize("width", [8, 7])
def test_weight_norm_pos_conv_matches_numpy(width):
  rng = np.random.default_rng(3)
  d, groups = 32, 4
  x = rng.standard_normal((2, 11, d)).astype(np.float32)
  m = audio.WeightNormPosConv(d, width, groups)
  shapes = jax.eval_shape(m.init, jax.random.key(0), x)["params"]
  assert shapes["weight_v"].shape == (width, d // groups, d)
  assert shapes["weight_g"].shape == (width,)  # one gain per kernel tap (PyTorch dim=2)
  p = random_params(shapes, rng)
  got = np.asarray(m.apply({"params": p}, x))
  q = f64(p)
  v = q["weight_v"]
  # weight_norm(dim=2): norm over every axis except the kernel axis, i.e. (in/groups, out) here.
  w = q["weight_g"][:, None, None] * v / np.sqrt((v ** 2).sum(axis=(1, 2), keepdims=True))
  want = np_gelu(np_grouped_same_conv(x.astype(np.float64), w, q["bias"], groups))
  np.testing.assert_allclose(got, want, **TOL)


def test_weight_norm_pos_conv_init_weight_equals_v():
  d, k, groups = 32, 8, 4
  x = np.zeros((1, 5, d), np.float32)
  p = jax.jit(audio.WeightNormPosConv(d, k, groups).init)(jax.random.key(1), x)["params"]
  v = np.asarray(p["weight_v"], np.float64)
  norm = np.sqrt((v ** 2).sum(axis=(1, 2)))
  np.testing.assert_allclose(np.asarray(p["weight_g"]), norm, rtol=1e-6)
  w = np.asarray(p["weight_g"])[:, None, None] * v / norm[:, None, None]
  np.testing.assert_allclose(w, v, rtol=1e-6, atol=1e-9)
  # Init std sqrt(4 / (k D)) (spec §1.3a), within sampling error over k·D²/groups entries.
  assert abs(v.std() / math.sqrt(4 / (k * d)) - 1) < 0.1
  np.testing.assert_array_equal(np.asarray(p["bias"]), 0)


@pytest.mark.parametrize("width,depth", [(15, 3), (8, 2), (5, 5)])
def test_pos_conv_stack_matches_numpy(width, depth):
  rng = np.random.default_rng(4)
  d, groups = 32, 4
  k = max(3, width // depth)
  x = rng.standard_normal((2, 13, d)).astype(np.float32)
  m = audio.PosConvStack(d, width, groups, depth)
  shapes = jax.eval_shape(m.init, jax.random.key(0), x)["params"]
  assert set(shapes) == {f"conv_{j}_{n}" for j in range(depth) for n in ("kernel", "bias")}
  assert shapes["conv_0_kernel"].shape == (k, d // groups, d)  # the LNs have no affine params
  p = random_params(shapes, rng)
  got = np.asarray(m.apply({"params": p}, x))
  y, q = x.astype(np.float64), f64(p)
  for j in range(depth):
    y = np_gelu(np_ln(np_grouped_same_conv(y, q[f"conv_{j}_kernel"], q[f"conv_{j}_bias"], groups)))
  np.testing.assert_allclose(got, y, **TOL)


# ----------------------------------------------------------------------------- Transformer


def _encoder_cfg(**kw):
  base = dict(num_layers=1, dim=32, ffn_dim=64, num_heads=4, dropout=0.0, attention_dropout=0.0,
              pos_encoder="none")
  base.update(kw)
  return transformer.EncoderConfig(**base)


def _encoder_inputs(rng, b=3, t=9, d=32):
  x = rng.standard_normal((b, t, d)).astype(np.float32)
  pad = np.zeros((b, t), bool)
  pad[1, 6:] = True
  pad[2, 3:] = True
  return x, pad


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_encoder_layer_matches_numpy(layer_norm_first):
  rng = np.random.default_rng(5)
  cfg = _encoder_cfg(layer_norm_first=layer_norm_first)
  x, pad = _encoder_inputs(rng)
  enc = transformer.TransformerEncoder(cfg)
  shapes = jax.eval_shape(enc.init, jax.random.key(0), x, pad)["params"]
  p = random_params(shapes, rng, kernel_gain=1.5)
  got_x, got_lr = jax.jit(enc.apply)({"params": p}, x, pad)
  q = f64(p)
  layer = jax.tree.map(lambda a: a[0], q["layers"])  # scanned params: leading layer axis
  ln = lambda y: np_ln(y, q["layer_norm"]["norm"]["scale"], q["layer_norm"]["norm"]["bias"])
  h = np.where(pad[..., None], 0.0, x.astype(np.float64))  # padded frames zeroed first
  if not layer_norm_first:
    h = ln(h)  # post-LN models: LN before the first layer
  h, f = np_layer(h, pad, layer, cfg.num_heads, layer_norm_first)
  if layer_norm_first:
    h = ln(h)  # pre-LN models: final LN
  assert got_lr.shape == (1,) + x.shape
  np.testing.assert_allclose(np.asarray(got_x), h, **TOL)
  np.testing.assert_allclose(np.asarray(got_lr[0]), f, **TOL)
  # Non-degenerate FFN output, and the key padding really matters for these params: without it
  # the valid frames of the padded rows would change by far more than the tolerance.
  assert np.abs(f).mean() > 0.1
  h0 = np.where(pad[..., None], 0.0, x.astype(np.float64))
  h0 = h0 if layer_norm_first else ln(h0)
  _, f_nopad = np_layer(h0, np.zeros_like(pad), layer, cfg.num_heads, layer_norm_first)
  assert np.abs(f_nopad - f)[~pad].max() > 1e-2


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_layer_result_choices_match_numpy(layer_norm_first):
  """data2vec Table 4's target types: 'attn' = the self-attention module's output before the
  residual, 'ffn' = the FFN output before the residual, 'block' = the layer's output."""
  rng = np.random.default_rng(7)
  x, pad = _encoder_inputs(rng)
  got = {}
  for kind in ("attn", "ffn", "block"):
    cfg = _encoder_cfg(layer_norm_first=layer_norm_first, layer_result=kind)
    enc = transformer.TransformerEncoder(cfg)
    if kind == "attn":
      shapes = jax.eval_shape(enc.init, jax.random.key(0), x, pad)["params"]
      p = random_params(shapes, rng, kernel_gain=1.5)
    got[kind] = np.asarray(jax.jit(enc.apply)({"params": p}, x, pad)[1][0])
  q = f64(p)
  layer = jax.tree.map(lambda a: a[0], q["layers"])
  lnp = lambda n, y: np_ln(y, layer[n]["norm"]["scale"], layer[n]["norm"]["bias"])
  h = np.where(pad[..., None], 0.0, x.astype(np.float64))
  if not layer_norm_first:
    h = np_ln(h, q["layer_norm"]["norm"]["scale"], q["layer_norm"]["norm"]["bias"])
  attn_in = lnp("self_attn_layer_norm", h) if layer_norm_first else h
  want_attn = np_mha(attn_in, pad, layer["self_attn"], cfg.num_heads)
  want_block, want_ffn = np_layer(h, pad, layer, cfg.num_heads, layer_norm_first)
  np.testing.assert_allclose(got["attn"], want_attn, **TOL)
  np.testing.assert_allclose(got["ffn"], want_ffn, **TOL)
  np.testing.assert_allclose(got["block"], want_block, **TOL)
  assert np.abs(want_attn - want_ffn).max() > 0.1  # three different things
  with pytest.raises(ValueError, match="layer_result"):
    bad = transformer.TransformerEncoder(_encoder_cfg(layer_result="residual"))
    bad.init(jax.random.key(0), x, pad)


def test_encoder_scan_equals_unrolled():
  rng = np.random.default_rng(6)
  cfg = _encoder_cfg(num_layers=2, pos_encoder="conv_stack", pos_width=6, pos_depth=2,
                     pos_groups=4)
  x, pad = _encoder_inputs(rng)
  unrolled = transformer.TransformerEncoder(dataclasses.replace(cfg, scan=False))
  scanned = transformer.TransformerEncoder(cfg)
  shapes = jax.eval_shape(unrolled.init, jax.random.key(0), x, pad)["params"]
  p = random_params(shapes, rng)
  stacked = {k: v for k, v in p.items() if not k.startswith("layers_")}
  stacked["layers"] = jax.tree.map(lambda *a: np.stack(a), p["layers_0"], p["layers_1"])
  assert jax.tree.structure(stacked) == jax.tree.structure(
      jax.eval_shape(scanned.init, jax.random.key(0), x, pad)["params"])
  xu, lru = jax.jit(unrolled.apply)({"params": p}, x, pad)
  xs, lrs = jax.jit(scanned.apply)({"params": stacked}, x, pad)
  np.testing.assert_allclose(np.asarray(xs), np.asarray(xu), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(lrs), np.asarray(lru), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_layerdrop(layer_norm_first):
  rng = np.random.default_rng(7)
  cfg = _encoder_cfg(num_layers=2, layerdrop=1.0, layer_norm_first=layer_norm_first)
  x, pad = _encoder_inputs(rng)
  enc = transformer.TransformerEncoder(cfg)
  shapes = jax.eval_shape(enc.init, jax.random.key(0), x, pad)["params"]
  p = random_params(shapes, rng)
  q = f64(p)
  # Every layer skipped: output = the encoder's LN of the zero-padded input (post-LN: the LN before
  # the layers; pre-LN: the final LN), since dropout is 0 and there is no pos encoder.
  want = np_ln(np.where(pad[..., None], 0.0, x.astype(np.float64)),
               q["layer_norm"]["norm"]["scale"], q["layer_norm"]["norm"]["bias"])
  apply = jax.jit(enc.apply, static_argnums=3)
  for seed in range(3):
    got, _ = apply({"params": p}, x, pad, True, rngs={"dropout": jax.random.key(seed)})
    np.testing.assert_allclose(np.asarray(got), want, **TOL)
  # Eval mode: LayerDrop is off, both layers run (NumPy reference of the full 2-layer encoder).
  got_eval, lr_eval = apply({"params": p}, x, pad, False)
  h = np.where(pad[..., None], 0.0, x.astype(np.float64))
  ln = lambda y: np_ln(y, q["layer_norm"]["norm"]["scale"], q["layer_norm"]["norm"]["bias"])
  h = h if layer_norm_first else ln(h)
  for i in range(2):
    h, f = np_layer(h, pad, jax.tree.map(lambda a: a[i], q["layers"]), cfg.num_heads,
                    layer_norm_first)
    np.testing.assert_allclose(np.asarray(lr_eval[i]), f, **TOL)
  h = ln(h) if layer_norm_first else h
  np.testing.assert_allclose(np.asarray(got_eval), h, **TOL)
  assert np.abs(np.asarray(got_eval) - want).max() > 0.1


# ----------------------------------------------------------------------------- padding invariance


@pytest.mark.parametrize("pos_depth", [5, 1], ids=["pos_conv_stack_depth5", "pos_conv_depth1"])
def test_padding_invariance_through_encode(pos_depth):
  """User-needs B1: the valid frames of a padded row equal the unpadded row's outputs (fp32 1e-5).

  16000 valid samples padded to 24000: frame t covers samples [320 t, 320 t + 400), so the 49 valid
  frames never see padding samples in the CNN; everything after that must rely on the frame
  padding mask. depth 5 is the data2vec config (spec §1.3b); depth 1 isolates the attention path.
  """
  c = tiny_speech_config(pos_depth=pos_depth)
  obj = registry.get("objective", "data2vec")(c)
  rng = np.random.default_rng(8)
  audio_b = rng.standard_normal((2, 24000)).astype(np.float32)
  pad = np.zeros((2, 24000), bool)
  pad[0, 16000:] = True
  audio_b[0, 16000:] = rng.standard_normal(8000) * 5  # garbage in the padding
  batch = {"audio": audio_b, "padding_mask": pad}
  params = random_params(jax.eval_shape(obj.init, jax.random.key(0), batch), rng)
  encode = jax.jit(lambda p, b: obj.encode(p, b))
  x, lr, fpad = encode(params, batch)
  x1, lr1, fpad1 = encode(params, {"audio": audio_b[:1, :16000], "padding_mask": pad[:1, :16000]})
  n = audio.num_frames(16000)
  assert n == 49 and x1.shape[1] == n
  np.testing.assert_array_equal(np.asarray(fpad[0]), np.arange(x.shape[1]) >= n)
  assert not np.asarray(fpad1).any()
  np.testing.assert_allclose(np.asarray(x[0, :n]), np.asarray(x1[0]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(lr[:, 0, :n]), np.asarray(lr1[:, 0]), rtol=1e-5,
                             atol=1e-5)


# ----------------------------------------------------------------------------- feature_grad_mult


def test_feature_grad_mult_scales_cnn_gradient():
  rng = np.random.default_rng(9)
  wav = rng.standard_normal((2, 1400)).astype(np.float32)
  w = rng.standard_normal((2, audio.num_frames(1400), 8)).astype(np.float32)
  shapes = jax.eval_shape(audio.AudioFeatureEncoder(8, conv_channels=8).init, jax.random.key(0),
                          {"audio": wav})
  p = random_params(shapes, rng)

  def grads(g):
    m = audio.AudioFeatureEncoder(8, feature_grad_mult=g, conv_channels=8)
    return jax.grad(lambda p: jnp.sum(m.apply(p, {"audio": wav})["features"] * w))(p)["params"]

  g1, g01, g0 = jax.jit(lambda: (grads(1.0), grads(0.1), grads(0.0)))()
  assert min(np.abs(np.asarray(a)).max() for a in jax.tree.leaves(g1["cnn"])) > 1e-4
  # fp32: scaling before vs after the CNN backward rounds differently (observed ~2e-5 relative on
  # single small entries), so the tolerance is 1e-5 of each leaf's largest entry.
  for a, b in zip(jax.tree.leaves(g01["cnn"]), jax.tree.leaves(g1["cnn"])):
    b = 0.1 * np.asarray(b)
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
  for a in jax.tree.leaves(g0["cnn"]):
    np.testing.assert_array_equal(np.asarray(a), 0.0)
  # Parameters after the CNN are untouched by the multiplier.
  for g in (g01, g0):
    rest = {k: v for k, v in g.items() if k != "cnn"}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL),
                 rest, {k: v for k, v in g1.items() if k != "cnn"})
