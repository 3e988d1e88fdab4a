"""The main job: train (or restore) a teacher, distil it into a student with each method.

  python -m experiments.main                                    # offline MNIST-1D, 5 seeds
  python -m experiments.main --config=experiments/configs/digits.py --workdir=/tmp/kd
  python -m experiments.main --config=experiments/configs/cifar100.py:resnet32x4-resnet8x4 \\
      --config.methods.kd="ce:0.1,kd:0.9"

Prints a table of test accuracy per method (mean +- std over seeds, and the paired difference
from the student alone with its 95 % interval) next to the teacher's and writes metrics
(metrics.jsonl, TensorBoard events), Orbax checkpoints and results.json to --workdir. Restarted
with the same --workdir it resumes every run from its last checkpoint; a workdir is locked while
a run uses it and refuses a run of another configuration unless --overwrite is given. The runner is
`experiments/runner.py`; see docs/training.md. Errors are one line (`error: ...`, exit status
1); `--verbose` adds the traceback.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import _cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "mnist1d.py")

if __name__ == "__main__":  # a missing --config file or unknown key: one line, before absl
  _cli.precheck(_DEFAULT_CONFIG)
_WORKDIR = flags.DEFINE_string("workdir", "./workdir", "Where metrics, checkpoints and "
                               "results.json are written (and resumed from).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Start afresh in a --workdir that holds a "
                                "run of another configuration (its contents are deleted).")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "An ml_collections config "
                                          "file (experiments/configs/*.py).", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  from experiments import runner  # pylint: disable=g-import-not-at-top
  runner.run(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)
  return 0


if __name__ == "__main__":
  _cli.run(main, _DEFAULT_CONFIG)
