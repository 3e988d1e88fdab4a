"""HetComp on MovieLens: six teachers, sparse knowledge, distillation, one results table.

  python -m experiments.hetcomp --config=experiments/configs/hetcomp.py \\
      --config.data_dir=../shared/data/ml-100k --config.out=results/hetcomp

`data_dir` (required) is a directory or file with GroupLens ratings (`u.data`, `ratings.csv` or
`ratings.dat`); it is read in place, never copied. The distillation schedule is counted in
optimizer steps: DKC every 600 steps, evaluation every 600, patience 3000 steps after the
final phase has started (the official loop's 10 epochs, 10 epochs and 5 evaluations at ~60
steps per ML-100k epoch), no step cap unless `max_steps` is set (a run that reaches it is marked
"[capped]"). Batches follow our CPU budget (every user once per epoch in batches of 256, lr
1e-2; docs/hetcomp.md); `official_batching=True` restores the official code's 1024-interaction
batches at lr 1e-3. `--workdir` (a flag of `experiments.hetcomp`, not a config field) is where
the teacher trajectories are saved; by default a temporary directory. A run restarted in the
same `--workdir` reuses its finished teachers and distillations (experiments/hetcomp.py).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data_dir = ""                  # required: GroupLens ratings, e.g. ../shared/data/ml-100k
  c.out = ""                       # directory for results.json ("": not written)
  c.seeds = 5                      # number of seeds (0..n-1)
  c.seed_list = ""                 # comma-separated seeds instead of 0..n-1, e.g. "1" or "1,2"
  c.merge = ""                     # comma-separated results.json files: print (and write) their
  #                                  merged table instead of running
  c.merge_replace = False          # with merge: a later file's different record for a method
  #                                  and seed replaces the earlier one (printed); else refused
  c.quick = False                  # smoke run: 1 seed, short teacher training and distillation
  # Distillation schedule in optimizer steps; None keeps the run's own value (600 / 600 / 3000
  # and no cap; 20 / 20 / 40 and a 200-step cap with quick).
  c.period_steps = config_dict.placeholder(int)      # DKC period p
  c.eval_every_steps = config_dict.placeholder(int)  # validation Recall@50 every this many steps
  c.patience_steps = config_dict.placeholder(int)    # stop after this many steps without a
  #                                                    better validation point
  c.max_steps = config_dict.placeholder(int)         # safety cap (runs that reach it: capped)
  c.trajectory = "validation"      # teacher checkpoints: 'validation' (quality ladder) | 'epochs'
  c.quality_fractions = "0.8,0.9,0.95"  # v = 0, 1, 2 reach these fractions of the best
  #                                       validation Recall@50; v = 3 is the best epoch
  c.rrd_lambda = 1.0               # RRD baseline: weight of the RRD term next to BPR (chosen on
  #                                  validation, docs/hetcomp.md)
  c.rrd_k = 40                     # RRD: interesting items (the ensemble's top rrd_k)
  c.rrd_l = 40                     # RRD: uninteresting items sampled per user and step
  c.student_dim = 6                # embedding size of the MF student (teachers: 64 / 200)
  c.methods = ""                   # comma-separated subset of the distilled rows to run:
  #                                  ablation, rrd, hetcomp, rerank, weight ("": all of them)
  c.debias = True                  # also run our two dissensus debiasing variants of HetComp
  c.split_seed = 0                 # seed of the 60/20/20 split (fixed; the seeds vary the models)
  c.official_batching = False      # official 1024-interaction batches at lr 1e-3 (slow on CPU)
  return c
