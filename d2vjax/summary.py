r"""Parameter table of a config's model: ``python -m d2vjax.summary --config=configs/speech_base.py``.

Shapes come from ``jax.eval_shape`` (nothing is allocated); the last line is ``total_params: N``.
"""

from __future__ import annotations

from absl import app
import jax
from ml_collections import config_flags

from d2vjax import metrics, registry

def summarize(config) -> str:
  """The parameter table (one row per top-level module) as text, ending in ``total_params: N``."""
  objective = registry.get("objective", config.objective)(config)
  dummy = objective.modality.dummy_batch(config.data)
  params = jax.eval_shape(objective.init, jax.random.key(0), dummy)
  rows, total = metrics.parameter_table(params)
  return metrics.format_parameter_table(rows, total)


def _cli() -> None:
  """Command line; flags are defined here so importing this module defines none."""
  config = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                           lock_config=True)

  def main(argv):
    del argv
    print(summarize(config.value))

  app.run(main)


if __name__ == "__main__":
  _cli()
