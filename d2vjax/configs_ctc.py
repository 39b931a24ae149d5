"""Config builders for CTC speech fine-tuning (``python -m d2vjax.finetune``); ``configs/ctc_*.py``
are thin wrappers.

Sources: the table of fairseq's fine-tuning configs in fairseq-spec §9.1 ("table": base_* for
Base, vox_* for Large, i.e. ``examples/wav2vec/config/finetuning/*.yaml``), the shared settings
listed under it ("§9.1 all"), and the wav2vec 2.0 paper §4.3 ("w2v2 §4.3"). Where the paper and
fairseq disagree the paper wins, as in pre-training (tri-stage decay shape, base_960h lr).

The model section is only the from-scratch architecture: with ``--init`` the architecture, the
waveform normalisation and the pre-training objective are read from the checkpoint.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from d2vjax import configs_lib

# Labelled splits (w2v2 §4.1): Libri-light 10 min / 1 h / 10 h, LibriSpeech train-clean-100, all
# 960 h. Per split and size: (peak lr, updates, mask_prob, mask_channel_prob, layerdrop,
# freeze_finetune_updates), from the table (base_* / vox_*). base_960h's lr is 1e-4 as in
# w2v2 §4.3 ("For BASE on the labeled 960h subset we use a learning rate of 1e-4") and the table;
# some fairseq revisions of base_960h.yaml carry 1e-5.
SPLITS = ("10m", "1h", "10h", "100h", "960h")
_TABLE = {
    "base": {
        "10m": (5e-5, 13_000, 0.65, 0.25, 0.1, 10_000),
        "1h": (5e-5, 13_000, 0.65, 0.25, 0.1, 10_000),
        "10h": (5e-5, 20_000, 0.65, 0.5, 0.05, 10_000),
        "100h": (3e-5, 80_000, 0.65, 0.5, 0.1, 0),
        "960h": (1e-4, 320_000, 0.5, 0.1, 0.1, 0),
    },
    "large": {
        "10m": (1e-4, 13_000, 0.65, 0.25, 0.1, 10_000),
        "1h": (3e-4, 13_000, 0.75, 0.25, 0.1, 10_000),
        "10h": (1e-4, 20_000, 0.75, 0.25, 0.1, 10_000),
        "100h": (3e-5, 80_000, 0.5, 0.5, 0.1, 10_000),
        "960h": (3e-5, 320_000, 0.5, 0.25, 0.1, 10_000),
    },
}
# Audio samples per update (table: GPUs × max_tokens × update_freq): base 2 × 3.2M × 4
# (base_960h 8 × 3.2M × 1), Large 4 × 1.28M × 5, vox_960h 24 × 1.28M × 1.
_BUDGET = {"base": 25_600_000, "large": 25_600_000}
_BUDGET_LARGE_960H = 30_720_000

# Pad-mode buckets (samples at 16 kHz): 2 … 35 s, LibriSpeech's longest utterances. Each clip is
# padded to the smallest bucket that holds it (fairseq pads to the batch's longest clip); one
# compiled step per bucket; above 4 s no clip carries more than ~40 % padding.
CTC_BUCKETS = (32000, 64000, 112000, 160000, 208000, 256000, 320000, 400000, 560000)


def ctc_data() -> ml_collections.ConfigDict:
  """Labelled data section (pipeline fields, ``d2vjax/data/pipeline.py``; labels from ``.wrd``)."""
  d = configs_lib.speech_data(source="manifest")
  d.mode = "pad"  # fine-tuning pads, never crops (spec §1.1)
  # fairseq's fine-tuning configs set no min_sample_size; clips below the 400-sample receptive
  # field are still dropped by the source filters.
  d.min_sample_size = 0
  d.max_sample_size = CTC_BUCKETS[-1]
  d.buckets = list(CTC_BUCKETS)
  d.valid_split = "dev_other"  # valid_subset: dev_other (table configs)
  # None = the pre-trained checkpoint's setting; an explicit value must match it (spec §1.1:
  # fairseq asserts that fine-tuning normalises exactly as pre-training did).
  d.normalize = config_dict.placeholder(bool)
  return d


def ctc_config(size: str, split: str) -> ml_collections.ConfigDict:
  """Fine-tuning config for a pre-trained Base or Large model on one labelled split."""
  if size not in _TABLE:
    raise ValueError(f"size must be one of {sorted(_TABLE)}, got {size!r}")
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  lr, updates, mask_prob, channel_prob, layerdrop, freeze = _TABLE[size][split]
  c = ml_collections.ConfigDict()
  c.modality = "speech"
  c.objective = "ctc"
  # Pre-training run directory or exported .msgpack (the --init flag sets it); '' = from scratch.
  c.init = ""
  # From-scratch architecture: data2vec 1.0 speech (the pre-trained one replaces it with --init).
  c.model = configs_lib.speech_model(size, head_layers=1)
  c.finetune = ml_collections.ConfigDict(dict(
      # Objective of the pre-trained encoder (set from the checkpoint): picks min_masks and the
      # mask kind when those are left unset. From scratch: data2vec.
      pretrained_objective="data2vec",
      freeze_updates=freeze,  # freeze_finetune_updates (table)
      final_dropout=0.0,  # fairseq default (spec §9.1)
      # ASR-config values replace the pre-training ones (spec §9.1, pitfall §11.33).
      dropout=0.0, attention_dropout=0.0, dropout_input=0.0,
      activation_dropout=0.1,  # §9.1 all
      layerdrop=layerdrop,  # table
      # Time masks use the learned mask_emb (wav2vec 2.0, data2vec 1.0) or N(0, 0.01²) noise
      # (data2vec 2.0, spec §2.1); None = from the pre-trained objective.
      mask_kind=config_dict.placeholder(str),
      mask_noise_std=0.01,  # mask_noise_std (spec §2.1)
  ))
  c.masking = ml_collections.ConfigDict(dict(
      mask_prob=mask_prob,  # table
      mask_length=10,  # §9.1 all (default)
      # Time masks: 2 spans at least for wav2vec 2.0, 1 for data2vec (spec §9.1, §2.1); None =
      # from the pre-trained objective.
      min_masks=config_dict.placeholder(int),
      require_same_masks=True,  # spec §9.1 overrides
      channel_prob=channel_prob,  # mask_channel_prob (table)
      channel_length=64,  # mask_channel_length (§9.1 all)
  ))
  # Adam (0.9, 0.98), eps 1e-8, no weight decay, no clipping; tri-stage [0.1, 0.4, 0.5] from 1 %
  # to the peak and down to 5 % (§9.1 all). The last stage decays linearly (w2v2 §4.3 "linearly
  # decayed"; fairseq decays exponentially, spec §11.32: optim.decay_shape='exponential').
  c.optim = configs_lib.optimizer(lr, eps=1e-8, weight_decay=0.0, phase_ratio=(0.1, 0.4, 0.5),
                                  init_lr_scale=0.01, final_lr_scale=0.05)
  configs_lib.run_fields(c, updates)  # max_update (table)
  del c.guard  # no collapse guard in fine-tuning
  c.ckpt_every = 1000
  c.data = ctc_data()
  c.data.budget_samples = (_BUDGET_LARGE_960H if (size, split) == ("large", "960h")
                           else _BUDGET[size])
  c.eval = ml_collections.ConfigDict(dict(
      # fairseq validates whenever it saves (save_interval_updates: 50 in base_10m, 10000 in
      # vox_10h) after validate_after_updates (10000 in the low-resource configs); every 1000
      # updates keeps decoding a small share of the run at any size.
      every=1000,
      start=0,  # first step eligible for evaluation (validate_after_updates)
      num_samples=3,  # hypotheses logged per evaluation
      # Warn when every hypothesis is empty (the model only emits blanks) at an evaluation after
      # this share of the run: CTC's all-blank phase normally ends well before.
      blank_warn_percent=0.5,
      blank_warn_steps=config_dict.placeholder(int),
  ))
  return c


def cpu_preset(c: ml_collections.ConfigDict, total_steps: int = 600) -> None:
  """Fine-tune the ``configs/speech_base.py:cpu`` model on the embedded corpus (270 train, 30
  valid utterances, ~12 min of labelled audio: a Libri-light-10-min-sized task) on a CPU.

  The architecture matches the pre-training CPU preset (so from-scratch runs compare like for
  like). Shortened schedule: ``total_steps`` (~14 epochs) with the freeze phase at 10 % of it
  (the 10 min recipe freezes 77 %, which a few hundred steps cannot afford); peak lr 1e-3 as the
  pre-training CPU preset; time/channel masks at about half the 10 min recipe's (0.3 / 0.1 instead
  of 0.65 / 0.25): with the full masks and lr 5e-4 the tiny model was still in CTC's all-blank
  phase after 400 updates from the pre-trained checkpoint (validation CER 95 %, docs/benchmarks.md).
  """
  c.model.encoder.variant = "tiny"
  c.model.conv_channels = 64  # as configs_lib.cpu_preset
  c.data.source = "embedded"
  c.data.valid_split = "valid"
  # 2.5 / 3 / 4 / 7.25 s: 13 % padding on the embedded clip lengths (2.05 … 7.08 s).
  c.data.buckets = [40000, 48000, 64000, 116000]
  c.data.max_sample_size = 116000
  c.data.budget_samples = 320000  # 20 s of audio per update: 8 × 2.5 s … 2 × 7.25 s
  c.data.num_workers = 0
  c.total_steps = total_steps
  c.finetune.freeze_updates = total_steps // 10
  c.masking.mask_prob = 0.3
  c.masking.channel_prob = 0.1
  c.optim.peak_lr = 1e-3
  c.log_every = 10
  c.ckpt_every = 100
  c.eval.every = 50


def test_preset(c: ml_collections.ConfigDict, total_steps: int = 8) -> None:
  """Unit-test size: 2 layers × 64, 32-channel CNN (as ``configs_lib.test_preset``), one
  2.5 s bucket (longer clips are dropped and counted), 4 rows, synchronous checkpoints."""
  cpu_preset(c, total_steps)
  c.model.conv_channels = 32
  c.model.encoder.update(dict(num_layers=2, dim=64, ffn_dim=128, num_heads=2, pos_width=15,
                              pos_depth=3, pos_groups=4))
  c.data.buckets = [40000]
  c.data.max_sample_size = 40000
  c.data.budget_samples = 4 * 40000
  c.finetune.freeze_updates = 2
  c.masking.channel_length = 16  # D = 64: 64-channel spans would need min(D - 64, …) starts
  c.log_every = 1
  c.ckpt_every = 4
  c.eval.every = 4
  c.async_checkpointing = False
  c.tensorboard = False


def get_config(size: str, split: str, arg: str | None) -> ml_collections.ConfigDict:
  """The ``configs/ctc_<size>_<split>.py`` entry: presets ``cpu``, ``test``, ``steps=N``
  (``configs_lib.with_presets``)."""
  return configs_lib.with_presets(ctc_config(size, split), arg, cpu=cpu_preset, test=test_preset)
