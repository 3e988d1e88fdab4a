"""HetComp on MovieLens: six teachers, sparse knowledge, distillation, one results table.

  python -m experiments.hetcomp --config=experiments/configs/hetcomp.py \\
      --config.data_dir=../shared/data/ml-100k --config.out=results/hetcomp

`data_dir` (required) is a directory or file with GroupLens ratings (`u.data`, `ratings.csv` or
`ratings.dat`); it is read in place, never copied. Distillation uses our CPU budget (every user
once per epoch in batches of 256, lr 1e-2, DKC and evaluation every 5 epochs; docs/hetcomp.md);
`official_batching=True` restores the official code's 1024-interaction batches at lr 1e-3.
`--workdir` (a flag of `experiments.hetcomp`, not a config field) is where the teacher
trajectories are saved; by default a temporary directory.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data_dir = ""                  # required: GroupLens ratings, e.g. ../shared/data/ml-100k
  c.out = ""                       # directory for results.json ("": not written)
  c.seeds = 3                      # number of seeds (0..n-1)
  c.seed_list = ""                 # comma-separated seeds instead of 0..n-1, e.g. "1" or "1,2"
  c.merge = ""                     # comma-separated results.json files: print (and write) their
  #                                  merged table instead of running
  c.quick = False                  # smoke run: 1 seed, short teacher training and distillation
  # None keeps the run's own value: 300 epochs / p = 5 (CPU budget), 20 / 2 with quick, the
  # official 1000 / 10 with official_batching.
  c.max_epochs = config_dict.placeholder(int)  # distillation epoch cap
  c.period = config_dict.placeholder(int)      # DKC period p
  c.split_seed = 0                 # seed of the 60/20/20 split (fixed; the seeds vary the models)
  c.official_batching = False      # official 1024-interaction batches at lr 1e-3 (slow on CPU)
  return c
