"""CTC fine-tuning pieces (issue 7, items 1–2): the loss against a NumPy forward algorithm, greedy
decoding, WER/CER, the vocabulary and labels, example filtering, the freeze phase (bit-exact), the
delayed optimizer and noise masks."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from d2vjax import asr, configs_ctc, configs_lib, finetune, optim, registry, train
from d2vjax import step as step_lib
from d2vjax.data import ctc_data
from d2vjax.objectives import ctc


# ----------------------------------------------------------------------------- loss


def _np_ctc_nll(log_probs: np.ndarray, labels: list[int], blank: int = 0) -> float:
  """Graves et al. (2006) forward algorithm over the blank-extended label, in log space.

  log_probs: ``[T, V]`` log-softmax of one utterance's valid frames. Returns -log p(labels | x),
  or +inf when no alignment exists.
  """
  ext = [blank]
  for c in labels:
    ext += [c, blank]
  s, t_len = len(ext), log_probs.shape[0]
  alpha = np.full((t_len, s), -np.inf)
  alpha[0, 0] = log_probs[0, blank]
  if s > 1:
    alpha[0, 1] = log_probs[0, ext[1]]
  for t in range(1, t_len):
    for i in range(s):
      terms = [alpha[t - 1, i]]
      if i >= 1:
        terms.append(alpha[t - 1, i - 1])
      if i >= 2 and ext[i] != blank and ext[i] != ext[i - 2]:
        terms.append(alpha[t - 1, i - 2])
      alpha[t, i] = np.logaddexp.reduce(terms) + log_probs[t, ext[i]]
  total = np.logaddexp(alpha[-1, -1], alpha[-1, -2]) if s > 1 else alpha[-1, -1]
  return float(-total)


def test_ctc_loss_matches_numpy_forward_algorithm():
  """Per-row losses equal the NumPy recursion: a repeated label (needs a blank between), frame
  padding, label padding; an impossible alignment is skipped with loss 0."""
  rng = np.random.default_rng(0)
  b, t, v, l = 4, 7, 5, 4
  logits = rng.standard_normal((b, t, v)).astype(np.float32) * 2
  frames = [7, 5, 6, 2]
  rows = [[1, 1, 2], [3, 4], [2, 3, 3, 1], [1, 1]]  # row 3: 2 frames < 2 labels + 1 repeat
  labels = np.zeros((b, l), np.int32)
  label_pad = np.ones((b, l), bool)
  for i, r in enumerate(rows):
    labels[i, :len(r)], label_pad[i, :len(r)] = r, False
  logit_pad = np.arange(t)[None, :] >= np.asarray(frames)[:, None]
  loss, skipped = jax.jit(ctc.ctc_loss)(logits, logit_pad, labels, label_pad)
  log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
  for i in range(3):
    want = _np_ctc_nll(log_probs[i, :frames[i]], rows[i])
    np.testing.assert_allclose(float(loss[i]), want, rtol=1e-5)
  assert np.isinf(_np_ctc_nll(log_probs[3, :frames[3]], rows[3]))
  assert list(np.asarray(skipped)) == [False, False, False, True]
  assert float(loss[3]) == 0.0
  # The skipped row contributes no gradient; the others' gradients are finite.
  g = jax.grad(lambda x: jnp.sum(ctc.ctc_loss(x, logit_pad, labels, label_pad)[0]))(logits)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[3] == 0)


# ----------------------------------------------------------------------------- text side


def test_vocabulary_layout_encode_decode():
  vocab = asr.Vocabulary.build(["ABBA CAB", None, "b'a"])
  # fairseq specials, the separator, then letters by count (A:4, B:4, then ' and C with 1 each,
  # ties in code-point order).
  assert vocab.tokens == ("<s>", "<pad>", "</s>", "<unk>", "|", "A", "B", "'", "C")
  ids = vocab.encode("cab  ab?")
  assert list(ids) == [8, 5, 6, 4, 5, 6, 3, 4]  # lower case folded; '?' → <unk>; | after words
  assert vocab.decode(ids) == "CAB AB"  # <unk> dropped from hypotheses
  assert asr.text_units("HI YOU") == list("HI|YOU|")
  assert "| 1" in vocab.to_fairseq_dict().splitlines()[0]
  with pytest.raises(ValueError):
    asr.Vocabulary(("a", "b"))


def test_greedy_decoding_collapses_repeats_and_removes_blanks():
  vocab = asr.Vocabulary(asr.SPECIALS + ("|", "A", "B"))
  a, b_, sep, blank = 5, 6, 4, 0
  assert asr.ctc_collapse([a, a, blank, a, b_, b_, blank, blank]) == [a, a, b_]
  ids = np.asarray([
      [a, a, blank, a, sep, b_, b_, blank, a],  # "AA BA" — the trailing frame is padding
      [blank] * 9,  # all blank → empty hypothesis
      [sep, a, sep, sep, blank, sep, b_, blank, sep],  # separators collapse, ends stripped
  ])
  lengths = np.asarray([8, 9, 9])
  assert asr.greedy_decode(ids, lengths, vocab) == ["AA B", "", "A B"]


def test_wer_cer_against_known_pairs():
  # 1 substitution + 1 insertion over 3 words; chars: C→B (1) + " ON" inserted (3) over 11.
  r = asr.error_rates(["THE CAT SAT"], ["THE BAT SAT ON"])
  assert (r.word_errors, r.ref_words) == (2, 3) and r.wer == pytest.approx(2 / 3)
  assert (r.char_errors, r.ref_chars) == (4, 11) and r.cer == pytest.approx(4 / 11)
  # Corpus level: errors and lengths are summed, not rates averaged.
  r = asr.error_rates(["A B C D", "E F"], ["A B C D", ""])
  assert r.wer == pytest.approx(2 / 6) and r.cer == pytest.approx(3 / 10)
  assert r.utterances == 2
  assert asr.error_rates(["hello  world"], ["HELLO WORLD"]).wer == 0.0  # normalised
  with pytest.raises(ValueError):
    asr.error_rates([""], ["x"])


# ----------------------------------------------------------------------------- data side


def _manifest(tmp_path, rows):
  """A fairseq manifest + .wrd (lengths only: listing never decodes audio)."""
  tsv = tmp_path / "train.tsv"
  tsv.write_text(".\n" + "".join(f"a{i}.wav\t{n}\n" for i, (n, _) in enumerate(rows)))
  (tmp_path / "train.wrd").write_text("".join(f"{t}\n" for _, t in rows))
  return str(tsv)


def test_asr_examples_filters_and_counts(tmp_path):
  data = configs_ctc.ctc_data()
  data.manifest = _manifest(tmp_path, [
      (32000, "HELLO WORLD"),  # kept (99 frames)
      (32000, ""),  # no transcript
      (600000, "TOO LONG"),  # above the largest bucket (560000)
      (3200, "FAR TOO MANY LETTERS FOR NINE FRAMES"),  # 9 frames < 36 units
      (200, "X"),  # below the receptive field (source filter)
  ])
  kept, counts = ctc_data.asr_examples(data, "train")
  assert [e.transcript for e in kept] == ["HELLO WORLD"]
  assert counts == {"no_transcript": 1, "above_largest_bucket": 1,
                    "label_longer_than_frames": 1, "too_short": 1}
  lens = ctc_data.label_lengths(data, [kept])
  assert lens[32000] == 16 and lens[64000] == 8  # 12 units → 16; empty buckets → 8


def test_ctc_batch_fn_labels_and_masks():
  vocab = asr.Vocabulary.build(["AB BA"])
  fn = ctc_data.CtcBatchFn(vocab, ((32000, 16),), dim=128, mask_prob=0.65, mask_length=10,
                           min_masks=2, channel_prob=0.5, channel_length=16)
  valid = np.asarray([32000, 20000, 32000])
  batch = {"audio": np.zeros((3, 32000), np.float32),
           "padding_mask": np.arange(32000)[None] >= valid[:, None],
           "_valid_samples": valid, "_global_valid_samples": valid,
           "_transcripts": ["AB BA", "A", "BAB"]}
  out = fn(np.random.default_rng(0), batch)
  assert out["labels"].shape == (3, 16) and out["labels"].dtype == np.int32
  assert list(out["labels"][1, :3]) == [vocab.index["A"], 4, 0]
  assert list((~out["label_padding"]).sum(1)) == [6, 2, 4]
  m = out["mask"]  # 99 frames; row 1 has 61 valid
  assert m.shape == (3, 99) and not m[1, 61:].any()
  assert len(set(m.sum(1))) == 1 and m.sum() > 0  # require_same_masks
  cm = out["channel_mask"]
  assert cm.shape == (3, 128) and len(set(cm.sum(1))) == 1 and 0 < cm.sum(1)[0] < 128
  again = fn(np.random.default_rng(0), batch)
  np.testing.assert_array_equal(again["mask"], m)
  # Zero probabilities: evaluation batches carry labels but no masks.
  plain = ctc_data.CtcBatchFn(vocab, ((32000, 16),), dim=128)(np.random.default_rng(0), batch)
  assert not plain["mask"].any() and not plain["channel_mask"].any()


# ----------------------------------------------------------------------------- model + step


def _tiny_config(freeze: int = 2) -> ml_collections.ConfigDict:
  c = configs_ctc.ctc_config("base", "10m")
  configs_ctc.test_preset(c, total_steps=8)
  c.model.conv_channels = 16
  c.model.encoder.update(dict(num_layers=1, dim=32, ffn_dim=64, num_heads=2))
  c.finetune.freeze_updates = freeze
  c.finetune.layerdrop = 0.0
  c.data.normalize = True
  return finetune.resolve_config(c, pretrained=None, vocab=asr.Vocabulary.build(["ABC CAB BAD"]))


def _batch(vocab, rng, rows=2, samples=8000):
  audio = rng.standard_normal((rows, samples)).astype(np.float32)
  valid = np.asarray([samples, samples * 3 // 4])
  host = {"audio": audio, "padding_mask": np.arange(samples)[None] >= valid[:, None],
          "_valid_samples": valid, "_global_valid_samples": valid,
          "_transcripts": ["AB C", "CAB"]}
  fn = ctc_data.CtcBatchFn(vocab, ((samples, 8),), dim=32, mask_prob=0.65, mask_length=4,
                           min_masks=1, channel_prob=0.5, channel_length=8)
  return {k: v for k, v in fn(rng, host).items() if not k.startswith("_")}


def _leaves(tree, prefix):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat
          if jax.tree_util.keystr(p).startswith(prefix)}


def test_freeze_phase_is_bit_exact_then_encoder_trains():
  """``freeze_updates=2``: updates 1–2 change only the output Linear (the encoder, projection,
  mask embedding and CNN are bit-identical), update 3 moves the encoder; the CNN never moves.
  One compiled step serves both phases."""
  c = _tiny_config(freeze=2)
  obj = registry.get("objective", "ctc")(c)
  rng = np.random.default_rng(0)
  batch = _batch(obj.vocab, rng)
  lr_fn = lambda n: jnp.asarray(1e-2, jnp.float32)
  params_shape = jax.eval_shape(obj.init, jax.random.key(0), batch)
  tx = obj.make_optimizer(c.optim, lr_fn, params_shape)
  state = step_lib.init_state(obj, tx, jax.random.key(0), batch)
  step = jax.jit(step_lib.make_train_step(obj, tx, lr_fn, train.EmaSchedule(1.0, 1.0, 0), 0))
  p0 = jax.tree.map(np.asarray, state["params"])
  history = []
  for _ in range(3):
    state, m = step(state, batch)
    history.append((jax.tree.map(np.asarray, state["params"]), jax.device_get(m)))
  assert step._cache_size() == 1  # pylint: disable=protected-access
  (p1, m1), (p2, m2), (p3, m3) = history
  assert m1["frozen"] == 1.0 and m2["frozen"] == 1.0 and m3["frozen"] == 0.0
  for name in ("['frontend']", "['encoder']", "['mask_emb']"):
    for k, v in _leaves(p0, name).items():
      np.testing.assert_array_equal(_leaves(p2, name)[k], v, err_msg=k)
  for k, v in _leaves(p0, "['frontend']['cnn']").items():
    np.testing.assert_array_equal(_leaves(p3, "['frontend']['cnn']")[k], v, err_msg=k)
  assert not np.array_equal(p1["proj"]["kernel"], p0["proj"]["kernel"])
  assert not np.array_equal(p2["proj"]["kernel"], p1["proj"]["kernel"])
  moved = [k for k, v in _leaves(p2, "['encoder']").items()
           if not np.array_equal(_leaves(p3, "['encoder']")[k], v)]
  assert len(moved) > 10
  assert not np.array_equal(p3["frontend"]["projection"]["kernel"],
                            p2["frontend"]["projection"]["kernel"])
  assert np.isfinite(m3["loss"]) and m1["ctc_skipped"] == 0


def test_delayed_adam_starts_fresh_on_the_global_schedule():
  """The encoder partition's first active update is a fresh Adam step (bias-corrected) at the
  learning rate of the global step, as fairseq's Adam does for parameters without gradients
  until the freeze ends."""
  lr_fn = lambda n: 0.1 * (jnp.asarray(n, jnp.float32) + 1.0)
  cfg = configs_lib.optimizer(1.0, eps=1e-8, weight_decay=0.0)
  n = 3
  inner = ctc.delayed(optim.make_optimizer(cfg, lambda k: lr_fn(k + n), None), n)
  params = {"w": jnp.ones((2,))}
  state = inner.init(params)
  g = {"w": jnp.asarray([0.5, -2.0])}
  for _ in range(n):
    u, state = inner.update(g, state, params)
    np.testing.assert_array_equal(np.asarray(u["w"]), 0.0)
  u, state = inner.update(g, state, params)
  # Fresh Adam: m̂/√v̂ = sign(g) at the first step, scaled by lr(global step n).
  np.testing.assert_allclose(np.asarray(u["w"]), -float(lr_fn(n)) * np.sign(g["w"]), rtol=1e-6)
  assert int(state.count) == n


def test_noise_masks_replace_masked_frames():
  """``mask_kind='noise'`` (data2vec 2.0): no mask embedding; masked frames get fresh noise, so
  the logits differ between two dropout keys only through the masked frames' noise."""
  c = _tiny_config(freeze=0)
  c.finetune.mask_kind = "noise"
  c.finetune.activation_dropout = 0.0  # no dropout anywhere: only the mask noise is random
  obj = registry.get("objective", "ctc")(c)
  batch = _batch(obj.vocab, np.random.default_rng(1))
  params = jax.jit(obj.init)(jax.random.key(0), batch)
  assert "mask_emb" not in params and obj.pretrained_keys() == ("frontend", "context", "encoder")
  logits = jax.jit(lambda p, b, r: obj.logits(p, b, train=True, rng=r)[0])
  a, b = logits(params, batch, jax.random.key(1)), logits(params, batch, jax.random.key(2))
  assert not np.allclose(np.asarray(a), np.asarray(b))
  unmasked = {**batch, "mask": np.zeros_like(batch["mask"])}
  a, b = logits(params, unmasked, jax.random.key(1)), logits(params, unmasked, jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
