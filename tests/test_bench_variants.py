"""The mini-study's variants (bench/ministudy.py) name config files and fields that exist, so a
multi-hour study cannot die on a typo after its first variants."""

import importlib.util
import os
import runpy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ministudy():
  spec = importlib.util.spec_from_file_location("ministudy", os.path.join(ROOT, "bench",
                                                                          "ministudy.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_every_variant_override_names_an_existing_field():
  variants = _ministudy().VARIANTS
  assert {"scratch", "d2v1", "d2v2", "w2v2", "d2v1_k1", "d2v1_attn"} <= set(variants)
  for name, (config, flags, _) in variants.items():
    if config is None:
      continue
    path, _, arg = config.partition(":")
    c = runpy.run_path(os.path.join(ROOT, path))["get_config"](arg or None)
    for flag in flags:
      dotted, _, value = flag.removeprefix("--config.").partition("=")
      node = c
      for part in dotted.split("."):
        assert part in node, f"{name}: {config} has no field {dotted}"
        node = node[part]
      type(node)(value)  # the value parses as the field's type (raises otherwise)
