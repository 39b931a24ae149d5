"""The docs stay true (issue 10): every command in README.md and docs/*.md names a module or script
that exists, flags that module defines, config files that load and config fields that exist;
code blocks tagged ``bash run`` run; docs/api.md is current; every config file is documented."""

import glob
import importlib
import importlib.util
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
# absl's own flags, accepted by every absl program.
ABSL_FLAGS = {"helpfull", "help", "helpshort", "flagfile", "logtostderr", "alsologtostderr", "v",
              "verbosity", "log_dir"}


def _blocks(path):
  """``(info string, text)`` of every fenced code block."""
  text = open(path, encoding="utf-8").read()
  return re.findall(r"^```([^\n]*)\n(.*?)^```", text, flags=re.S | re.M)


def _commands(path):
  """Shell commands: lines of bash blocks (continuations joined, split at && ; |) and inline
  code spans that start with ``python``."""
  out = []
  for info, body in _blocks(path):
    if not info.strip().startswith("bash"):
      continue
    body = re.sub(r"\\\n\s*", " ", body)
    for line in body.splitlines():
      line = line.split(" #")[0].strip()
      if line and not line.startswith("#"):
        out += [c.strip() for c in re.split(r"&&|;|\|", line) if c.strip()]
  text = open(path, encoding="utf-8").read()
  text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
  out += [m.replace("\n", " ") for m in re.findall(r"`(python [^`]+)`", text)]
  return out


def _defined_flags(source: str) -> set[str]:
  names = set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", source))
  names |= set(re.findall(r"add_argument\(\s*\"--([\w-]+)\"", source))
  return names


def _load_config(spec: str):
  path, _, arg = spec.partition(":")
  mod = runpy.run_path(os.path.join(ROOT, path))
  return mod["get_config"](arg or None)


def _has_field(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, IndexError):
      return False
  return True


def _check(cmd: str) -> list[str]:
  """Problems with one command (empty when it is consistent with the code)."""
  try:
    tokens = shlex.split(cmd)
  except ValueError:
    return []
  if len(tokens) < 2 or tokens[0] not in ("python", "bash"):
    return []
  problems = []
  if tokens[0] == "bash" or not tokens[1].startswith("-"):
    script = tokens[1]
    if "<" in script or "..." in script:
      return []
    if not os.path.exists(os.path.join(ROOT, script)):
      return [f"{cmd!r}: {script} does not exist"]
    source = open(os.path.join(ROOT, script), encoding="utf-8").read()
    args = tokens[2:]
    if tokens[0] == "bash":
      return []
  elif tokens[1] == "-m" and len(tokens) > 2 and tokens[2].startswith("d2vjax"):
    module = tokens[2]
    spec = importlib.util.find_spec(module)
    if spec is None:
      return [f"{cmd!r}: no module {module}"]
    source = open(spec.origin, encoding="utf-8").read()
    args = tokens[3:]
  else:
    return []
  flags = _defined_flags(source)
  config = None
  for a in args:
    if not a.startswith("--"):
      continue
    name, _, value = a[2:].partition("=")
    if name == "config" and value:
      if "<" in value or "..." in value:
        continue
      if not os.path.exists(os.path.join(ROOT, value.partition(":")[0])):
        problems.append(f"{cmd!r}: config file {value} does not exist")
        continue
      config = _load_config(value)
    elif name.startswith("config."):
      if config is not None and not _has_field(config, name[len("config."):]):
        problems.append(f"{cmd!r}: the config has no field {name[len('config.'):]}")
    elif name.removeprefix("no") not in flags | ABSL_FLAGS:
      problems.append(f"{cmd!r}: flag --{name} is not defined by {tokens[1:3]}")
  return problems


@pytest.mark.parametrize("path", DOCS, ids=[os.path.relpath(p, ROOT) for p in DOCS])
def test_commands_in_docs_match_the_code(path):
  problems = [p for c in _commands(path) for p in _check(c)]
  assert not problems, "\n".join(problems)


def test_the_checker_catches_wrong_commands():
  """The checker is not vacuous: a wrong module, flag, config file and field are reported."""
  assert _check("python -m d2vjax.nonexistent --x=1")
  assert _check("python -m d2vjax.train --config=configs/speech_base.py --no_such_flag=1")
  assert _check("python -m d2vjax.train --config=configs/nope.py")
  assert _check("python -m d2vjax.train --config=configs/speech_base.py:test "
                "--config.optim.no_such_field=1")
  assert not _check("python -m d2vjax.train --config=configs/speech_base.py:test "
                    "--config.optim.peak_lr=1e-3 --workdir=/tmp/x")


def test_runnable_blocks_run(tmp_path):
  """Blocks tagged ``bash run`` are executed as written (from the repository root)."""
  ran = 0
  for path in DOCS:
    for info, body in _blocks(path):
      if info.strip() != "bash run":
        continue
      r = subprocess.run(["bash", "-c", body], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "TMPDIR": str(tmp_path)})
      assert r.returncode == 0, f"{path}:\n{body}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
      ran += 1
  assert ran >= 1


def test_every_config_file_is_documented():
  text = open(os.path.join(ROOT, "docs", "configs.md"), encoding="utf-8").read()
  missing = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "configs",
                                                                             "*.py")))
             if os.path.relpath(p, ROOT) not in text]
  assert not missing, f"configs not in docs/configs.md: {missing}"


def test_docs_are_linked_from_the_readme():
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  pages = [os.path.relpath(p, ROOT) for p in DOCS[1:]]
  assert not [p for p in pages if p not in readme], "docs pages missing from README.md"


def test_api_reference_is_current():
  sys.path.insert(0, os.path.join(ROOT, "docs"))
  try:
    gen = importlib.import_module("gen_api")
  finally:
    sys.path.pop(0)
  current = open(gen.OUT, encoding="utf-8").read()
  assert current == gen.render(), "docs/api.md is stale: run python docs/gen_api.py"
