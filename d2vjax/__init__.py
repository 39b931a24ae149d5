"""d2vjax: data2vec 1.0/2.0 and wav2vec 2.0 in JAX/Flax."""

__version__ = "0.1.0"
