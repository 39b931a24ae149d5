"""The fine-tuning task protocol: what ``finetune.py`` asks of a fine-tuning objective besides its
loss (registry kind ``finetune_task``, registered under the objective's name).

``finetune.run`` is generic: config + pre-trained checkpoint → ``task.check`` → examples →
``task.resolve_config`` → objective → batch hooks → state → loop → ``task.make_evaluator`` at the
validation interval → best checkpoint by ``task.metric`` (direction ``task.higher_is_better``).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Callable


@dataclasses.dataclass
class EvalReport:
  """One validation pass.

  Attributes:
    scalars: logged as ``valid/<name>`` (the best metric among them).
    record: what ``best.json`` and the run summary keep of it (must hold ``metric``).
    line: one console line.
    text: optional text logged with the scalars (e.g. sample hypotheses).
  """
  scalars: dict[str, float]
  record: dict[str, Any]
  line: str
  text: str = ""


class FinetuneTask(abc.ABC):
  """Defaults; subclasses override what their data and metric need.

  Attributes:
    metric: the ``record`` key the best checkpoint is chosen by.
    higher_is_better: its direction.
    sum_keys: training metrics summed over a log window (counts), besides ``nonfinite``.
  """

  metric = "loss"
  higher_is_better = False
  sum_keys: tuple[str, ...] = ()

  def __init__(self, config):
    self.config = config

  # ------------------------------------------------------------------ config
  def pretrained_from_stored(self, stored) -> dict:
    """Resuming: the stand-in for the pre-trained config, from this run's stored config
    (the architecture and whatever ``check`` and ``resolve_config`` read)."""
    return {"model": stored.model.to_dict(), "objective": stored.objective,
            "finetune": {"pretrained_objective": stored.finetune.pretrained_objective}}

  def check(self, config, pretrained: dict | None, init: str) -> None:
    """Refuses a config that contradicts the pre-trained model, before any work. Default: none."""
    del config, pretrained, init

  @abc.abstractmethod
  def examples(self, config, split: str) -> tuple[Any, dict[str, int]]:
    """``(examples, skipped counts)`` of ``split`` ('train' / 'valid')."""

  @abc.abstractmethod
  def resolve_config(self, config, *, pretrained: dict | None, stored, train_examples,
                     init: str):
    """The run's complete config (stored with every checkpoint)."""

  def prepare(self, config, train_examples, valid_examples) -> None:
    """Derived state the hooks below share (vocabularies, buffer sizes), from the resolved
    config and both splits. Default: none."""
    del config, train_examples, valid_examples

  def write_files(self, config, workdir: str) -> None:
    """Files beside the checkpoints (process 0). Default: none."""
    del config, workdir

  # ------------------------------------------------------------------ data hooks
  @abc.abstractmethod
  def batch_fn(self, config, objective, train: bool) -> Callable | None:
    """The pipeline's ``(rng, batch) -> batch`` hook adding the labels (and masks/mixing)."""

  @abc.abstractmethod
  def dummy_batch(self, config, objective) -> dict:
    """A host batch with every device key of a training batch (shapes for ``init``)."""

  # ------------------------------------------------------------------ evaluation
  @abc.abstractmethod
  def make_evaluator(self, config, objective, valid_examples, *, param_sharding, batch_sharding,
                     batch_multiple: int, total_steps: int, steps_per_epoch: int
                     ) -> Callable[[dict, int], EvalReport]:
    """``evaluate(params, step) -> EvalReport`` over ``valid_examples`` (each exactly once)."""

  def initial_best(self) -> dict:
    """The record no evaluation can lose to."""
    return {self.metric: -math.inf if self.higher_is_better else math.inf}

  def improved(self, record: dict, best: dict) -> bool:
    """Whether ``record`` beats ``best`` by ``metric`` (strictly)."""
    new, old = float(record[self.metric]), float(best.get(self.metric, math.nan))
    if math.isnan(new):
      return False
    if math.isnan(old):
      return True
    return new > old if self.higher_is_better else new < old
