"""The small speech corpus shipped inside the package (``d2vjax/data/embedded/speech``).

300 synthetic English utterances (espeak-ng over many accents and voice variants, text from a
template sentence generator; see ``d2vjax/data/embedded/PROVENANCE.md`` and
``scripts/make_speech_corpus.py``), about 13 minutes in all. Audio is Ogg Vorbis that decodes to
16 kHz mono float; every clip lasts at least 2 s (32000 samples).

Layout under ``SPEECH_DIR`` (fairseq conventions)::

  train/<id>.ogg, valid/<id>.ogg   audio
  train.tsv, valid.tsv             manifest: first line ".", then "<split>/<id>.ogg<TAB>num_samples"
  train.wrd, valid.wrd             uppercase word transcripts, one per tsv row, same order
  train.ltr, valid.ltr             letter targets ("H E L L O | W O R L D |")
  voices.tsv                       id, voice, speed (wpm), pitch, split

Nothing here decodes audio; ``d2vjax.data.sources`` reads the manifests.
"""

from __future__ import annotations

import pathlib

__all__ = ["SPEECH_DIR", "SPLITS", "speech_manifest", "speech_transcripts", "speech_letters"]

# The data folder sits beside this module: ``d2vjax/data/embedded/`` (shipped as package data).
SPEECH_DIR: pathlib.Path = pathlib.Path(__file__).resolve().parent / "embedded" / "speech"
SPLITS = ("train", "valid")


def _check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"unknown embedded speech split {split!r}; valid splits: {', '.join(SPLITS)}")
  return split


def _split_file(split: str, ext: str) -> pathlib.Path:
  path = SPEECH_DIR / f"{_check_split(split)}.{ext}"
  if not path.is_file():
    raise FileNotFoundError(f"embedded speech corpus file missing: {path} (package data not "
                            "installed? regenerate with scripts/make_speech_corpus.py)")
  return path


def speech_manifest(split: str) -> str:
  """Path of the fairseq manifest (``.tsv``) of ``split`` ('train' or 'valid').

  The manifest's first line is ``.`` (the root, relative to the tsv's folder); each further line is
  ``<split>/<id>.ogg<TAB><num_samples>`` with ``num_samples`` the decoded length in samples at
  16 kHz. Raises ValueError for other splits.
  """
  return str(_split_file(split, "tsv"))


def speech_transcripts(split: str) -> list[str]:
  """Word transcripts of ``split`` in manifest order (uppercase, characters ``A-Z``, ``'`` and
  single spaces; read from ``<split>.wrd``). Raises ValueError for unknown splits."""
  return _split_file(split, "wrd").read_text().splitlines()


def speech_letters(split: str) -> list[str]:
  """Letter targets of ``split`` in manifest order (fairseq ``.ltr``: characters separated by
  spaces, ``|`` after every word). Raises ValueError for unknown splits."""
  return _split_file(split, "ltr").read_text().splitlines()
