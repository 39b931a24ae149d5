"""data2vec 1.0 text (RoBERTa layout): Hugging Face ``Data2VecText*`` and fairseq
``Data2VecTextModel`` ↔ d2vjax ``models.text.TextEmbedding`` + the shared post-LN Transformer."""

from __future__ import annotations

import numpy as np

from d2vjax.convert import rules as R
from d2vjax.convert.speech import FAIRSEQ_LAYER

_HF_PREFIX = "data2vec_text."
_FS = "encoder.sentence_encoder."
_HF_LAYER = dict(q="attention.self.query", k="attention.self.key", v="attention.self.value",
                 o="attention.output.dense", ln1="attention.output.LayerNorm",
                 fc1="intermediate.dense", fc2="output.dense", ln2="output.LayerNorm")
_NAMES = {
    "hf": dict(tok="embeddings.word_embeddings.weight", pos="embeddings.position_embeddings.weight",
               ln="embeddings.LayerNorm", layer="encoder.layer.", names=_HF_LAYER),
    "fairseq": dict(tok=_FS + "embed_tokens.weight", pos=_FS + "embed_positions.weight",
                    ln=_FS + "layernorm_embedding", layer=_FS + "layers.", names=FAIRSEQ_LAYER),
}
TOKEN_TYPE = "embeddings.token_type_embeddings.weight"
# Exports hold the encoder only: load them with Data2VecTextModel(..., add_pooling_layer=False)
# (the BERT pooler is a fine-tuning head d2vjax does not have).
HF_MODEL_KWARGS = {"add_pooling_layer": False}


def strip_prefix(state: dict, fmt: str) -> dict:
  """Keys of ``Data2VecTextModel`` (HF task models prefix them with ``data2vec_text.``)."""
  if fmt != "hf":
    return dict(state)
  return {k[len(_HF_PREFIX):] if k.startswith(_HF_PREFIX) else k: v for k, v in state.items()}


def drops(fmt: str) -> list[tuple[str, str]]:
  """(regex, reason) of keys deliberately not converted."""
  del fmt
  return [(r"pooler\..*", "BERT pooler (sentence classification only)"),
          (r"(encoder\.)?lm_head\..*|classifier\..*",
           "masked-LM / classification head (task models)"),
          (r"embeddings\.position_ids|embeddings\.token_type_ids", "buffer"),
          (r"encoder\._ema\..*|_ema\..*", "EMA teacher copy (training only)"),
          (r"encoder\.sentence_encoder\.version|.*\.version", "fairseq version buffer"),
          (r"encoder\.regression_head\..*", "regression head not in the target config")]


# Shortest input for initialising params the checkpoint lacks (shapes do not depend on it).
INIT_DATA = dict(buckets=[8])

FRESH = [(r"head/.*", "regression head: not part of HF Data2VecText checkpoints")]


def derive(c, state: dict, ckcfg: dict | None, fmt: str, report) -> None:
  """Architecture fields of d2vjax config ``c`` from the checkpoint (in place)."""
  n = _NAMES[fmt]
  ck = dict(ckcfg or {})
  ids = R.layer_ids(state, n["layer"])
  fc1 = state[f"{n['layer']}0.{n['names']['fc1']}.weight"]
  e = c.model.encoder
  e.num_layers, e.dim, e.ffn_dim = len(ids), int(fc1.shape[1]), int(fc1.shape[0])
  heads = ck.get("num_attention_heads" if fmt == "hf" else "encoder_attention_heads")
  if heads is None:
    heads = e.num_heads if e.num_heads and e.dim == int(fc1.shape[1]) else e.dim // 64
    report.notes.append(f"attention heads not recorded: using {heads}")
  e.num_heads = int(heads)
  pad = int(ck.get("pad_token_id", c.model.padding_idx))
  c.model.padding_idx = pad
  c.model.vocab_size = int(state[n["tok"]].shape[0])
  c.model.max_positions = int(state[n["pos"]].shape[0]) - pad - 1
  if max(c.data.buckets) > c.model.max_positions:
    c.data.buckets = sorted({min(int(b), c.model.max_positions) for b in c.data.buckets})
    report.notes.append(f"data.buckets capped at the checkpoint's {c.model.max_positions} "
                        "positions")
  if fmt == "hf":
    if ck.get("layer_norm_eps") is not None:
      e.norm_eps = float(ck["layer_norm_eps"])
    if ck.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"config.json hidden_act={ck['hidden_act']!r}: d2vjax uses exact GELU")


def rules(state: dict, fmt: str, shapes: dict) -> list[R.Rule]:
  """The key table for this checkpoint."""
  n = _NAMES[fmt]
  out = [R.Rule(n["tok"], "frontend/embed_tokens/embedding"),
         R.Rule(n["pos"], "frontend/embed_positions/embedding")]
  out += R.norm(n["ln"], "frontend/layernorm_embedding/norm")
  for i in R.layer_ids(state, n["layer"]):
    out += R.encoder_layer(f"{n['layer']}{i}.", n["names"], i)
  if fmt == "fairseq" and "head/fc1/kernel" in shapes and \
      "encoder.regression_head.0.weight" in state:
    out += R.linear("encoder.regression_head.0", "head/fc1")
    out += R.linear("encoder.regression_head.2", "head/fc2")
  return out


def fold_token_type(state: dict, report) -> dict:
  """HF adds token-type row 0 to every token; d2vjax has no token types, so the row is added to
  every position row instead (the sum is the same for every non-pad token)."""
  if TOKEN_TYPE not in state:
    return state
  state = dict(state)
  pos = _NAMES["hf"]["pos"]
  state[pos] = state[pos] + state[TOKEN_TYPE][0][None, :]
  report.consumed.append(TOKEN_TYPE)
  report.notes.append(f"{TOKEN_TYPE} row 0 folded into the position embeddings")
  if state[TOKEN_TYPE].shape[0] > 1:
    # HF uses row 0 unless token_type_ids are passed; d2vjax has no token types.
    report.notes.append(f"{TOKEN_TYPE} rows 1..{state[TOKEN_TYPE].shape[0] - 1} not converted: "
                        "d2vjax inputs have no token types (HF's default token_type_ids are 0)")
  return state


def hf_extra(flat: dict) -> dict:
  """Export: the single token-type row HF expects, zero (already folded into positions)."""
  d = flat["frontend/embed_tokens/embedding"].shape[1]
  return {TOKEN_TYPE: np.zeros((1, d), np.float32)}


def parity_batch(config, rng: np.random.Generator) -> tuple[dict, list]:
  """Random batch for ``parity.compare``: 2 rows of ``min(64, max_positions)`` random tokens, the
  second right-padded (pad id) from half its length.

  Returns:
    (d2vjax inputs ``tokens`` [2, N] int32 + ``padding_mask`` [2, N] bool, HF calls
    ``[(rows, {'input_ids', 'attention_mask'})]``, both int64 [2, N]).
  """
  n = min(64, int(config.model.max_positions))
  tok = rng.integers(4, int(config.model.vocab_size), (2, n)).astype(np.int32)
  pad = np.zeros(tok.shape, bool)
  pad[1, n // 2:] = True
  tok[pad] = int(config.model.padding_idx)
  return {"tokens": tok, "padding_mask": pad}, [
      ([0, 1], {"input_ids": tok.astype(np.int64), "attention_mask": (~pad).astype(np.int64)})]


def hf_config(c, model_type: str = "data2vec-text") -> dict:
  """config.json of an HF ``Data2VecTextModel`` equal to d2vjax config ``c``."""
  del model_type
  e, m = c.model.encoder, c.model
  if e.layer_norm_first or e.input_layer_norm:
    raise ValueError("HF Data2VecText needs post-LN layers and the embedding LayerNorm")
  return dict(
      model_type="data2vec-text", architectures=["Data2VecTextModel"], hidden_size=e.dim,
      num_hidden_layers=e.num_layers, num_attention_heads=e.num_heads,
      intermediate_size=e.ffn_dim, hidden_act="gelu", layer_norm_eps=e.norm_eps,
      vocab_size=int(m.vocab_size), max_position_embeddings=int(m.max_positions) +
      int(m.padding_idx) + 1, pad_token_id=int(m.padding_idx), bos_token_id=0, eos_token_id=2,
      type_vocab_size=1, hidden_dropout_prob=e.dropout,
      attention_probs_dropout_prob=e.attention_dropout)
