"""Name → factory registries, so shared code picks modalities, objectives and positional encoders
by name from the config instead of ``if modality == ...`` ladders.

Kinds in use: ``modality`` (feature encoder + masking policy + target-norm defaults), ``objective``
(loss + teacher scope), ``pos_encoder`` (positional encoders the shared Transformer can host),
``probe`` (linear probe heads), ``probe_data`` (labelled subsets per modality for the probes),
``finetune_task`` (what ``finetune.py`` needs per fine-tuning objective: data, labels, evaluation)
and ``cls_head`` (pooling + classification heads).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

_REGISTRY: dict[str, dict[str, Any]] = {}

# Packages whose modules register the built-in entries on import. Every module in them is imported
# lazily on the first lookup, so `import d2vjax.registry` stays cheap, import cycles cannot form,
# and a new modality/objective/model file needs no edit here.
_BUILTIN_PACKAGES = ("d2vjax.models", "d2vjax.modalities", "d2vjax.objectives",
                     "d2vjax.probes", "d2vjax.tasks")


def register(kind: str, name: str) -> Callable[[Any], Any]:
  """Decorator: ``@register('modality', 'speech')`` stores the decorated object under (kind, name)."""

  def deco(obj):
    table = _REGISTRY.setdefault(kind, {})
    if name in table and table[name] is not obj:
      raise ValueError(f"registry: {kind} {name!r} registered twice")
    table[name] = obj
    return obj

  return deco


def _load_builtins() -> None:
  for pkg_name in _BUILTIN_PACKAGES:
    pkg = importlib.import_module(pkg_name)
    for info in pkgutil.iter_modules(pkg.__path__):
      importlib.import_module(f"{pkg_name}.{info.name}")


def get(kind: str, name: str) -> Any:
  """The object registered under (kind, name); a clear error lists the known names otherwise."""
  if name not in _REGISTRY.get(kind, {}):
    _load_builtins()
  table = _REGISTRY.get(kind, {})
  if name not in table:
    raise KeyError(f"unknown {kind} {name!r}; known: {sorted(table)}")
  return table[name]


def names(kind: str) -> list[str]:
  """All registered names of one kind."""
  _load_builtins()
  return sorted(_REGISTRY.get(kind, {}))
