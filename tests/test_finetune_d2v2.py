"""Fine-tuning from data2vec 2.0: the fine-tuning models (CTC, classification) rebuild the
pre-trained encoder exactly — local encoder, context encoder (relative positions, ALiBi, extra
tokens, LayerNorm) and trunk — so that, without masks, they compute the features the pre-training
model computes from the same params (fairseq-spec §6.1–6.4, §9.1)."""

import jax
import ml_collections
import numpy as np

from d2vjax import asr, configs_cls, configs_ctc, configs_d2v2, finetune, registry


def _pretrained(builder, preset):
  c = builder("base")
  preset(c)
  obj = registry.get("objective", "data2vec2")(c)
  params = jax.jit(obj.init)(jax.random.key(0), obj.modality.dummy_batch(c.data))
  # ALiBi scales away from their init so a missing or re-initialised context would show.
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: a * 0.5 + 0.1 if "alibi_scale" in jax.tree_util.keystr(p) else a, params)
  return c, obj, params


def _finetune_objective(ft_config, pre_config, obj_name, dummy):
  c = ml_collections.ConfigDict(ft_config.to_dict())
  c.model = ml_collections.ConfigDict(pre_config.model.to_dict())
  c.finetune.pretrained_objective = "data2vec2"
  # Dropout, LayerDrop etc. do not act in eval mode; the fine-tuning overrides stay.
  obj = registry.get("objective", obj_name)(c)
  params = jax.jit(obj.init)(jax.random.key(1), dummy)
  return obj, params


def test_ctc_from_data2vec2_keeps_context_encoder():
  pc, pobj, pparams = _pretrained(configs_d2v2.speech, configs_d2v2.speech_test_preset)
  assert {"frontend", "context", "encoder", "decoder"} <= set(pparams)
  ft = configs_ctc.ctc_config("base", "10m")
  configs_ctc.test_preset(ft)
  ft.vocab = list(asr.Vocabulary.build(["AB C"]).tokens)
  ft.data.normalize = True
  ft.masking.min_masks = 1
  ft.finetune.mask_kind = "noise"
  rng = np.random.default_rng(0)
  audio = rng.standard_normal((2, 40000)).astype(np.float32)
  pad = np.zeros((2, 40000), bool)
  pad[1, 30000:] = True
  obj, params = _finetune_objective(ft, pc, "ctc", {"audio": audio, "padding_mask": pad})
  loaded = finetune.pretrained_subtrees(obj, params, jax.tree.map(np.asarray, pparams))
  assert sorted(loaded) == ["context", "encoder", "frontend"]
  params = {**params, **loaded}
  inputs = {"audio": audio, "padding_mask": pad}
  want, want_layers, want_pad = jax.jit(pobj.encode)(pparams, inputs)
  encode = jax.jit(obj.encode)
  got, got_layers, got_pad = encode(params, inputs)
  np.testing.assert_array_equal(got_pad, want_pad)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got_layers, want_layers, atol=1e-5, rtol=1e-5)
  # Without the context encoder (the pre-fix behaviour) the features differ by far more.
  no_ctx = {**params, "context": jax.tree.map(lambda a: a * 0, params["context"])}
  assert float(np.max(np.abs(encode(no_ctx, inputs)[0] - want))) > 1e-2


def test_image_classifier_from_data2vec2_keeps_cls_token():
  pc, pobj, pparams = _pretrained(configs_d2v2.vision, configs_d2v2.vision_test_preset)
  assert "extra_tokens" in pparams["context"]
  ft = configs_cls.vision_cls("base")
  configs_cls.vision_test_preset(ft)
  ft.num_classes = 3
  images = np.random.default_rng(0).standard_normal(
      (2,) + pobj.modality.dummy_batch(pc.data)["image"].shape[1:]).astype(np.float32)
  obj, params = _finetune_objective(ft, pc, "image_classification", {"image": images})
  params = {**params, **finetune.pretrained_subtrees(obj, params,
                                                     jax.tree.map(np.asarray, pparams))}
  want, _, _ = jax.jit(pobj.encode)(pparams, {"image": images})
  got, _, pad = jax.jit(obj.encode)(params, {"image": images})
  assert pad.shape == got.shape[:2] and not np.any(pad)  # the CLS row is never padding
  # The classifier sees [CLS, patches] (its mean-pool head skips the first token); data2vec 2.0's
  # own encode strips the extra token.
  assert got.shape[1] == want.shape[1] + 1
  np.testing.assert_allclose(got[:, 1:], want, atol=1e-5, rtol=1e-5)
  logits = jax.jit(obj.outputs)(params, {"image": images})
  assert logits.shape == (2, 3) and np.all(np.isfinite(logits))
