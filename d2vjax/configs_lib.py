"""Shared config builders (configs/*.py stay thin) and config helpers: ``parse_arg`` for the
``--config=file.py:key=value,flag`` presets, and duration resolution (steps / epochs / percent).

Every hyper-parameter below names its source: the data2vec paper (§4.2), the wav2vec 2.0 paper, or a
section of ../shared/reference/fairseq-spec.md (the fairseq configs).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# Crop lengths in samples (16 kHz): 2 s (fairseq min_sample_size) … 15.6 s; fairseq crops to the
# batch's shortest clip (≤ 20 s max_sample_size, spec §1.1); static shapes need a fixed set instead.
SPEECH_BUCKETS = (32000, 48000, 64000, 96000, 128000, 160000, 200000, 250000)


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
  """Parse ``'size=large,cpu'`` against typed defaults ``spec`` (big_vision's convention).

  A bare ``name`` means True for a bool field; a single unnamed value fills the first field. Types
  come from the defaults; unknown names are an error.
  """
  out = ml_collections.ConfigDict(dict(spec))
  if not arg:
    return out
  names = list(spec)
  for i, item in enumerate(x for x in arg.split(",") if x):
    key, sep, value = item.partition("=")
    if not sep:
      if key in spec and isinstance(spec[key], bool):
        key, value = key, "true"
      elif i == 0 and names:
        key, value = names[0], item
      else:
        raise ValueError(f"config arg {item!r}: unknown flag; known: {names}")
    if key not in spec:
      raise ValueError(f"config arg {key!r} unknown; known: {names}")
    default = spec[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config arg {key}={value!r} is not a bool")
      out[key] = value.lower() in ("true", "1")
    else:
      out[key] = type(default)(value)
  return out


def resolve_steps(section, prefix: str, *, steps_per_epoch: int | None, total_steps: int | None,
                  default: int | None = None) -> int | None:
  """A duration given as ``{prefix}_steps``, ``{prefix}_epochs`` or ``{prefix}_percent`` → steps.

  Epochs or percent, when set (not None), take precedence over steps, so a preset's step count can
  be overridden from the command line (``--config.total_epochs=3``); setting both epochs and
  percent is an error. Percent is a fraction of ``total_steps`` (1.0 = all); epochs need
  ``steps_per_epoch``.
  """
  epochs, percent = section.get(f"{prefix}_epochs"), section.get(f"{prefix}_percent")
  if epochs is not None and percent is not None:
    raise ValueError(f"{prefix}: give {prefix}_epochs or {prefix}_percent, not both")
  if epochs is not None:
    if not steps_per_epoch:
      raise ValueError(f"{prefix}_epochs needs the dataset size (steps per epoch)")
    return max(1, int(round(epochs * steps_per_epoch)))
  if percent is not None:
    if total_steps is None:
      raise ValueError(f"{prefix}_percent needs the total number of steps")
    return int(round(percent * total_steps))
  steps = section.get(f"{prefix}_steps")
  return default if steps is None else int(steps)


def _placeholder(kind):
  return config_dict.placeholder(kind)


def speech_data(source: str = "embedded") -> ml_collections.ConfigDict:
  """Speech data section (fields documented in d2vjax/data/pipeline.py)."""
  return ml_collections.ConfigDict(dict(
      source=source,  # embedded | manifest | folder | tfds
      manifest="", valid_manifest="", folder="",
      tfds_name="", tfds_data_dir="", train_split="train", valid_split="valid",
      sample_rate=16000,
      normalize=True,  # data2vec audio: task.normalize true (spec §1.1)
      min_sample_size=32000,  # 2 s (spec §1.1)
      max_sample_size=320000,  # 20 s (spec §4.4)
      buckets=list(SPEECH_BUCKETS),
      mode="crop",
      # Base: 63 min of audio per update (data2vec §4.2; 16 GPUs × 3.8M samples, spec §4.4).
      budget_samples=60_800_000,
      max_rows=0,
      num_workers=2,
      seed=0,
  ))


def optimizer(peak_lr: float, **overrides) -> ml_collections.ConfigDict:
  """AdamW + schedule section with fairseq's defaults (spec §7): (0.9, 0.98), eps 1e-6, wd 0.01,
  no clipping, tri-stage [0.03, 0.9, 0.07] from/to 1 % of the peak."""
  o = ml_collections.ConfigDict(dict(
      peak_lr=peak_lr,
      b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01,  # spec §7.1, §4.4
      clip_norm=0.0,  # 0 = no clipping (spec §7.3)
      schedule="tri_stage", phase_ratio=(0.03, 0.9, 0.07),  # data2vec §4.2; spec §4.4
      init_lr_scale=0.01, final_lr_scale=0.01,  # spec §7.2
      # The papers decay the last tri-stage phase linearly; fairseq's tri_stage decays
      # exponentially (spec §11.32). The paper wins; 'exponential' reproduces fairseq.
      decay_shape="linear",
      # Warm-up of the cosine / polynomial schedules (one of them).
      warmup_steps=_placeholder(int), warmup_percent=_placeholder(float),
      warmup_epochs=_placeholder(float),
  ))
  o.update(overrides)
  return o


def run_fields(c: ml_collections.ConfigDict, total_steps: int) -> None:
  """Trainer fields shared by every config: duration, devices, logging, checkpoints, guard."""
  c.seed = 0
  c.total_steps = total_steps
  c.total_epochs = _placeholder(float)
  # Stop (after saving) once this step is reached, without changing the schedules: for
  # time-limited jobs that train in chunks. 0 = run to total_steps.
  c.stop_after_steps = 0
  c.num_devices = 0  # 0 = all visible devices (a smaller number only for tests/debugging)
  # Mesh axes (name, size), one size -1 = the rest; add ("tensor", n) for tensor parallelism.
  # The batch is split over data × fsdp; params, optimizer state and teacher are sharded over
  # fsdp (and tensor) by `sharding_rules` (jax-style §4, docs/scaling.md).
  c.mesh = (("data", -1), ("fsdp", 1))
  # Multi-slice TPU: slices spanned by each axis over DCN, e.g. (("data", 2),); () = one slice.
  c.dcn_mesh = ()
  # (path regex, ops) with ops from sharding.OPS joined by '+'; first match wins. Megatron-style
  # tensor rules act only when the mesh has a 'tensor' axis.
  c.sharding_rules = (
      (r".*/(fc1|q_proj|k_proj|v_proj)/kernel", "tensor_out+fsdp"),
      (r".*/(fc2|out_proj)/kernel", "tensor_in+fsdp"),
      (".*", "fsdp"),
  )
  # Bound on compiled train-step programs (0 = the number of batch shapes in the bucket plan);
  # exceeding it stops the run with an error naming the shapes (user-needs C1).
  c.max_step_compiles = 0
  # Gradient accumulation: micro-batches per update inside the jitted step; the loss is
  # normalised once by the global count, so k × b rows equal one batch of k·b (spec §7.3).
  c.accum_steps = 1
  c.log_every = 100
  c.ckpt_every = 5000
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.tensorboard = True
  c.guard = ml_collections.ConfigDict(dict(
      key="target_var",  # metric watched for collapse
      min_value=0.1,  # fairseq min_target_var (spec §4.1 step 8); ≤ 0 disables the guard
      patience=3,  # consecutive logged windows below the threshold
      start_step=0,  # fairseq arms its guard after 5000 updates; the window average is robust
  ))
  c.probe = probe_fields()


def probe_fields(every: int = 0, *, train_split: str = "train", valid_split: str = "valid",
                 max_train: int = 128, max_valid: int = 32, layer: int = -1, steps: int = 300,
                 lr: float = 1e-2, buckets=None) -> ml_collections.ConfigDict:
  """The ``config.probe`` section (``d2vjax/probe.py``): every ``every`` steps (0 = off) fit a
  linear probe on the frozen features of ``max_train`` labelled examples of ``train_split`` and
  score it on ``max_valid`` of ``valid_split`` (speech: CTC letters, CER/WER; images and text:
  classes, accuracy). ``layer``: 0 = the Transformer's input, L = -1 its output. ``steps``, ``lr``:
  full-batch Adam on the head. ``buckets``: padded lengths in the modality's units (speech
  samples), None = the provider's default."""
  return ml_collections.ConfigDict(dict(
      every=every, train_split=train_split, valid_split=valid_split, max_train=max_train,
      max_valid=max_valid, layer=layer, steps=steps, lr=lr,
      buckets=_placeholder(list) if buckets is None else list(buckets)))


def speech_model(size: str, **overrides) -> ml_collections.ConfigDict:
  """Speech model section: CNN + Transformer, data2vec 1.0 audio defaults (spec §4.1)."""
  m = ml_collections.ConfigDict(dict(
      extractor_mode="layer_norm",  # data2vec: LN after every conv (spec §1.2)
      conv_bias=False,  # spec §4.1
      conv_channels=512,  # CNN width (spec §1.2)
      feature_grad_mult=1.0,  # spec §1.2
      dropout_input=0.0,  # spec §4.1
      encoder=dict(
          variant=size,  # Base 12×768 / Large 24×1024 (data2vec §4.2)
          # Explicit sizes override the variant's (None = the variant's value).
          num_layers=_placeholder(int), dim=_placeholder(int), ffn_dim=_placeholder(int),
          num_heads=_placeholder(int),
          dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,  # spec §4.1
          # encoder_layerdrop 0.05 (spec §4.1); Large follows wav2vec 2.0 LV-60k: none (w2v2 §4.2).
          layerdrop=0.05 if size == "base" else 0.0,
          layer_norm_first=False,  # post-LN (spec §11.26)
          pos_encoder="conv_stack", pos_width=95, pos_depth=5, pos_groups=16,  # spec §1.3b
          # Which output of each block the teacher reports: FFN output before the last residual
          # (data2vec §3.3, Table 4 'FFN'); 'attn' / 'block' are Table 4's ablations.
          layer_result="ffn",
          norm_eps=1e-5, scan=True, remat="none", dtype="float32",
          residual_tensor=False,  # also split D over 'tensor' between blocks (docs/scaling.md)
      ),
  ))
  for k, v in overrides.items():
    if k == "encoder":
      m.encoder.update(v)
    else:
      m[k] = v
  return m


def data2vec_speech(size: str) -> ml_collections.ConfigDict:
  """data2vec 1.0 speech pre-training, Base (LS-960) or Large (LL-60k), fairseq-spec §4.1/§4.4."""
  c = ml_collections.ConfigDict()
  c.modality = "speech"
  c.objective = "data2vec"
  c.model = speech_model(size, head_layers=1)  # final_proj Linear(D→D) (spec §4.1)
  c.masking = ml_collections.ConfigDict(dict(
      mask_prob=0.65, mask_length=10,  # data2vec §4.2 / spec §4.4
      min_masks=1,  # data2vec (spec §2.1)
      require_same_masks=True,
  ))
  c.targets = ml_collections.ConfigDict(dict(
      top_k=8,  # K = 8 (data2vec §4.2)
      layer_norm="instance",  # instance norm per layer (spec §4.1 step 5)
      final_norm="none",
      eps=1e-5,
  ))
  c.loss = ml_collections.ConfigDict(dict(
      beta=0.0,  # L2 (loss_beta 0, spec §4.1 step 7)
      scale=-1.0,  # ≤ 0 → 1/sqrt(D) (loss_scale null)
  ))
  c.ema = ml_collections.ConfigDict(dict(
      decay=0.999, end_decay=0.9999,  # τ0, τe (data2vec §4.2)
      anneal_steps=30000,  # τn (data2vec §4.2; spec §4.4)
      anneal_percent=_placeholder(float), anneal_epochs=_placeholder(float),
      scope=("encoder",),  # teacher = EMA of the Transformer (spec §5.4)
      copy=("encoder/pos_conv/.*",),  # pos_conv hard-copied (ema_layers_only, spec §4.1)
  ))
  # Base: data2vec §4.2. data2vec gives no Large speech values; wav2vec 2.0 LARGE (§4.2): 3e-4.
  c.optim = optimizer(5e-4 if size == "base" else 3e-4)
  # Base: 400k updates (data2vec §4.2). Large: 600k updates on LV-60k (wav2vec 2.0 §4.2).
  run_fields(c, 400_000 if size == "base" else 600_000)
  c.data = speech_data()
  if size == "large":
    c.data.budget_samples = 153_600_000  # 128 GPUs × 1.2M samples (wav2vec 2.0 §4.2, LARGE)
  return c


def wav2vec2_speech(size: str) -> ml_collections.ConfigDict:
  """wav2vec 2.0 pre-training: Base on LS-960, Large on LV-60k (wav2vec 2.0 §4.2; spec §3.5).

  Where the paper is explicit it wins over fairseq's yaml (spec §3.5 notes the Large yaml's lr
  5e-3, 1M updates and zero dropout; the paper says 3e-4, 600k updates and dropout 0.1).
  """
  base = size == "base"
  c = ml_collections.ConfigDict()
  c.modality = "speech"
  c.objective = "wav2vec2"
  c.model = speech_model(
      size,
      # Base: GroupNorm on the first conv only, no waveform normalisation (w2v2 §4.2, spec §3.5).
      extractor_mode="default" if base else "layer_norm",
      conv_bias=not base,  # spec §3.5
      feature_grad_mult=0.1 if base else 1.0,  # w2v2 §4.2 (Librispeech Base), spec §3.5
      dropout_input=0.1, dropout_features=0.1,  # w2v2 §4.2
      final_dim=256 if base else 768,  # spec §3.5
      latent_groups=2, latent_vars=320,  # G, V (w2v2 §4.2)
      encoder=dict(
          dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,  # w2v2 §4.2
          layerdrop=0.05 if base else 0.0,  # w2v2 §4.2 (no layer drop for LV-60k)
          layer_norm_first=not base,  # Large is pre-LN (spec §3.5, §11.26)
          pos_encoder="conv", pos_width=128, pos_depth=1, pos_groups=16,  # spec §1.3a
      ))
  c.masking = ml_collections.ConfigDict(dict(
      mask_prob=0.65, mask_length=10,  # w2v2 §4.2
      min_masks=2,  # wav2vec 2.0 (spec §2.1)
      require_same_masks=True,
  ))
  c.quantizer = ml_collections.ConfigDict(dict(
      max_temp=2.0, min_temp=0.5 if base else 0.1, temp_decay=0.999995,  # w2v2 §4.2
  ))
  c.loss = ml_collections.ConfigDict(dict(
      num_negatives=100,  # K distractors (w2v2 §4.2)
      logit_temp=0.1,  # κ (w2v2 §4.2)
      diversity_weight=0.1,  # α (w2v2 §4.2)
      feature_pen_weight=10.0 if base else 0.0,  # spec §3.4 / §3.5 loss_weights
  ))
  # Base: 5e-4, 400k updates; Large LV-60k: 3e-4, 600k (w2v2 §4.2). Warm-up over the first 8 %,
  # then linear decay to 0 (fairseq polynomial_decay, power 1; spec §7.2).
  c.optim = optimizer(5e-4 if base else 3e-4, schedule="polynomial")
  c.optim.warmup_percent = 0.08
  run_fields(c, 400_000 if base else 600_000)
  c.guard.key = "prob_ppl"  # a collapsing codebook drives it towards 1–2 (user-needs A1)
  c.guard.min_value = 2.0
  c.data = speech_data()
  c.data.normalize = not base  # task.normalize: false for Base, true for Large (spec §1.1)
  # Crops: Base 250k samples, Large 320k (spec §3.5); budgets: 64 × 1.4M / 128 × 1.2M samples.
  c.data.max_sample_size = 250_000 if base else 320_000
  c.data.budget_samples = 89_600_000 if base else 153_600_000
  return c


def cpu_preset(c: ml_collections.ConfigDict, total_steps: int = 300) -> None:
  """Shrink a speech config to a laptop/CI run on the embedded corpus: tiny model, short crops,
  a few hundred steps, frequent logs. The objective, masking and schedules are unchanged."""
  c.model.encoder.variant = "tiny"
  # The 512-wide CNN is ~95 % of a tiny model's FLOPs on 2 s crops; 64 channels keep its shape
  # (7 convs, strides, receptive field) at a CPU-friendly cost.
  c.model.conv_channels = 64
  c.model.encoder.layerdrop = 0.0
  if c.get("targets") is not None:
    c.targets.top_k = 3
  c.data.buckets = [32000, 48000]
  c.data.budget_samples = 8 * 32000
  c.data.num_workers = 0
  c.total_steps = total_steps
  c.optim.peak_lr = 1e-3
  c.log_every = 10
  c.ckpt_every = 100
  c.guard.patience = 5
  if c.get("ema") is not None:
    c.ema.anneal_steps = total_steps


def test_preset(c: ml_collections.ConfigDict, total_steps: int = 8) -> None:
  """Even smaller than ``cpu_preset``, for unit tests: 2 layers × 64, 1 s crops, 4 rows."""
  cpu_preset(c, total_steps)
  c.model.conv_channels = 32
  c.model.encoder.update(dict(num_layers=2, dim=64, ffn_dim=128, num_heads=2, pos_width=15,
                              pos_depth=3, pos_groups=4))
  if c.get("targets") is not None:
    c.targets.top_k = 2
  c.data.update(dict(buckets=[16000], min_sample_size=16000, budget_samples=4 * 16000))
  c.log_every = 1
  c.ckpt_every = 4
  c.async_checkpointing = False
  c.tensorboard = False


def with_presets(c: ml_collections.ConfigDict, arg: str | None, *, cpu=None, test=None,
                 **extra) -> ml_collections.ConfigDict:
  """Apply the arguments every config file accepts after ':' — ``cpu``, ``test``, ``steps=N`` —
  plus ``extra`` boolean flags mapped to functions (e.g. ``span=span_recipe``), applied first.

  ``cpu``/``test`` default to the speech presets; modalities pass their own.
  """
  spec = dict(cpu=False, test=False, steps=0, **{k: False for k in extra})
  a = parse_arg(arg, **spec)
  for name, fn in extra.items():
    if a[name]:
      fn(c)
  if a.test:
    (test or test_preset)(c, total_steps=a.steps or 8)
  elif a.cpu:
    (cpu or cpu_preset)(c, total_steps=a.steps or 300)
  elif a.steps:
    c.total_steps = a.steps
    c.total_epochs = None
  return c
