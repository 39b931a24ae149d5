"""Objectives: data2vec regression targets and losses (v1 here; v2 and wav2vec 2.0 plug in the same way)."""
