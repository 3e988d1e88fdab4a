"""ReFilled: teacher on classes A, student on classes B, stage 1 + stage 2 vs the student alone.

  python -m experiments.refilled --config=experiments/configs/refilled_digits.py \\
      --workdir=./workdir/refilled_digits
  python -m experiments.refilled --config=experiments/configs/refilled_cifar100.py \\
      --config.student.model=wrn_16_2 --workdir=./workdir/refilled_cifar100_wrn_16_2
  python -m experiments.refilled --config=experiments/configs/refilled_cub.py \\
      --config.student.options.width_multiplier=0.5 --workdir=./workdir/refilled_cub_050

Prints test accuracy (mean ± std over `config.seeds`) per class setting and writes
`<workdir>/results.json` (summary and every run) and each run's own results.json, metrics,
TensorBoard events and Orbax checkpoints under `<workdir>/<setting>/seed_<seed>/`. Restarted
with the same workdir it resumes. The pipeline is `experiments/refilled_pipeline.py`; see
docs/refilled.md. Errors are one line (`error: ...`); `--verbose` adds the traceback.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import _cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "refilled_digits.py")

if __name__ == "__main__":  # a missing --config file or unknown key: one line, before absl
  _cli.precheck(_DEFAULT_CONFIG)
_WORKDIR = flags.DEFINE_string("workdir", "./workdir/refilled", "Where metrics, checkpoints "
                               "and results.json are written (and resumed from).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Start afresh in a --workdir that holds a "
                                "run of another configuration (its contents are deleted).")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "A ReFilled config "
                                          "(experiments/configs/refilled_*.py).",
                                          lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  from experiments import refilled_pipeline  # pylint: disable=g-import-not-at-top
  refilled_pipeline.run(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)
  return 0


if __name__ == "__main__":
  _cli.run(main, _DEFAULT_CONFIG)
