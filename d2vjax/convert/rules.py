"""Key tables between PyTorch state dicts and d2vjax param trees, applied in both directions.

A ``Rule`` maps one source tensor to one d2vjax leaf with a layout change (``kind``); a list of
rules is applied by ``to_params`` (import: every rule's key must exist and fit the model's shape)
and inverted by ``to_state_dict`` (export). ``Report`` keeps the key accounting: every source key
ends up consumed, dropped with a reason, or is an error.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

import numpy as np

# Where the shared Transformer keeps its layers: stacked along axis 0 when scanned, else one
# subtree per layer (``layers_{i}``).
LAYERS = "encoder/layers"


@dataclasses.dataclass(frozen=True)
class Rule:
  """One source tensor ↔ one d2vjax leaf.

  Attributes:
    src: source key (e.g. ``encoder.layers.3.fc1.weight``).
    dst: d2vjax leaf path (``encoder/layers/fc1/kernel`` for layer rules).
    kind: 'id' (same layout; unit axes may be squeezed, head axes split), 'linear' (PyTorch
      Linear weight (out, in) ↔ Flax kernel (in, …, out)), 'conv' (PyTorch Conv weight
      (out, in/g, *k) ↔ Flax (*k, in/g, out)).
    layer: encoder layer index for layer rules, else None.
    n: 'linear': number of leading input axes of the Flax kernel (2 for attention out_proj);
      'id': unit axes the source has in front (1 × 1 × D tokens, (1, 1, k) weight-norm gains).
    part: (index, count): this rule takes part ``index`` of ``count`` equal slices of the source
      along axis 0 (a fused qkv projection), else None.
  """
  src: str
  dst: str
  kind: str = "id"
  layer: int | None = None
  n: int = 0
  part: tuple | None = None


def linear(src: str, dst: str, layer=None, bias: bool = True, n_in: int = 1) -> list[Rule]:
  """Rules for a PyTorch Linear ``src.{weight,bias}`` → Flax Dense ``dst/{kernel,bias}``."""
  rules = [Rule(f"{src}.weight", f"{dst}/kernel", "linear", layer, n_in)]
  if bias:
    rules.append(Rule(f"{src}.bias", f"{dst}/bias", "id", layer))
  return rules


def norm(src: str, dst: str, layer=None) -> list[Rule]:
  """Rules for a PyTorch LayerNorm/GroupNorm ``src.{weight,bias}`` → ``dst/{scale,bias}``."""
  return [Rule(f"{src}.weight", f"{dst}/scale", "id", layer),
          Rule(f"{src}.bias", f"{dst}/bias", "id", layer)]


def _to_flax(kind: str, a: np.ndarray) -> np.ndarray:
  if kind == "linear":
    return a.T
  if kind == "conv":
    return np.transpose(a, tuple(range(2, a.ndim)) + (1, 0))
  return a


def _to_torch(rule: Rule, a: np.ndarray) -> np.ndarray:
  if rule.kind == "linear":
    return a.reshape(int(np.prod(a.shape[:rule.n])), -1).T
  if rule.kind == "conv":
    nk = a.ndim - 2
    return np.transpose(a, (a.ndim - 1, a.ndim - 2) + tuple(range(nk)))
  if rule.n:
    return a.reshape((1,) * rule.n + a.shape)
  # Head-split biases (H, dh) are flat (D,) in PyTorch.
  return a.reshape(-1) if a.ndim == 2 and rule.dst.endswith("bias") else a


def _fits(got: tuple, want: tuple) -> bool:
  """Same shape up to unit axes, or ``want`` splits one axis of ``got`` in two (attention heads)."""
  if got == want:
    return True
  if int(np.prod(got)) != int(np.prod(want)):
    return False
  squeeze = lambda s: tuple(d for d in s if d != 1)
  if squeeze(got) == squeeze(want):
    return True
  return len(want) == len(got) + 1 and any(
      want[:i] + (want[i] * want[i + 1],) + want[i + 2:] == got for i in range(len(want) - 1))


def unrolled(dst: str, layer: int) -> str:
  """Path of layer ``layer``'s leaf in an unscanned stack: ``…/layers/x`` → ``…/layers_{i}/x``."""
  return re.sub(r"(^|/)layers/", rf"\g<1>layers_{layer}/", dst, count=1)


def _leaf_path(rule: Rule, shapes: dict) -> tuple[str, tuple]:
  """(path in the param tree, expected shape of this rule's slice)."""
  if rule.layer is None:
    if rule.dst not in shapes:
      raise KeyError(f"d2vjax model has no parameter {rule.dst!r} (for source key {rule.src!r})")
    return rule.dst, tuple(shapes[rule.dst])
  if rule.dst in shapes:  # scanned: stacked along axis 0
    return rule.dst, tuple(shapes[rule.dst][1:])
  path = unrolled(rule.dst, rule.layer)
  if path not in shapes:
    raise KeyError(f"d2vjax model has no parameter {path!r} (for source key {rule.src!r})")
  return path, tuple(shapes[path])


@dataclasses.dataclass
class Report:
  """Key accounting of one conversion (written to the export's ``.json`` sidecar)."""
  source: str = ""
  consumed: list = dataclasses.field(default_factory=list)
  dropped: dict = dataclasses.field(default_factory=dict)  # source key → reason
  initialised: dict = dataclasses.field(default_factory=dict)  # d2vjax path → reason
  notes: list = dataclasses.field(default_factory=list)

  def drop(self, state: dict, patterns: Iterable[tuple[str, str]]) -> None:
    """Mark every not yet consumed key matching a (regex, reason) pattern as dropped."""
    done = set(self.consumed)
    for key in state:
      if key in done or key in self.dropped:
        continue
      for pattern, reason in patterns:
        if re.fullmatch(pattern, key):
          self.dropped[key] = reason
          break

  def check_complete(self, state: dict) -> None:
    """Every source key consumed or dropped, else an error listing the others."""
    left = sorted(set(state) - set(self.consumed) - set(self.dropped))
    if left:
      more = f" (+{len(left) - 20} more)" if len(left) > 20 else ""
      raise ValueError(f"{self.source}: unrecognised checkpoint keys {left[:20]}{more}; "
                       "neither converted nor known to be safe to drop")

  def summary(self) -> dict:
    """JSON-serialisable accounting."""
    return {"source": self.source, "consumed": len(self.consumed), "dropped": self.dropped,
            "initialised": self.initialised, "notes": self.notes}


def to_params(state: dict, rules: list[Rule], shapes: dict, report: Report) -> dict:
  """Apply ``rules`` to a state dict of numpy arrays.

  Args:
    state: source key → array.
    rules: the family's key table.
    shapes: d2vjax leaf path ('a/b/c') → shape, of the model built from the derived config.
    report: accounting; consumed keys are appended.
  Returns:
    flat dict path → float32 array (layers stacked when the model is scanned). Raises naming the
    source key when it is missing or its shape does not fit.
  """
  flat, filled = {}, {}
  consumed = set(report.consumed)
  for r in rules:
    if r.src not in state:
      raise KeyError(f"{report.source}: missing checkpoint key {r.src!r} (needed for {r.dst})")
    a = np.asarray(state[r.src], dtype=np.float32)
    if r.part is not None:
      a = np.split(a, r.part[1], axis=0)[r.part[0]]
    path, want = _leaf_path(r, shapes)
    b = _to_flax(r.kind, a)
    if not _fits(b.shape, want):
      raise ValueError(f"{report.source}: key {r.src!r} has shape {a.shape}, which does not fit "
                       f"d2vjax {path} {want} (derived config wrong or checkpoint damaged)")
    if r.layer is not None and path == r.dst:
      # Scanned stack: the (transposing) copy goes straight into the layer's slot, so a Base
      # model's weights are copied once, not once per layer and again by a stack.
      if not 0 <= r.layer < shapes[path][0]:
        raise KeyError(f"{report.source}: {r.src!r} is layer {r.layer}; the model has "
                       f"{shapes[path][0]} layers")
      if path not in flat:
        flat[path] = np.empty(shapes[path], np.float32)
      flat[path][r.layer] = b.reshape(want)
      filled.setdefault(path, set()).add(r.layer)
    else:
      flat[path] = np.ascontiguousarray(b.reshape(want))
    if r.src not in consumed:
      consumed.add(r.src)
      report.consumed.append(r.src)
  for path, layers in filled.items():
    n = shapes[path][0]
    if sorted(layers) != list(range(n)):
      raise KeyError(f"{report.source}: {path}: layers {sorted(layers)} given, model has {n}")
  return flat


def to_state_dict(flat: dict, rules: list[Rule]) -> dict:
  """Inverse of ``to_params``: d2vjax flat params → source-layout state dict (float32 numpy)."""
  out = {}
  for r in rules:
    if r.part is not None:
      raise ValueError(f"export of fused source tensors ({r.src}) is not supported")
    if r.layer is not None and r.dst in flat:
      a = flat[r.dst][r.layer]
    else:
      path = r.dst if r.layer is None else unrolled(r.dst, r.layer)
      if path not in flat:
        raise KeyError(f"export: d2vjax params have no {path!r} (for {r.src!r})")
      a = flat[path]
    out[r.src] = np.ascontiguousarray(_to_torch(r, np.asarray(a, np.float32)))
  return out


def flatten(tree: dict, prefix: str = "") -> dict:
  """Nested dict → {'a/b/c': leaf}."""
  out = {}
  for k, v in tree.items():
    p = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      out.update(flatten(v, p))
    else:
      out[p] = v
  return out


def unflatten(flat: dict) -> dict:
  """{'a/b/c': leaf} → nested dict."""
  out: dict = {}
  for path, v in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def encoder_layer(prefix: str, names: dict, i: int, k_bias: bool = True) -> list[Rule]:
  """Rules of one Transformer layer ``i`` whose source modules are ``prefix + names[...]`` with
  names for 'q', 'k', 'v', 'o' (attention projections), 'ln1' (d2vjax ``self_attn_layer_norm``),
  'fc1', 'fc2', 'ln2' (``final_layer_norm``)."""
  out = []
  for key, proj in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
    out += linear(prefix + names[key], f"{LAYERS}/self_attn/{proj}", i,
                  bias=k_bias or key != "k")
  out += linear(prefix + names["o"], f"{LAYERS}/self_attn/out_proj", i, n_in=2)
  out += norm(prefix + names["ln1"], f"{LAYERS}/self_attn_layer_norm/norm", i)
  out += linear(prefix + names["fc1"], f"{LAYERS}/fc1", i)
  out += linear(prefix + names["fc2"], f"{LAYERS}/fc2", i)
  out += norm(prefix + names["ln2"], f"{LAYERS}/final_layer_norm/norm", i)
  return out


def layer_ids(state: dict, prefix: str) -> list[int]:
  """Sorted layer indices ``i`` of keys ``prefix + '{i}.…'``; an error if not 0..n-1."""
  ids = sorted({int(m.group(1)) for k in state
                for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m})
  if not ids:
    raise ValueError(f"checkpoint has no {prefix}* keys")
  if ids != list(range(len(ids))):
    raise ValueError(f"{prefix}*: layers {ids} are not numbered 0..{len(ids) - 1}")
  return ids
