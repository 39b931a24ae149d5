"""fairseq data2vec 2.0 (``Data2VecMultiModel``) checkpoints: complete key accounting against
fairseq-spec §12.1 and the architecture they describe (audio, image, text).

Every key is assigned to one component of the model (trunk blocks, the modality's local
encoder, relative/fixed positions, ALiBi scale, extra tokens, context encoder, decoder) with its
shape checked against the others, or dropped with a reason (EMA teacher). ``convert`` then maps
the keys onto the d2vjax data2vec 2.0 objective (``objectives/data2vec2.py``): the trunk's fused
``qkv`` is split into the shared Transformer's q/k/v, the modality's local encoder goes to
``frontend``, positions / ALiBi scale / extra tokens / LayerNorm / prenet to ``context``, the
convolutional decoder to ``decoder``.
"""

from __future__ import annotations

import re

import numpy as np

from d2vjax.convert import rules as R

_BLOCK = {"norm1.weight": ("D",), "norm1.bias": ("D",), "attn.qkv.weight": ("3D", "D"),
          "attn.qkv.bias": ("3D",), "attn.proj.weight": ("D", "D"), "attn.proj.bias": ("D",),
          "norm2.weight": ("D",), "norm2.bias": ("D",), "mlp.fc1.weight": ("F", "D"),
          "mlp.fc1.bias": ("F",), "mlp.fc2.weight": ("D", "F"), "mlp.fc2.bias": ("D",)}
MODALITIES = ("AUDIO", "IMAGE", "TEXT")

# Per modality: (regex relative to modality_encoders.{M}., component).
_LOCAL = {
    "AUDIO": [(r"local_encoder\.conv_layers\.(\d+)\.0\.weight", "cnn conv"),
              (r"local_encoder\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", "cnn layer norm"),
              (r"project_features\.1\.(weight|bias)", "feature layer norm"),
              (r"project_features\.2\.(weight|bias)", "feature projection"),
              (r"relative_positional_encoder\.(\d+)\.0\.(weight|bias)", "conv positions"),
              (r"alibi_scale", "ALiBi scale")],
    "IMAGE": [(r"local_encoder\.proj\.(weight|bias)", "patch embedding"),
              (r"fixed_positional_encoder\.positions", "fixed sin-cos positions"),
              (r"extra_tokens", "extra (CLS) tokens")],
    "TEXT": [(r"local_encoder\.embed_tokens\.weight", "token embedding"),
             (r"local_encoder\.embed_positions\.weight", "learned positions"),
             (r"local_encoder\.layernorm_embedding\.(weight|bias)", "embedding layer norm"),
             (r"alibi_scale", "ALiBi scale")],
}
_COMMON = [(r"context_encoder\.norm\.(weight|bias)", "context encoder norm"),
           (r"context_encoder\.blocks\.(\d+)\.(.+)", "prenet block"),
           (r"decoder\.blocks\.(\d+)\.0\.(weight|bias)", "decoder conv"),
           (r"decoder\.proj(\.\d+)?\.(weight|bias)", "decoder projection"),
           (r"extra_tokens", "extra (CLS) tokens")]
DROPS = [(r"_ema\..*", "EMA teacher (training only; the student is converted)"),
         (r"recon_proj\..*", "pixel-reconstruction head (training only)"),
         (r"modality_encoders\.\w+\.(local_encoder\.)?embed_positions\._float_tensor",
          "buffer")]


def _check(key: str, got: tuple, want: tuple, sizes: dict) -> None:
  """Shape check with symbolic dims: 'D' (width), 'F' (FFN), '3D'; binds them on first use."""
  if len(got) != len(want):
    raise ValueError(f"{key}: shape {got}, expected {len(want)} dims {want}")
  for g, w in zip(got, want):
    name, mult = (w[1:], 3) if w.startswith("3") else (w, 1)
    if g % mult:
      raise ValueError(f"{key}: shape {got} does not fit {want}")
    bound = sizes.setdefault(name, g // mult)
    if bound * mult != g:
      raise ValueError(f"{key}: shape {got}; {name} = {bound} elsewhere in the checkpoint")


def _blocks(state: dict, prefix: str, sizes: dict, consumed: list) -> int:
  """Account ``prefix{i}.*`` AltBlocks; returns the depth (blocks numbered 0..n-1)."""
  ids = sorted({int(m.group(1)) for k in state
                for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m})
  if ids != list(range(len(ids))):
    raise ValueError(f"{prefix}*: blocks {ids} are not numbered 0..{len(ids) - 1}")
  for i in ids:
    for name, want in _BLOCK.items():
      key = f"{prefix}{i}.{name}"
      if key not in state:
        raise KeyError(f"missing checkpoint key {key!r} (data2vec 2.0 AltBlock, spec §1.6)")
      _check(key, tuple(state[key].shape), want, sizes)
      consumed.append(key)
  return len(ids)


def inventory(state: dict, ckcfg: dict | None = None) -> dict:
  """The architecture a data2vec 2.0 state dict describes, with every key accounted for.

  Returns a dict: ``modality``, ``depth``, ``dim``, ``ffn_dim``, ``heads`` (from the ALiBi scale
  or the config), ``prenet_depth``, ``decoder_layers``, ``decoder_dim``, ``decoder_kernel``,
  ``decoder_groups``, ``projection_layers``, ``extra_tokens``, ``components`` (component →
  number of keys), ``dropped`` (key → reason), ``consumed`` (keys). Raises naming a key that is
  missing, mis-shaped, or unknown.
  """
  mods = {m.group(1) for k in state for m in [re.match(r"modality_encoders\.(\w+)\.", k)] if m}
  if len(mods) != 1 or not mods <= set(MODALITIES):
    raise ValueError(f"data2vec 2.0 checkpoint with modality encoders {sorted(mods)}: expected "
                     f"exactly one of {MODALITIES}")
  mod = mods.pop()
  prefix = f"modality_encoders.{mod}."
  sizes: dict = {}
  consumed: list = []
  depth = _blocks(state, "blocks.", sizes, consumed)
  prenet = _blocks(state, prefix + "context_encoder.blocks.", sizes, consumed)
  components: dict = {"trunk block": len(consumed)}
  dropped = {}
  for key in state:
    if key in consumed:
      continue
    if not key.startswith(prefix):
      reason = next((r for p, r in DROPS if re.fullmatch(p, key)), None)
      if reason is None:
        raise ValueError(f"unrecognised data2vec 2.0 checkpoint key {key!r}")
      dropped[key] = reason
      continue
    rel = key[len(prefix):]
    comp = next((c for p, c in _LOCAL[mod] + _COMMON if re.fullmatch(p, rel)), None)
    if comp is None:
      reason = next((r for p, r in DROPS if re.fullmatch(p, key)), None)
      if reason is None:
        raise ValueError(f"unrecognised data2vec 2.0 {mod} key {key!r}")
      dropped[key] = reason
      continue
    components[comp] = components.get(comp, 0) + 1
    consumed.append(key)
  d = sizes["D"]
  inv = dict(modality=mod, depth=depth, dim=d, ffn_dim=sizes["F"], prenet_depth=prenet,
             components=components, dropped=dropped, consumed=consumed)
  inv.update(_modality_facts(state, prefix, mod, d, ckcfg))
  inv.update(_decoder_facts(state, prefix, mod, d))
  return inv


def _need(state: dict, key: str, shape: tuple | None = None):
  if key not in state:
    raise KeyError(f"missing checkpoint key {key!r} (spec §12.1)")
  if shape is not None and tuple(state[key].shape) != tuple(shape):
    raise ValueError(f"{key}: shape {tuple(state[key].shape)}, expected {tuple(shape)}")
  return state[key]


def _modality_facts(state, prefix, mod, d, ckcfg) -> dict:
  ck = dict(ckcfg or {})
  heads = ck.get("num_heads")
  facts: dict = {}
  if f"{prefix}alibi_scale" in state:
    a = state[f"{prefix}alibi_scale"]
    if a.ndim != 5 or a.shape[2] < 1:
      raise ValueError(f"{prefix}alibi_scale: shape {a.shape}, expected (1|L, 1, H, 1, 1)")
    heads = heads or int(a.shape[2])
    facts["alibi_scale_shape"] = tuple(int(s) for s in a.shape)
  if f"{prefix}extra_tokens" in state:
    _need(state, f"{prefix}extra_tokens")
    facts["extra_tokens"] = int(state[f"{prefix}extra_tokens"].shape[1])
  if mod == "AUDIO":
    n = 0
    while f"{prefix}local_encoder.conv_layers.{n}.0.weight" in state:
      _need(state, f"{prefix}local_encoder.conv_layers.{n}.2.1.weight")
      _need(state, f"{prefix}local_encoder.conv_layers.{n}.2.1.bias")
      n += 1
    c = int(state[f"{prefix}local_encoder.conv_layers.0.0.weight"].shape[0])
    _need(state, f"{prefix}project_features.1.weight", (c,))
    _need(state, f"{prefix}project_features.2.weight", (d, c))
    pos = sorted(int(m.group(1)) for k in state for m in
                 [re.fullmatch(re.escape(prefix) + r"relative_positional_encoder\.(\d+)\.0\.weight",
                               k)] if m)
    if pos != list(range(1, len(pos) + 1)):
      raise ValueError(f"{prefix}relative_positional_encoder: blocks {pos}, expected 1..n")
    k = int(state[f"{prefix}relative_positional_encoder.1.0.weight"].shape[2])
    facts.update(conv_layers=n, conv_channels=c, pos_depth=len(pos), pos_kernel=k)
  elif mod == "IMAGE":
    w = _need(state, f"{prefix}local_encoder.proj.weight")
    pos = _need(state, f"{prefix}fixed_positional_encoder.positions")
    if pos.shape[-1] != d or w.shape[0] != d:
      raise ValueError(f"{prefix}: patch embedding {w.shape} / positions {pos.shape} vs width {d}")
    facts.update(patch_size=int(w.shape[-1]), num_patches=int(pos.shape[1]))
  else:
    tok = _need(state, f"{prefix}local_encoder.embed_tokens.weight")
    pos = _need(state, f"{prefix}local_encoder.embed_positions.weight")
    _need(state, f"{prefix}local_encoder.layernorm_embedding.weight", (d,))
    facts.update(vocab_size=int(tok.shape[0]), position_rows=int(pos.shape[0]))
  if heads is None:
    heads = max(1, d // 64)
    facts["heads_note"] = f"heads not recorded (no ALiBi scale, no config): {heads} (width / 64)"
  facts["heads"] = int(heads)
  return facts


def _decoder_facts(state, prefix, mod, d) -> dict:
  ids = sorted({int(m.group(1)) for k in state for m in
                [re.match(re.escape(prefix) + r"decoder\.blocks\.(\d+)\.0\.weight", k)] if m})
  if not ids:
    return {"decoder_layers": 0}
  if ids != list(range(len(ids))):
    raise ValueError(f"{prefix}decoder.blocks: {ids} are not numbered 0..{len(ids) - 1}")
  w0 = state[f"{prefix}decoder.blocks.0.0.weight"]
  dec_dim, k = int(w0.shape[0]), int(w0.shape[-1])
  groups = d // int(w0.shape[1])
  for j in ids:
    _need(state, f"{prefix}decoder.blocks.{j}.0.bias", (dec_dim,))
  projs = sorted({m.group(1) or "" for k2 in state for m in
                  [re.fullmatch(re.escape(prefix) + r"decoder\.proj(\.\d+)?\.weight", k2)] if m})
  if not projs:
    raise KeyError(f"missing checkpoint key {prefix + 'decoder.proj.weight'!r}")
  last = state[f"{prefix}decoder.proj{projs[-1]}.weight"]
  if last.shape[0] != d:
    raise ValueError(f"{prefix}decoder.proj{projs[-1]}.weight: shape {last.shape}, must end at "
                     f"width {d}")
  spatial = w0.ndim - 2
  if (mod == "IMAGE") != (spatial == 2):
    raise ValueError(f"{prefix}decoder.blocks.0.0.weight: {spatial}-D conv for {mod}")
  return dict(decoder_layers=len(ids), decoder_dim=dec_dim, decoder_kernel=k,
              decoder_groups=groups, projection_layers=len(projs))


# Default d2vjax config per modality and width.
CONFIGS = {"AUDIO": ("speech_d2v2_base.py", "speech_d2v2_large.py"),
           "IMAGE": ("vision_d2v2_base.py", "vision_d2v2_large.py"),
           "TEXT": ("text_d2v2_base.py", "text_d2v2_large.py")}
FRESH: list = []  # a data2vec 2.0 checkpoint holds every parameter of the model


def _block_rules(prefix: str, dst: str, i: int) -> list[R.Rule]:
  """AltBlock ``prefix`` (post-LN) → shared Transformer layer ``i`` under ``dst`` (…/layers)."""
  out = []
  for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
    out += [R.Rule(f"{prefix}attn.qkv.weight", f"{dst}/self_attn/{proj}/kernel", "linear", i, 1,
                   part=(j, 3)),
            R.Rule(f"{prefix}attn.qkv.bias", f"{dst}/self_attn/{proj}/bias", "id", i,
                   part=(j, 3))]
  out += R.linear(f"{prefix}attn.proj", f"{dst}/self_attn/out_proj", i, n_in=2)
  out += R.norm(f"{prefix}norm1", f"{dst}/self_attn_layer_norm/norm", i)
  out += R.linear(f"{prefix}mlp.fc1", f"{dst}/fc1", i)
  out += R.linear(f"{prefix}mlp.fc2", f"{dst}/fc2", i)
  out += R.norm(f"{prefix}norm2", f"{dst}/final_layer_norm/norm", i)
  return out


def derive(c, inv: dict, state: dict, ckcfg: dict | None, report) -> None:
  """Architecture fields of the d2vjax data2vec 2.0 config ``c`` from the inventory (in place)."""
  mod, p = inv["modality"], f"modality_encoders.{inv['modality']}."
  e, ctx, dec = c.model.encoder, c.model.context, c.model.decoder
  e.num_layers, e.dim, e.ffn_dim = inv["depth"], inv["dim"], inv["ffn_dim"]
  e.num_heads = inv["heads"]
  if "heads_note" in inv:
    report.notes.append(inv["heads_note"])
  ctx.prenet_depth = inv["prenet_depth"]
  ctx.extra_tokens = inv.get("extra_tokens", 0)
  ctx.norm = f"{p}context_encoder.norm.weight" in state
  ctx.alibi = "alibi_scale_shape" in inv
  if ctx.alibi and inv["alibi_scale_shape"][0] != 1:
    raise ValueError(f"{p}alibi_scale {inv['alibi_scale_shape']}: per-layer ALiBi scales are not "
                     "implemented (learned_alibi_scale_per_layer=false in every config)")
  if mod == "AUDIO":
    w = state[f"{p}relative_positional_encoder.1.0.weight"]
    ctx.rel_pos, ctx.pos_depth = "conv_stack", inv["pos_depth"]
    ctx.pos_width, ctx.pos_groups = inv["pos_kernel"] * inv["pos_depth"], inv["dim"] // w.shape[1]
    c.model.conv_channels = inv["conv_channels"]
    c.model.extractor_mode, c.model.conv_bias = "layer_norm", False
  else:
    ctx.rel_pos = "none"
  if mod == "IMAGE":
    side = int(round(inv["num_patches"] ** 0.5))
    if side * side != inv["num_patches"]:
      raise ValueError(f"{p}fixed_positional_encoder.positions: {inv['num_patches']} patches "
                       "is not a square grid")
    c.model.patch_size = inv["patch_size"]
    c.data.image_size = side * inv["patch_size"]
  if mod == "TEXT":
    c.model.vocab_size = inv["vocab_size"]
    c.model.max_positions = inv["position_rows"] - int(c.model.padding_idx) - 1
    if max(c.data.buckets) > c.model.max_positions:
      c.data.buckets = sorted({min(int(b), c.model.max_positions) for b in c.data.buckets})
  mcfg = modality_config(ckcfg, mod)
  if mcfg.get("use_alibi_encoder") is False and ctx.alibi:
    raise ValueError(f"{p}alibi_scale present but the checkpoint's config has "
                     "use_alibi_encoder=false: d2vjax applies ALiBi whenever the scale exists")
  if (ckcfg or {}).get("layer_norm_first"):
    raise ValueError("cfg layer_norm_first=true: data2vec 2.0's pre-LN AltBlock is not ported "
                     "(spec §1.6: it drops the pre-MLP residual; no config uses it)")
  if inv["decoder_layers"]:
    dec.layers, dec.dim = inv["decoder_layers"], inv["decoder_dim"]
    dec.kernel = inv["decoder_kernel"]
    dec.groups, dec.projection_layers = inv["decoder_groups"], inv["projection_layers"]
    residual = (mcfg.get("decoder") or {}).get("decoder_residual")
    if residual is None:
      report.notes.append(f"decoder_residual not recorded: {dec.residual} from the d2vjax config")
    else:
      dec.residual = bool(residual)


def modality_config(ckcfg: dict | None, mod: str) -> dict:
  """The checkpoint's ``cfg.model.modalities.{audio|image|text}`` section, or {}."""
  mods = (ckcfg or {}).get("modalities") or {}
  section = mods.get(mod.lower()) if isinstance(mods, dict) else None
  return section if isinstance(section, dict) else {}


def rules(state: dict, inv: dict) -> list[R.Rule]:
  """The key table of a data2vec 2.0 checkpoint."""
  mod, p = inv["modality"], f"modality_encoders.{inv['modality']}."
  out = []
  for i in range(inv["depth"]):
    out += _block_rules(f"blocks.{i}.", "encoder/layers", i)
  for j in range(inv["prenet_depth"]):
    out += _block_rules(f"{p}context_encoder.blocks.{j}.", "context/prenet/layers", j)
  if f"{p}context_encoder.norm.weight" in state:
    out += R.norm(f"{p}context_encoder.norm", "context/norm/norm")
  if f"{p}alibi_scale" in state:
    out.append(R.Rule(f"{p}alibi_scale", "context/alibi_scale"))
  if f"{p}extra_tokens" in state:
    out.append(R.Rule(f"{p}extra_tokens", "context/extra_tokens", n=1))
  if mod == "AUDIO":
    for i in range(inv["conv_layers"]):
      out.append(R.Rule(f"{p}local_encoder.conv_layers.{i}.0.weight",
                        f"frontend/cnn/conv_{i}/kernel", "conv"))
      out += R.norm(f"{p}local_encoder.conv_layers.{i}.2.1", f"frontend/cnn/norm_{i}/norm")
    out += R.norm(f"{p}project_features.1", "frontend/feature_norm/norm")
    out += R.linear(f"{p}project_features.2", "frontend/projection")
    for j in range(inv["pos_depth"]):
      src = f"{p}relative_positional_encoder.{j + 1}.0"
      out += [R.Rule(f"{src}.weight", f"context/rel_pos/conv_{j}_kernel", "conv"),
              R.Rule(f"{src}.bias", f"context/rel_pos/conv_{j}_bias")]
  elif mod == "IMAGE":
    out += [R.Rule(f"{p}local_encoder.proj.weight", "frontend/patch_embed/proj/kernel", "conv"),
            R.Rule(f"{p}local_encoder.proj.bias", "frontend/patch_embed/proj/bias")]
  else:
    out += [R.Rule(f"{p}local_encoder.embed_tokens.weight", "frontend/embed_tokens/embedding"),
            R.Rule(f"{p}local_encoder.embed_positions.weight",
                   "frontend/embed_positions/embedding")]
    out += R.norm(f"{p}local_encoder.layernorm_embedding", "frontend/layernorm_embedding/norm")
  for j in range(inv["decoder_layers"]):
    out.append(R.Rule(f"{p}decoder.blocks.{j}.0.weight", f"decoder/body/conv_{j}/kernel", "conv"))
    out.append(R.Rule(f"{p}decoder.blocks.{j}.0.bias", f"decoder/body/conv_{j}/bias"))
  if inv["decoder_layers"]:
    if inv["projection_layers"] == 1:
      out += R.linear(f"{p}decoder.proj", "decoder/body/proj")
    else:
      idx = sorted({int(m.group(1)) for k in state for m in
                    [re.fullmatch(re.escape(p) + r"decoder\.proj\.(\d+)\.weight", k)] if m})
      for n, i in enumerate(idx):
        out += R.linear(f"{p}decoder.proj.{i}", f"decoder/body/proj_{n}")
  return out


def check_fixed_positions(state: dict, inv: dict, report) -> None:
  """Images: the checkpoint's frozen sin-cos table must equal the one d2vjax computes."""
  key = f"modality_encoders.{inv['modality']}.fixed_positional_encoder.positions"
  if key not in state:
    return
  from d2vjax.models import d2v2 as d2v2_model  # pylint: disable=g-import-not-at-top
  side = int(round(inv["num_patches"] ** 0.5))
  want = d2v2_model.sincos_2d(side, inv["dim"])
  err = float(np.max(np.abs(np.asarray(state[key])[0] - want)))
  if err > 1e-4:
    raise ValueError(f"{key}: differs from d2vjax's fixed 2-D sin-cos positions by {err:.3g}")
  report.dropped[key] = f"fixed sin-cos positions, recomputed by d2vjax (max difference {err:.1e})"
  report.consumed.remove(key)


def convert(state, ckcfg, config, report, load_config, shapes_fn):
  """Convert a data2vec 2.0 state dict: ``(flat params, config, objective, shapes)``; the caller
  fills nothing (every parameter comes from the checkpoint)."""
  from d2vjax import registry  # pylint: disable=g-import-not-at-top
  inv = inventory(state, ckcfg)
  base, large = CONFIGS[inv["modality"]]
  c = load_config(config if config is not None else (large if inv["dim"] >= 1024 else base))
  if c.objective != "data2vec2":
    raise ValueError(f"--config objective is {c.objective!r}: data2vec 2.0 checkpoints need a "
                     "data2vec2 config (configs/*_d2v2_*.py)")
  derive(c, inv, state, ckcfg, report)
  objective = registry.get("objective", c.objective)(c)
  shapes = shapes_fn(objective, c)
  flat = R.to_params(state, rules(state, inv), shapes, report)
  done = set(report.consumed)
  report.consumed.extend(k for k in inv["consumed"] if k not in done)
  check_fixed_positions(state, inv, report)
  report.dropped.update(inv["dropped"])
  report.check_complete(state)
  return flat, c, objective, shapes
