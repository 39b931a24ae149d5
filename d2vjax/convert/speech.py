"""Speech families: wav2vec 2.0 and data2vec 1.0 audio, Hugging Face (``Wav2Vec2*``,
``Data2VecAudio*``) and fairseq (``Wav2Vec2Model``, ``Data2VecAudioModel``, CTC) layouts.

Key names: fairseq-spec §12.1; module semantics §1.2–§1.4. Both layouts hold the same modules
under different names, so one table builder serves both (``_NAMES``).
"""

from __future__ import annotations

import numpy as np

from d2vjax.convert import rules as R
from d2vjax.models import audio

L = R.LAYERS

# fairseq TransformerSentenceEncoderLayer / TransformerEncoderLayer module names (spec §12.1).
FAIRSEQ_LAYER = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                     o="self_attn.out_proj", ln1="self_attn_layer_norm", fc1="fc1", fc2="fc2",
                     ln2="final_layer_norm")

_NAMES = {
    "hf": dict(
        conv="feature_extractor.conv_layers.{i}.conv",
        gn="feature_extractor.conv_layers.0.layer_norm",
        ln="feature_extractor.conv_layers.{i}.layer_norm", feat_ln="feature_projection.layer_norm",
        proj="feature_projection.projection", mask="masked_spec_embed",
        pos="encoder.pos_conv_embed.conv", pos_stack="encoder.pos_conv_embed.layers.{j}.conv",
        enc_ln="encoder.layer_norm", layer="encoder.layers.{i}.",
        names=dict(q="attention.q_proj", k="attention.k_proj", v="attention.v_proj",
                   o="attention.out_proj", ln1="layer_norm", fc1="feed_forward.intermediate_dense",
                   fc2="feed_forward.output_dense", ln2="final_layer_norm"),
        final_proj="project_hid", project_q="project_q",
        q_vars="quantizer.codevectors", q_proj="quantizer.weight_proj", d2v_head=None),
    "fairseq": dict(
        conv="feature_extractor.conv_layers.{i}.0", gn="feature_extractor.conv_layers.0.2",
        ln="feature_extractor.conv_layers.{i}.2.1", feat_ln="layer_norm", proj="post_extract_proj",
        mask="mask_emb", pos="encoder.pos_conv.0", pos_stack="encoder.pos_conv.{j}.0",
        enc_ln="encoder.layer_norm", layer="encoder.layers.{i}.", names=FAIRSEQ_LAYER,
        final_proj="final_proj", project_q="project_q", q_vars="quantizer.vars",
        q_proj="quantizer.weight_proj", d2v_head="final_proj"),
}

# Weight-norm (g, v) names: torch.nn.utils.parametrizations (current HF) or the legacy hook.
_WN = (("parametrizations.weight.original0", "parametrizations.weight.original1"),
       ("weight_g", "weight_v"))

# HF prefixes of the base model inside task models (ForPreTraining, ForCTC, …).
_HF_PREFIXES = ("wav2vec2.", "data2vec_audio.")
_FAIRSEQ_CTC_PREFIX = "w2v_encoder.w2v_model."


def strip_prefix(state: dict, fmt: str) -> dict:
  """Keys of the base model without the task model's prefix."""
  prefixes = _HF_PREFIXES if fmt == "hf" else (_FAIRSEQ_CTC_PREFIX,)
  out = {}
  for k, v in state.items():
    for p in prefixes:
      if k.startswith(p):
        k = k[len(p):]
        break
    out[k] = v
  return out


def drops(fmt: str) -> list[tuple[str, str]]:
  """(regex, reason) of source keys that are deliberately not converted."""
  return [
      (r"lm_head\..*", "CTC output layer (d2vjax.finetune builds its own vocabulary head)"),
      (r"w2v_encoder\.proj\..*", "CTC output layer (d2vjax.finetune builds its own head)"),
      (r"_ema\..*|encoder\._ema\..*", "EMA teacher copy (training only; the student is converted)"),
      (r"(project_hid|final_proj|project_q|quantizer)\..*|(quantizer\.codevectors)",
       "pre-training head not present in the target config's objective"),
      (r"masked_spec_embed|mask_emb", "mask embedding not present in the target config"),
  ]


# Shortest input for initialising params the checkpoint lacks (10 frames; shapes do not depend
# on the length).
INIT_DATA = dict(buckets=[3200])

# (regex over d2vjax paths, reason) that may be absent from a checkpoint: freshly initialised.
FRESH = [
    (r"mask_emb", "the checkpoint has no mask embedding (HF models without masking)"),
    (r"head/.*", "regression head: not part of HF Data2VecAudio checkpoints"),
    (r"(quantizer|project_q|final_proj)/.*",
     "wav2vec 2.0 pre-training head: not part of this checkpoint (e.g. HF Wav2Vec2Model, CTC)"),
]


def layout(state: dict, fmt: str) -> dict:
  """Architecture facts read off the keys and shapes (they override any config)."""
  n = _NAMES[fmt]
  ids = R.layer_ids(state, "encoder.layers.")
  fc1 = state[n["layer"].format(i=0) + n["names"]["fc1"] + ".weight"]
  conv0 = state[n["conv"].format(i=0) + ".weight"]
  kernels = [state[n["conv"].format(i=i) + ".weight"].shape[-1]
             for i in range(len(audio.CONV_LAYERS))
             if n["conv"].format(i=i) + ".weight" in state]
  want = [k for _, k, _ in audio.CONV_LAYERS]
  if kernels != want or n["conv"].format(i=len(want)) + ".weight" in state:
    raise ValueError(f"CNN kernel sizes {kernels}: d2vjax implements {want} (spec §1.2)")
  lay = dict(num_layers=len(ids), dim=int(fc1.shape[1]), ffn_dim=int(fc1.shape[0]),
             conv_channels=int(conv0.shape[0]),
             conv_bias=n["conv"].format(i=0) + ".bias" in state)
  if n["ln"].format(i=1) + ".weight" in state:
    lay["extractor_mode"] = "layer_norm"
  elif n["gn"] + ".weight" in state:
    lay["extractor_mode"] = "default"
  else:
    raise ValueError(f"CNN has no norm ({n['gn']} or {n['ln'].format(i=1)}): unknown extractor")
  d = lay["dim"]
  for g, v in _WN:
    if f"{n['pos']}.{v}" in state:
      wv = state[f"{n['pos']}.{v}"]
      lay.update(pos_encoder="conv", pos_width=int(wv.shape[2]), pos_groups=d // int(wv.shape[1]),
                 pos_depth=1, wn=(g, v))
      break
  else:
    depth = 0
    while n["pos_stack"].format(j=depth) + ".weight" in state:
      depth += 1
    if not depth:
      raise ValueError(f"no positional conv ({n['pos']}.weight_v or {n['pos_stack']}) found")
    w = state[n["pos_stack"].format(j=0) + ".weight"]
    # d2vjax derives the kernel as max(3, width // depth): width = k · depth gives k back.
    lay.update(pos_encoder="conv_stack", pos_depth=depth, pos_width=int(w.shape[2]) * depth,
               pos_groups=d // int(w.shape[1]))
  lay["has_proj"] = n["proj"] + ".weight" in state
  return lay


def parse_conv_layers(spec: str) -> list[tuple]:
  """fairseq's ``conv_feature_layers`` string (e.g. ``"[(512, 10, 5)] + [(512, 3, 2)] * 4"``)
  evaluated without ``eval``: only int literals, tuples, lists, ``+`` and ``*``."""
  import ast  # pylint: disable=g-import-not-at-top

  def ev(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
      return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
      items = [ev(e) for e in node.elts]
      return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
      a, b = ev(node.left), ev(node.right)
      return a + b if isinstance(node.op, ast.Add) else a * b
    raise ValueError(f"conv_feature_layers {spec!r}: unsupported expression")

  return [tuple(t) for t in ev(ast.parse(spec, mode="eval").body)]


def derive(c, state: dict, ckcfg: dict | None, fmt: str, report) -> None:
  """Set the architecture fields of d2vjax config ``c`` from the checkpoint (in place)."""
  lay = layout(state, fmt)
  ck = dict(ckcfg or {})
  if fmt == "fairseq" and isinstance(ck.get("w2v_args"), dict):  # CTC: the pre-training config
    ck = ck["w2v_args"].get("model", ck)
  if fmt == "hf":
    heads, ln_first = ck.get("num_attention_heads"), ck.get("do_stable_layer_norm")
    if ln_first is None and ck.get("model_type") == "data2vec-audio":
      ln_first = False  # HF Data2VecAudio has only the post-LN encoder
    eps = ck.get("layer_norm_eps")
    for key in ("hidden_act", "feat_extract_activation"):
      if ck.get(key, "gelu") != "gelu":
        raise ValueError(f"config.json {key}={ck[key]!r}: d2vjax uses exact GELU")
    if ck.get("conv_stride") and list(ck["conv_stride"]) != [s for *_, s in audio.CONV_LAYERS]:
      raise ValueError(f"config.json conv_stride {ck['conv_stride']}: d2vjax implements "
                       f"{[s for *_, s in audio.CONV_LAYERS]}")
    if eps is not None and float(eps) != 1e-5:
      raise ValueError(f"config.json layer_norm_eps={eps}: d2vjax's CNN and feature LayerNorms "
                       "use 1e-5 (fairseq)")
    groups = ck.get("num_codevector_groups")
  else:
    heads, ln_first, eps = ck.get("encoder_attention_heads"), ck.get("layer_norm_first"), None
    groups = ck.get("latent_groups")
    if ck.get("conv_feature_layers"):
      got = [(k, s) for _, k, s in parse_conv_layers(str(ck["conv_feature_layers"]))]
      if got != [(k, s) for _, k, s in audio.CONV_LAYERS]:
        raise ValueError(f"cfg conv_feature_layers {ck['conv_feature_layers']!r}: d2vjax "
                         f"implements {audio.CONV_LAYERS} (spec §1.2)")
  e = c.model.encoder
  for k in ("num_layers", "dim", "ffn_dim", "pos_encoder", "pos_width", "pos_groups",
            "pos_depth"):
    e[k] = lay[k]
  if heads is None:
    heads = e.num_heads if e.num_heads and lay["dim"] == e.dim else lay["dim"] // 64
    report.notes.append(f"attention heads not recorded in the checkpoint: using {heads}")
  e.num_heads = int(heads)
  if ln_first is None:
    report.notes.append(f"layer_norm_first not recorded in the checkpoint: taken from the "
                        f"d2vjax config ({e.layer_norm_first})")
  else:
    e.layer_norm_first = bool(ln_first)
  if eps is not None:
    e.norm_eps = float(eps)
  c.model.extractor_mode = lay["extractor_mode"]
  c.model.conv_bias = lay["conv_bias"]
  c.model.conv_channels = lay["conv_channels"]
  n = _NAMES[fmt]
  if "final_dim" in c.model and n["project_q"] + ".weight" in state:
    pq = state[n["project_q"] + ".weight"]
    if pq.shape[0] != pq.shape[1]:
      raise ValueError(f"{n['project_q']}.weight {pq.shape}: d2vjax's quantizer width equals "
                       "final_dim (latent_dim 0 / codevector_dim = proj_codevector_dim)")
    c.model.final_dim = int(pq.shape[0])
    gv = int(state[n["q_vars"]].shape[1])
    g = int(groups or c.model.latent_groups)
    c.model.latent_groups, c.model.latent_vars = g, gv // g


def rules(state: dict, fmt: str, shapes: dict) -> list[R.Rule]:
  """The key table for this checkpoint's layout and the target model's params."""
  n = _NAMES[fmt]
  lay = layout(state, fmt)
  out: list[R.Rule] = []
  for i in range(len(audio.CONV_LAYERS)):
    conv = n["conv"].format(i=i)
    out.append(R.Rule(conv + ".weight", f"frontend/cnn/conv_{i}/kernel", "conv"))
    if lay["conv_bias"]:
      out.append(R.Rule(conv + ".bias", f"frontend/cnn/conv_{i}/bias"))
    if lay["extractor_mode"] == "layer_norm":
      out += R.norm(n["ln"].format(i=i), f"frontend/cnn/norm_{i}/norm")
  if lay["extractor_mode"] == "default":
    out += R.norm(n["gn"], "frontend/cnn/norm_0")
  out += R.norm(n["feat_ln"], "frontend/feature_norm/norm")
  if lay["has_proj"]:
    out += R.linear(n["proj"], "frontend/projection")
  if "mask_emb" in shapes and n["mask"] in state:
    out.append(R.Rule(n["mask"], "mask_emb"))
  if lay["pos_encoder"] == "conv":
    g, v = lay["wn"]
    out += [R.Rule(f"{n['pos']}.{g}", "encoder/pos_conv/weight_g", "id", n=2),
            R.Rule(f"{n['pos']}.{v}", "encoder/pos_conv/weight_v", "conv"),
            R.Rule(f"{n['pos']}.bias", "encoder/pos_conv/bias")]
  else:
    for j in range(lay["pos_depth"]):
      src = n["pos_stack"].format(j=j)
      out += [R.Rule(f"{src}.weight", f"encoder/pos_conv/conv_{j}_kernel", "conv"),
              R.Rule(f"{src}.bias", f"encoder/pos_conv/conv_{j}_bias")]
  out += R.norm(n["enc_ln"], "encoder/layer_norm/norm")
  for i in range(lay["num_layers"]):
    out += R.encoder_layer(n["layer"].format(i=i), n["names"], i)
  if "final_proj/kernel" in shapes and n["final_proj"] + ".weight" in state:
    out += R.linear(n["final_proj"], "final_proj") + R.linear(n["project_q"], "project_q")
    out += [R.Rule(n["q_vars"], "quantizer/vars", "id", n=1)]
    out += R.linear(n["q_proj"], "quantizer/weight_proj")
  elif "head/proj/kernel" in shapes and n["d2v_head"] and n["d2v_head"] + ".weight" in state:
    out += R.linear(n["d2v_head"], "head/proj")
  return out


def identity_fill(path: str, shape: tuple):
  """Value for params a checkpoint legitimately lacks because the module is absent: without
  ``post_extract_proj`` (CNN width = model width) fairseq feeds the features unprojected."""
  if path == "frontend/projection/kernel" and shape[0] == shape[1]:
    return np.eye(shape[0], dtype=np.float32), "identity: no post_extract_proj in the checkpoint"
  if path == "frontend/projection/bias":
    return np.zeros(shape, np.float32), "zero: no post_extract_proj in the checkpoint"
  return None


def parity_batch(config, rng: np.random.Generator) -> tuple[dict, list]:
  """Random batch for ``parity.compare``: 2 rows of 1 s of 16 kHz audio, the second padded from
  sample 10000 (0.625 s).

  Returns:
    (d2vjax inputs ``audio`` [2, 16000] float32 + ``padding_mask`` [2, 16000] bool, HF calls
    ``[(rows, kwargs)]``). With the padding-invariant conv stack (data2vec audio) HF runs each
    row alone, unpadded: HF zeroes padding once before its stack, so padded frames leak into the
    last valid ones there and not in d2vjax (docs/interop.md); otherwise HF runs the padded batch
    with its ``attention_mask``.
  """
  wav = rng.standard_normal((2, 16000)).astype(np.float32)
  pad = np.zeros(wav.shape, bool)
  pad[1, 10000:] = True
  wav[pad] = 0
  inputs = {"audio": wav, "padding_mask": pad}
  if config.model.encoder.pos_encoder == "conv_stack":  # not conv_stack_fairseq
    return inputs, [([row], {"input_values": wav[row:row + 1, :n]})
                    for row, n in enumerate((16000, 10000))]
  return inputs, [([0, 1], {"input_values": wav, "attention_mask": (~pad).astype(np.int64)})]


def hf_config(c, model_type: str) -> dict:
  """config.json for HF ``Wav2Vec2Model`` / ``Data2VecAudioModel`` equal to d2vjax config ``c``."""
  e, m = c.model.encoder, c.model
  cfg = dict(
      model_type=model_type, hidden_size=e.dim, num_hidden_layers=e.num_layers,
      num_attention_heads=e.num_heads, intermediate_size=e.ffn_dim, hidden_act="gelu",
      layer_norm_eps=e.norm_eps, conv_dim=[m.conv_channels] * len(audio.CONV_LAYERS),
      conv_kernel=[k for _, k, _ in audio.CONV_LAYERS],
      conv_stride=[s for *_, s in audio.CONV_LAYERS], conv_bias=bool(m.conv_bias),
      num_conv_pos_embedding_groups=e.pos_groups, feat_extract_activation="gelu",
      hidden_dropout=e.dropout, attention_dropout=e.attention_dropout,
      activation_dropout=e.activation_dropout, layerdrop=e.layerdrop)
  if model_type == "wav2vec2":
    if e.pos_encoder != "conv":
      raise ValueError("HF Wav2Vec2 needs the single weight-normed positional conv")
    cfg.update(architectures=["Wav2Vec2Model"], num_conv_pos_embeddings=e.pos_width,
               feat_extract_norm="group" if m.extractor_mode == "default" else "layer",
               do_stable_layer_norm=bool(e.layer_norm_first))
    if "final_dim" in m:
      cfg.update(architectures=["Wav2Vec2ForPreTraining"], proj_codevector_dim=m.final_dim,
                 codevector_dim=m.final_dim, num_codevector_groups=m.latent_groups,
                 num_codevectors_per_group=m.latent_vars)
  else:
    if not e.pos_encoder.startswith("conv_stack") or m.extractor_mode != "layer_norm" or \
        e.layer_norm_first:
      raise ValueError("HF Data2VecAudio needs the conv-stack positional encoder, the layer-norm "
                       "CNN and post-LN layers")
    cfg.update(architectures=["Data2VecAudioModel"], num_conv_pos_embeddings=e.pos_depth,
               conv_pos_kernel_size=max(3, e.pos_width // e.pos_depth))
  return cfg
