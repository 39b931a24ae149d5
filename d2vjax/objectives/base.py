"""What every objective shares: feature extraction through its model's ``features`` and
``contextualize`` methods (the frontend and the Transformer)."""

from __future__ import annotations


class Encoder:
  """Mixin for objectives whose ``self.model`` has ``features`` and ``contextualize`` methods."""

  def encode(self, params: dict, inputs: dict, *, train: bool = False, rng=None):
    """Feature extraction without masking: (final ``[B, T, D]``, layer results ``[L, B, T, D]``,
    padding ``[B, T]``; True = pad). ``rng`` is only needed with ``train=True`` (dropout)."""
    rngs = None if rng is None else {"dropout": rng}
    f = self.model.apply({"params": params}, inputs, train, method="features", rngs=rngs)
    x, results = self.model.apply({"params": params}, f["features"], f["padding_mask"], train,
                                  method="contextualize", rngs=rngs)
    return x, results, f["padding_mask"]
