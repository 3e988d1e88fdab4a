"""ReFilled on CIFAR-100: WRN-40-2 teacher, WRN students, the official code's recipe.

Official code `njulus/REFILLED` (docs/refilled.md): teacher WRN-40-2 (CE, SGD Nesterov 0.1,
momentum 0.9, weight decay 5e-4, x0.2 at epochs 100/140/180, 200 epochs, batch 128); students
WRN-(16,2), (40,1), (16,1) (and (40,2)) with dropout 0.3; stage 1 relationship matching (margin
0.2, tau_1 = 4, official 1000 x KLDiv scaling) 200 epochs with cosine 0.1 -> 0.01, NCM every 10
epochs; stage 2 CE + 100 x the embedding-induced classifier (tau_2 = 2, global centres) 200 epochs
with x0.2 at 100/140/180. Crop 32 / pad 4 + flip, CIFAR-100 mean/std. Model selection never looks
at the test split: 5,000 training images (`val_fraction` 0.1) are held out for the stage-1 NCM
selection and the reported validation accuracy.

Pick the student after a colon (default wrn_16_2); the README table's setting is "full" (both on
all 100 classes); "same" / "overlap" / "disjoint" are the 50/50 class splits of
`kd_jax.data.class_splits.cifar100_settings()`:

  python -m experiments.refilled --config=experiments/configs/refilled_cifar100.py:wrn_16_1 \\
      --workdir=./workdir/refilled_c100_wrn_16_1
  python -m experiments.refilled --config=experiments/configs/refilled_cifar100.py:wrn_40_1 \\
      --config.settings='("disjoint","overlap")' --workdir=./workdir/refilled_c100_cross

Needs CIFAR-100 from TFDS (downloaded and prepared on first use, or `--config.data_dir`).
"""

import ml_collections

STUDENTS = ("wrn_40_2", "wrn_16_2", "wrn_40_1", "wrn_16_1")


def get_config(student: str | None = None) -> ml_collections.ConfigDict:
  student = student or "wrn_16_2"
  if student not in STUDENTS:
    raise ValueError(f"unknown ReFilled CIFAR-100 student {student!r}; choose from {STUDENTS}.")
  c = ml_collections.ConfigDict()
  c.dataset = "cifar100"
  c.data_dir = ""
  c.train_split = "train"
  c.test_split = "test"
  c.val_fraction = 0.1             # held out of train for selection (never the test split)
  c.class_settings = "cifar100"
  c.settings = ("full",)
  c.seed = 960402                  # the official code's seed
  c.seeds = (960402,)
  c.batch_size = 128
  c.eval_batch_size = 256
  c.num_devices = 0
  c.parallel = "shard_map"
  c.distributed = False
  c.coordinator_address = ""   # off Cloud TPU / SLURM / Open MPI: "host:port" of process 0,
  c.num_processes = -1         # the number of processes and this one's id
  c.process_id = -1            # (-1: found by jax.distributed)
  c.sync_batch_norm = False    # True: BN statistics over the global batch (default: per device)
  c.checkpoint_every = 2000
  c.log_every = 100
  c.progress = True

  def sgd_step(cfg, epochs=200):
    cfg.num_epochs = epochs
    cfg.num_steps = 0
    cfg.learning_rate = 0.1
    cfg.momentum = 0.9
    cfg.weight_decay = 5e-4
    cfg.nesterov = True
    cfg.schedule = "step"
    cfg.decay_epochs = (100, 140, 180)
    cfg.decay_rate = 0.2

  c.teacher = ml_collections.ConfigDict()
  c.teacher.model = "wrn_40_2"
  c.teacher.options = {"dropout_rate": 0.3}
  c.teacher.dtype = "float32"        # compute dtype: "bfloat16" for mixed precision
  c.teacher.param_dtype = "float32"  # parameters and optimizer state (float32 only)
  c.teacher.checkpoint = ""        # e.g. "/ckpt/wrn_40_2_{setting}" ({setting}, {seed} allowed)
  sgd_step(c.teacher)

  c.student = ml_collections.ConfigDict()
  c.student.model = student
  c.student.options = {"dropout_rate": 0.3}
  c.student.dtype = "float32"        # compute dtype: "bfloat16" for mixed precision
  c.student.param_dtype = "float32"  # parameters and optimizer state (float32 only)

  c.stage1 = ml_collections.ConfigDict()
  c.stage1.loss = "refilled_relationship:1"
  c.stage1.loss_options = {"refilled_relationship": {"margin": 0.2, "temperature": 4.0,
                                                     "tuples": False, "mode": "official",
                                                     "all_gather": True}}
  sgd_step(c.stage1)
  c.stage1.schedule = "cosine"
  c.stage1.final_lr_factor = 0.1
  c.stage1.eval_every_epochs = 10

  c.stage2 = ml_collections.ConfigDict()
  # One student per lambda from the same stage-1 model, lambda chosen on validation; 0 is the
  # control (CE from the stage-1 start) and 100 the official value.
  c.stage2.lambdas = (0.0, 1.0, 10.0, 100.0)
  c.stage2.loss_options = {"refilled_classifier": {"temperature": 2.0, "centers": "global"}}
  sgd_step(c.stage2)
  return c
