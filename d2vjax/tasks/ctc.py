"""CTC speech recognition as a fine-tuning task (fairseq-spec §9.1): letter vocabulary built from
the training transcripts, the pre-trained waveform normalisation enforced, time/channel masks in
the batch hook, greedy-decoded WER/CER on the validation split and the best checkpoint by WER
(CER breaks ties).

What a run leaves besides the generic files: ``dict.ltr.txt`` (fairseq's letter dictionary).
"""

from __future__ import annotations

import os

from absl import logging
import ml_collections
import numpy as np

from d2vjax import asr, evaluate, registry
from d2vjax.data import ctc_data
from d2vjax.tasks import base


class NormalizeMismatchError(ValueError):
  """The fine-tuning config normalises waveforms differently from the pre-trained model."""


def _pretrained_objective(config: dict) -> str:
  obj = config.get("objective")
  if obj == "ctc":  # continuing from a fine-tuned model: the encoder's own origin counts
    return config["finetune"]["pretrained_objective"]
  return obj


def check_normalize(normalize: bool | None, pretrained: dict | None, init: str = "") -> bool:
  """The waveform normalisation of the run: the pre-trained model's; ``normalize`` (the config's
  value, None = unset) may only repeat it. Raises ``NormalizeMismatchError`` on a mismatch and
  ValueError when neither says (from scratch without a value)."""
  if pretrained is None:
    if normalize is None:
      raise ValueError("data.normalize is unset and there is no --init to take it from: set "
                       "--config.data.normalize=true|false for a from-scratch run")
    return bool(normalize)
  norm = bool(pretrained["data"]["normalize"])
  if normalize is not None and bool(normalize) != norm:
    raise NormalizeMismatchError(
        f"data.normalize={bool(normalize)} but the pre-trained checkpoint {init!r} was trained "
        f"with normalize={norm}: the model would see waveforms scaled unlike anything it learned "
        f"from (fairseq asserts the same, fairseq-spec §1.1). Drop the override or pass "
        f"--config.data.normalize={str(norm).lower()}.")
  return norm


def resolve_config(config, *, pretrained: dict | None, vocab: asr.Vocabulary,
                   init: str = "") -> ml_collections.ConfigDict:
  """The run's complete config (stored with every checkpoint; ``evaluate`` rebuilds from it).

  From ``pretrained`` (the pre-training config; None = from scratch): ``model``,
  ``finetune.pretrained_objective`` and ``data.normalize`` (an explicit, different value raises
  ``NormalizeMismatchError``). Then unset choices follow the pre-trained objective's class
  (``finetune_min_masks``: wav2vec 2.0 2, data2vec 1; ``finetune_mask_kind``: data2vec 2.0
  'noise', otherwise 'learned'; spec §2.1, §9.1). ``vocab`` is stored as its token list.
  """
  c = ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else config)
  c.init = init
  c.data.normalize = check_normalize(c.data.normalize, pretrained, init)
  if pretrained is not None:
    c.model = ml_collections.ConfigDict(pretrained["model"])
    c.finetune.pretrained_objective = _pretrained_objective(pretrained)
  pre = registry.get("objective", str(c.finetune.pretrained_objective))
  if c.masking.min_masks is None:
    c.masking.min_masks = int(pre.finetune_min_masks)
  if c.finetune.mask_kind is None:
    c.finetune.mask_kind = str(pre.finetune_mask_kind)
  c.vocab = list(vocab.tokens)
  return c


@registry.register("finetune_task", "ctc")
class CtcTask(base.FinetuneTask):
  """Speech recognition with the ``ctc`` objective (greedy decoding, no LM)."""

  metric = "wer"
  higher_is_better = False
  sum_keys = ("ctc_skipped",)

  def pretrained_from_stored(self, stored) -> dict:
    out = super().pretrained_from_stored(stored)
    out["data"] = {"normalize": stored.data.normalize}
    return out

  def check(self, config, pretrained, init):
    check_normalize(config.data.normalize, pretrained, init)

  def examples(self, config, split):
    return ctc_data.asr_examples(config.data, split)

  def resolve_config(self, config, *, pretrained, stored, train_examples, init):
    if stored is not None:
      vocab = asr.Vocabulary(tuple(stored.vocab))
    else:
      vocab = asr.Vocabulary.build(e.transcript for e in train_examples)
    return resolve_config(config, pretrained=pretrained, vocab=vocab, init=init)

  def prepare(self, config, train_examples, valid_examples):
    """The vocabulary, and the static label buffer per bucket sized by both splits' longest
    transcripts."""
    self.vocab = asr.Vocabulary(tuple(config.vocab))
    self.label_len = ctc_data.label_lengths(config.data, [train_examples, valid_examples])
    print(f"vocabulary: {len(self.vocab)} tokens {''.join(self.vocab.tokens[4:])!r}; label "
          f"lengths per bucket: {self.label_len}", flush=True)

  def write_files(self, config, workdir):
    with open(os.path.join(workdir, "dict.ltr.txt"), "w") as f:
      f.write(asr.Vocabulary(tuple(config.vocab)).to_fairseq_dict())

  def _fn(self, config, objective, masks: bool) -> ctc_data.CtcBatchFn:
    m = config.masking
    kw = {}
    if masks:
      kw = dict(mask_prob=m.mask_prob, mask_length=m.mask_length, min_masks=m.min_masks,
                require_same_masks=m.require_same_masks, channel_prob=m.channel_prob,
                channel_length=m.channel_length)
    return ctc_data.CtcBatchFn(self.vocab, tuple(sorted(self.label_len.items())),
                               objective.encoder_cfg.dim, **kw)

  def batch_fn(self, config, objective, train):
    return self._fn(config, objective, masks=train)

  def dummy_batch(self, config, objective):
    """A zero batch of the smallest bucket with the pipeline's host metadata, through the
    (mask-free) batch hook."""
    base_batch = objective.modality.dummy_batch(config.data)
    s = base_batch["audio"].shape[1]
    host = {"audio": base_batch["audio"], "padding_mask": base_batch["padding_mask"],
            "_transcripts": [""], "_valid_samples": np.asarray([s]),
            "_global_valid_samples": np.asarray([s])}
    out = self._fn(config, objective, masks=False)(np.random.default_rng(0), host)
    return {k: v for k, v in out.items() if not k.startswith("_")}

  def make_evaluator(self, config, objective, valid_examples, *, param_sharding, batch_sharding,
                     batch_multiple, total_steps, steps_per_epoch):
    from d2vjax import configs_lib  # pylint: disable=g-import-not-at-top
    blank_warn = configs_lib.resolve_steps(config.eval, "blank_warn",
                                           steps_per_epoch=steps_per_epoch,
                                           total_steps=total_steps, default=total_steps)
    eval_fn = self._fn(config, objective, masks=False)
    eval_data = evaluate.eval_data_config(config)
    predict = evaluate.make_predict(objective, param_sharding, batch_sharding)
    warned = [False]

    def run(params, step: int) -> base.EvalReport:
      result = evaluate.decode_split(objective, params, eval_data, valid_examples, eval_fn,
                                     predict, batch_sharding, batch_multiple=batch_multiple)
      r = result.rates
      if result.all_blank and step >= blank_warn and not warned[0]:
        warned[0] = True
        message = (f"WARNING: every validation hypothesis is empty at step {step} (the model "
                   f"emits only blanks; blank share {result.blank_frac:.3f}). Check the learning "
                   f"rate, the freeze phase (finetune.freeze_updates) and the labels.")
        logging.warning(message)
        print(message, flush=True)
      return base.EvalReport(
          scalars={k.split("/", 1)[1]: v for k, v in result.scalars().items()},
          record={"wer": r.wer, "cer": r.cer, "loss": result.loss},
          line=(f"WER {100 * r.wer:.2f} % CER {100 * r.cer:.2f} % loss {result.loss:.3f} "
                f"blank {result.blank_frac:.3f}"),
          # The writer also logs the samples (INFO), so the console shows them once.
          text=evaluate.format_samples(result, config.eval.num_samples))

    return run

  def improved(self, record, best):
    if record["wer"] == best.get("wer"):
      return record["cer"] < best.get("cer", float("inf"))
    return super().improved(record, best)
