r"""Command line of ``d2vjax.convert`` (see docs/interop.md).

Import:  ``python -m d2vjax.convert --from=hf --in=DIR_OR_FILE [--config=configs/x.py]
         --out=P.msgpack``
         ``python -m d2vjax.convert --from=fairseq --in=CKPT.pt --out=P.msgpack``
Inspect: ``python -m d2vjax.convert --from=fairseq --in=CKPT.pt --inspect`` (key accounting only)
Export:  ``python -m d2vjax.convert --to=hf --in=P.msgpack --out=HF_DIR``
"""

from __future__ import annotations

import json

from absl import app, flags


def _cli() -> None:
  src = flags.DEFINE_enum("from", None, ["hf", "fairseq"], "Source checkpoint format.")
  dst = flags.DEFINE_enum("to", None, ["hf"], "Export a d2vjax .msgpack to this layout.")
  path = flags.DEFINE_string("in", None, "Checkpoint file/directory, or .msgpack with --to.")
  config = flags.DEFINE_string("config", None, "d2vjax config (configs/x.py[:args]) to map "
                               "onto; default: the family's configs/*.py")
  out = flags.DEFINE_string("out", None, "Output .msgpack (import) or directory (export).")
  inspect = flags.DEFINE_bool("inspect", False, "Only read and account for the keys.")
  fairseq_padding = flags.DEFINE_bool(
      "fairseq_padding", False, "Speech conv-stack positions: reproduce fairseq/HF on padded "
      "batches (padding zeroed once, pos_encoder=conv_stack_fairseq) instead of d2vjax's "
      "padding-invariant stack.")

  def main(argv):
    del argv
    from d2vjax import convert  # pylint: disable=g-import-not-at-top
    if not path.value or (src.value is None) == (dst.value is None):
      raise app.UsageError("give --in and exactly one of --from / --to")
    if dst.value:
      if not out.value:
        raise app.UsageError("--out (a directory) is required")
      from d2vjax import export  # pylint: disable=g-import-not-at-top
      from d2vjax.convert import hf_export  # pylint: disable=g-import-not-at-top
      _, params, cfg = export.load_model(path.value)
      print(f"wrote {hf_export.export_hf(params, cfg, out.value)}")
      return
    if inspect.value:
      state, ckcfg = convert.read(path.value, src.value)
      family = convert.detect(src.value, state, ckcfg)
      if family == "data2vec2":
        inv = convert.d2v2.inventory(state, ckcfg)
        inv["consumed"] = len(inv["consumed"])
        print(json.dumps(inv, indent=1, default=str))
        return
    if not out.value and not inspect.value:
      raise app.UsageError("--out is required (or --inspect)")
    params, cfg, report = convert.convert(path.value, src.value, config.value)
    if fairseq_padding.value:
      convert.use_fairseq_padding(cfg, report)
    print(json.dumps(report.summary(), indent=1))
    if not inspect.value:
      print(f"wrote {convert.save(params, cfg, report, out.value)}")

  app.run(main)


if __name__ == "__main__":
  _cli()
