"""Parity of converted Hugging Face models of the default (Base, 12 layers × 768) configs: every
layer of the d2vjax model equals the PyTorch forward on the batch ``parity.compare`` builds
(issue #9; the small configs are in test_convert_speech.py and test_convert_vision_text.py).

The batch has one unpadded and one padded row for audio and text (HF attention mask; data2vec
audio's padded row against HF on the row alone, docs/interop.md) and two 224 px images for
vision, which has no padding. The Wav2Vec2 Large layout (24 × 1024, pre-LN) is checked by
``python -m d2vjax.convert.parity --random=wav2vec2-large`` only: about a minute on 2 cores, and
its layout is covered at small size by test_convert_speech.py.
"""

import pytest

from _convert_util import TOL, torch_or_skip
from d2vjax.convert import parity

torch_or_skip()

_W2V2_HEADS = {"final_proj/bias", "final_proj/kernel", "project_q/bias", "project_q/kernel",
               "quantizer/vars", "quantizer/weight_proj/bias", "quantizer/weight_proj/kernel"}
_REGRESSION_HEAD = {"head/proj/bias", "head/proj/kernel"}
_TEXT_HEAD = {f"head/{m}/{p}" for m in ("fc1", "fc2") for p in ("bias", "kernel")}
# family → (padded rows in the batch, d2vjax params the HF base model lacks: fresh init).
FAMILIES = {
    "wav2vec2": (1, _W2V2_HEADS),
    "data2vec-audio": (1, _REGRESSION_HEAD),
    "data2vec-vision": (0, _REGRESSION_HEAD),
    "data2vec-text": (1, _TEXT_HEAD),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_base_config_every_layer_matches(family):
  padded, fresh = FAMILIES[family]
  res = parity.check(parity.random_model(family))
  assert res["layers"] == 12 and len(res["per_layer"]) == 13
  assert (res["rows"], res["padded_rows"]) == (2, padded)
  assert set(res["initialised"]) == fresh
  assert res["max_rel_err"] <= TOL, res["per_layer"]
