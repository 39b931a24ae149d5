"""Writes docs/api.md, the API reference, from the package's docstrings.

  python docs/gen_api.py            # rewrite docs/api.md
  python docs/gen_api.py --check    # exit 1 if docs/api.md is stale (tests/test_docs.py)

Every importable module of ``d2vjax`` is listed with the first paragraph of its docstring, then its
public functions and classes (``__all__`` when defined, else the public names defined in the
module) with their signatures and the first paragraph of their docstrings.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "api.md")


def _first_paragraph(doc: str | None) -> str:
  text = inspect.cleandoc(doc or "").split("\n\n")[0]
  return " ".join(text.split())


def _signature(obj) -> str:
  try:
    sig = str(inspect.signature(obj))
  except (TypeError, ValueError):
    return "(...)"
  # Object reprs carry memory addresses: not stable across runs.
  return re.sub(r" at 0x[0-9a-f]+", "", sig.replace("'", ""))


def _public(mod) -> list[str]:
  names = getattr(mod, "__all__", None)
  if names is None:
    names = [n for n, o in vars(mod).items()
             if not n.startswith("_") and (inspect.isfunction(o) or inspect.isclass(o))
             and getattr(o, "__module__", "") == mod.__name__]
  return sorted(n for n in names if inspect.isfunction(getattr(mod, n, None))
                or inspect.isclass(getattr(mod, n, None)))


def modules() -> list[str]:
  """Every module of the package, sorted (subpackages included; ``__main__``-only CLIs too)."""
  sys.path.insert(0, ROOT)
  pkg = importlib.import_module("d2vjax")
  out = ["d2vjax"]
  for info in pkgutil.walk_packages(pkg.__path__, "d2vjax."):
    out.append(info.name)
  return sorted(out)


def render() -> str:
  lines = ["# API reference", "",
           "Generated from the docstrings by `python docs/gen_api.py` (a test checks it is "
           "current). Shapes and units are in each docstring; `python -c \"import d2vjax.X; "
           "help(d2vjax.X)\"` shows the full text.", ""]
  for name in modules():
    mod = importlib.import_module(name)
    public = _public(mod)
    summary = _first_paragraph(mod.__doc__)
    if not public and not summary:
      continue
    lines += [f"## `{name}`", ""]
    if summary:
      lines += [summary, ""]
    for n in public:
      obj = getattr(mod, n)
      kind = "class " if inspect.isclass(obj) else ""
      lines.append(f"- `{kind}{n}{_signature(obj)}` — {_first_paragraph(obj.__doc__)}")
    if public:
      lines.append("")
  return "\n".join(lines).rstrip() + "\n"


def main() -> int:
  text = render()
  if "--check" in sys.argv:
    current = open(OUT, encoding="utf-8").read() if os.path.exists(OUT) else ""
    if current != text:
      print("docs/api.md is stale: run python docs/gen_api.py", file=sys.stderr)
      return 1
    return 0
  with open(OUT, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"wrote {OUT}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
