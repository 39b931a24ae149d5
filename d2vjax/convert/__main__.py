r"""Command line of ``d2vjax.convert`` (see docs/interop.md); the flags live in
``d2vjax.convert._cli``.

Import:  ``python -m d2vjax.convert --from=hf --in=DIR_OR_FILE [--config=configs/x.py]
         --out=P.msgpack``
         ``python -m d2vjax.convert --from=fairseq --in=CKPT.pt --out=P.msgpack``
Inspect: ``python -m d2vjax.convert --from=fairseq --in=CKPT.pt --inspect`` (key accounting only)
Export:  ``python -m d2vjax.convert --to=hf --in=P.msgpack --out=HF_DIR``
"""

from d2vjax.convert import _cli

if __name__ == "__main__":
  _cli()
