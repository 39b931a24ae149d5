"""data2vec 1.0 text config builders (configs/text_*.py stay thin).

Sources: the data2vec paper §4.3 (NLP setup) and Table 3, ../shared/reference/fairseq-spec.md §4.2,
§4.4 (fairseq ``examples/data2vec/config/text/pretraining/base.yaml``), §2.3 (masking), §5 (EMA).
Where the two disagree the paper wins, fairseq fills in what the paper leaves open:

* learning-rate schedule: tri-stage 5 % / 80 % / 15 % with linear decay (paper) rather than
  cosine with 10k warm-up (fairseq); the fairseq recipe is ``span_recipe`` (the paper's footnote 7
  says the span-masking result of Table 3 used cosine too);
* EMA anneal τn: 100k updates (paper) rather than 300k (fairseq);
* masking: BERT 15 % with 80/10/10 (paper §4.3, the "data2vec" row of Table 3) by default; the
  paper's "+ wav2vec 2.0 masking" row (spans of 4, mask_prob 0.35, all ``<mask>``; fairseq's
  config) with ``masking.kind='span'``.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from d2vjax import configs_lib as cl
from d2vjax.data.tokenizer import EMBEDDED_VOCAB_SIZE

# GPT-2 BPE dictionary + <mask> (spec §4.2; data2vec §4.3: "a byte-pair encoding of 50K types").
ROBERTA_VOCAB_SIZE = 50265
# Padded lengths of the Base pipeline: fairseq pads each batch to its longest block (spec §2.3);
# static shapes need a small fixed set, the last one tokens_per_sample.
TEXT_BUCKETS = (64, 128, 256, 512)


def text_data(vocab_size: config_dict.FieldReference) -> ml_collections.ConfigDict:
  """Text data section (fields documented in d2vjax/data/text.py)."""
  return ml_collections.ConfigDict(dict(
      source="embedded",  # embedded | files | tfds
      # tokenizers JSON ('' = the embedded 4,096-id BPE). Base needs the RoBERTa one (50,265 ids):
      # see d2vjax/data/tokenizer.py for producing it.
      tokenizer="",
      vocab_size=vocab_size,  # must equal the tokenizer's (checked when the data is listed)
      files="", valid_files="", doc_mode="blank_line",
      tfds_name="", tfds_data_dir="", train_split="train", valid_split="valid",
      tokens_per_sample=512,  # spec §2.3 / §4.2; data2vec §4.3 "up to 512 tokens"
      buckets=list(TEXT_BUCKETS),
      # 256 sequences × 512 tokens per update (data2vec §4.3) = fairseq max_tokens 8192 × 16 GPUs
      # (spec §4.4). Shorter buckets get more rows for the same padded-token budget, as fairseq's
      # max_tokens batching does.
      budget_tokens=131_072,
      max_rows=0,
      num_workers=2, num_threads=2, prefetch=4,
      seed=0,
  ))


def text_model(size: str, vocab_size: config_dict.FieldReference) -> ml_collections.ConfigDict:
  """Text model section: RoBERTa encoder, data2vec 1.0 text defaults (spec §4.2)."""
  return ml_collections.ConfigDict(dict(
      vocab_size=vocab_size,  # spec §4.2
      max_positions=512,  # position table 512 + padding_idx + 1 = 514 rows (spec §4.2)
      padding_idx=1,  # fairseq Dictionary: <pad> = 1 (spec §4.2)
      # 'full': the teacher embeds the whole original sequence (data2vec §3, §4.3: "self-attention
      # over the entire unmasked text sequence"). 'fairseq_bug4881' reproduces fairseq's teacher
      # input (pads outside the masked positions; spec §4.2, issue #4881).
      teacher_input="full",
      dropout_input=0.0,  # no extra input dropout (the embedding dropout is the encoder's)
      head_layers=2,  # regression head Linear(D→2D) → GELU → Linear(2D→D) (spec §4.2)
      encoder=dict(
          variant=size,  # RoBERTa Base: 12 × 768, FFN 3072, 12 heads (spec §4.2; data2vec §4.3)
          num_layers=config_dict.placeholder(int), dim=config_dict.placeholder(int),
          ffn_dim=config_dict.placeholder(int), num_heads=config_dict.placeholder(int),
          dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,  # spec §4.2
          layerdrop=0.0,  # spec §4.2
          layer_norm_first=False,  # post-LN, no final LN (spec §4.2, §11.26)
          # The embedding LayerNorm is the frontend's (fairseq copies it into the teacher,
          # spec §4.2); the encoder adds none.
          input_layer_norm=False,
          pos_encoder="none",  # learned positions live in the frontend (spec §4.2)
          layer_result="ffn",  # targets: FFN output before dropout/residual/LN (spec §4.2, §11.8)
          norm_eps=1e-5, scan=True, remat="none", dtype="float32",
          residual_tensor=False,  # also split D over 'tensor' between blocks (docs/scaling.md)
      ),
  ))


def data2vec_text(size: str = "base") -> ml_collections.ConfigDict:
  """data2vec 1.0 text pre-training (RoBERTa Base layout; data2vec §4.3, spec §4.2/§4.4)."""
  if size != "base":
    raise ValueError(f"data2vec 1.0 text was published at Base size only (data2vec §4.3), got "
                     f"{size!r}; shrink it with encoder overrides instead")
  vocab = config_dict.FieldReference(ROBERTA_VOCAB_SIZE)
  c = ml_collections.ConfigDict()
  c.modality = "text"
  c.objective = "data2vec"
  c.model = text_model(size, vocab)
  c.masking = ml_collections.ConfigDict(dict(
      kind="bert",  # data2vec §4.3 / Table 3 "data2vec" row
      vocab_size=vocab,  # <mask> = vocab_size - 1, specials 0..3 (fairseq layout)
      bert=dict(mask_prob=0.15, leave_unmasked_prob=0.1, random_token_prob=0.1),  # data2vec §4.3
      # Table 3 "+ wav2vec 2.0 masking": spans of 4, p 0.35, no random/unmasked (data2vec §5.3;
      # spec §2.3, §4.4). mask_special: fairseq's spans cover <s>/</s> too (spec §11.6).
      span=dict(mask_prob=0.35, span_length=4, mask_special=True),
  ))
  c.targets = ml_collections.ConfigDict(dict(
      top_k=10,  # K = 10 (data2vec §4.3)
      layer_norm="layer",  # parameter-less LN per layer (data2vec §3.3; spec §4.2)
      final_norm="none",  # spec §4.2
      eps=1e-5,
  ))
  c.loss = ml_collections.ConfigDict(dict(
      beta=4.0,  # smooth L1, β = 4 (data2vec §4.3; spec §4.2 loss_beta)
      scale=1.0,  # loss_scale 1 (spec §4.2), not 1/sqrt(D)
  ))
  c.ema = ml_collections.ConfigDict(dict(
      decay=0.999, end_decay=0.9999,  # τ0, τe (data2vec §4.3)
      anneal_steps=100_000,  # τn (data2vec §4.3; fairseq's config says 300k, spec §4.4)
      anneal_percent=config_dict.placeholder(float), anneal_epochs=config_dict.placeholder(float),
      # Teacher = EMA of the sentence encoder with token/position embeddings and the embedding LN
      # hard-copied every step (ema_transformer_layers_only, spec §4.2, §5.4).
      scope=("encoder", "frontend"),
      copy=("frontend/.*",),
  ))
  # lr 2e-4 (data2vec §4.3); Adam (0.9, 0.98), eps 1e-6, wd 0.01, clip 5 (spec §4.4);
  # tri-stage 5 % / 80 % / 15 % with linear decay (data2vec §4.3), from/to 1 % of the peak
  # (fairseq tri_stage defaults, spec §7.2: the paper does not say).
  c.optim = cl.optimizer(2e-4, clip_norm=5.0, phase_ratio=(0.05, 0.8, 0.15))
  cl.run_fields(c, 1_000_000)  # 1M updates (data2vec §4.3)
  c.data = text_data(vocab)
  return c


def span_recipe(c: ml_collections.ConfigDict) -> None:
  """The span-masking variant as fairseq's config runs it (Table 3 "+ wav2vec 2.0 masking"):
  spans of 4 with p 0.35 and cosine decay after 10k warm-up updates (data2vec footnote 7;
  spec §4.4)."""
  c.masking.kind = "span"
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 10_000


def text_cpu_preset(c: ml_collections.ConfigDict, total_steps: int = 300) -> None:
  """Shrink a text config to a laptop/CI run on the embedded corpus: 4 × 256 encoder, the
  embedded 4,096-id BPE, 128-token blocks, a few hundred steps. Objective, masking, targets and
  the shape of the schedules are unchanged."""
  c.model.encoder.variant = "tiny"
  c.model.vocab_size = EMBEDDED_VOCAB_SIZE  # also masking/data.vocab_size (one reference)
  c.targets.top_k = 3  # 3 of 4 layers, about Base's 10 of 12
  # 8 × 128 tokens a step: about 1 s per step on 2 shared CPU cores, 3 epochs of the corpus in 300.
  c.data.update(dict(source="embedded", tokenizer="", tokens_per_sample=128, buckets=[64, 128],
                     budget_tokens=8 * 128, num_workers=0))
  c.total_steps = total_steps
  c.ema.anneal_steps = total_steps
  c.optim.peak_lr = 1e-3
  if c.optim.schedule == "cosine":
    c.optim.warmup_steps = max(1, total_steps // 20)
  c.log_every = 10
  c.ckpt_every = 100
  c.guard.patience = 5


def text_test_preset(c: ml_collections.ConfigDict, total_steps: int = 8) -> None:
  """Even smaller than ``text_cpu_preset``, for unit tests: 2 layers × 64, 64-token blocks."""
  text_cpu_preset(c, total_steps)
  c.model.encoder.update(dict(num_layers=2, dim=64, ffn_dim=128, num_heads=2))
  c.targets.top_k = 2
  c.data.update(dict(tokens_per_sample=64, buckets=[32, 64], budget_tokens=4 * 64))
  c.log_every = 1
  c.ckpt_every = 4
  c.async_checkpointing = False
  c.tensorboard = False
