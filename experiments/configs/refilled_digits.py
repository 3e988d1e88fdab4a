"""ReFilled offline on digits: teacher on digits 0-4 / 3-7 / 5-9, student always on 5-9.

Runs with no download (scikit-learn's 8x8 digits) in a few minutes on two CPU cores:

  python -m experiments.refilled --config=experiments/configs/refilled_digits.py \\
      --workdir=./workdir/refilled_digits

For every setting ("disjoint": teacher 0-4, the cross-task case; "overlap": teacher 3-7, sharing
5, 6, 7; "same": teacher 5-9, standard KD) and every seed: a width-16 `cnn_digits` teacher is
trained on its classes, then a width-4 student on 5-9 by ReFilled (stage 1 relationship
matching, NCM selection on the validation split; stage 2 CE + 100 x the embedding-induced
classifier with global centres) and alone (CE, same initialisation and data order). The
optimizers follow the official code (SGD Nesterov 0.1, momentum 0.9, weight decay 5e-4; stage 1
cosine to 0.01; stage 2 and teacher x0.2 at 50%, 70%, 90% of training), shortened to digits.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`refilled_digits.py:few`: the student has 10 labelled images per class (the teacher all of
  its classes' training images), 600 steps per stage."""
  c = ml_collections.ConfigDict()
  c.dataset = "digits"
  c.class_settings = "digits"     # kd_jax.data.class_splits.digits_settings()
  c.settings = ("disjoint", "overlap", "same")
  c.seed = 0
  c.seeds = (0, 1, 2, 3, 4)
  c.batch_size = 64
  c.eval_batch_size = 256
  c.num_devices = 0                # 0: every visible device
  c.parallel = "shard_map"         # or "pmap", or "none"
  c.distributed = False
  c.coordinator_address = ""   # off Cloud TPU / SLURM / Open MPI: "host:port" of process 0,
  c.num_processes = -1         # the number of processes and this one's id
  c.process_id = -1            # (-1: found by jax.distributed)
  c.sync_batch_norm = False    # True: BN statistics over the global batch (default: per device)
  c.checkpoint_every = 0           # only at the end of each run
  c.log_every = 50
  c.progress = False

  c.teacher = ml_collections.ConfigDict()
  c.teacher.model = "cnn_digits"
  c.teacher.options = {"width": 16}
  c.teacher.dtype = "float32"        # compute dtype: "bfloat16" for mixed precision
  c.teacher.param_dtype = "float32"  # parameters and optimizer state (float32 only)
  c.teacher.checkpoint = ""        # "": <run>/teacher/checkpoint ({setting}, {seed} allowed)
  c.teacher.num_epochs = 20
  c.teacher.num_steps = 0
  c.teacher.learning_rate = 0.1
  c.teacher.schedule = "step"
  c.teacher.decay_epochs = (10, 14, 18)
  c.teacher.decay_rate = 0.2

  c.student = ml_collections.ConfigDict()
  c.student.model = "cnn_digits"
  c.student.options = {"width": 4}
  c.student.dtype = "float32"        # compute dtype: "bfloat16" for mixed precision
  c.student.param_dtype = "float32"  # parameters and optimizer state (float32 only)

  # Stage 1: relationship matching (official: 1000 x KLDiv batchmean = 500 x mean binary KL).
  c.stage1 = ml_collections.ConfigDict()
  c.stage1.loss = "refilled_relationship:1"
  c.stage1.loss_options = {"refilled_relationship": {"margin": 0.2, "temperature": 4.0,
                                                     "tuples": False, "mode": "official",
                                                     "all_gather": True}}
  c.stage1.num_epochs = 20
  c.stage1.num_steps = 0
  c.stage1.learning_rate = 0.1
  c.stage1.schedule = "cosine"
  c.stage1.final_lr_factor = 0.1
  c.stage1.eval_every_epochs = 2   # NCM accuracy on the validation split; best one kept

  # Stage 2: CE + lambda * embedding-induced classifier, from the selected stage-1 model.
  c.stage2 = ml_collections.ConfigDict()
  # One student per lambda, all from the same stage-1 model; lambda is chosen on validation
  # accuracy and 0 is the control (CE only from the stage-1 start). 100 is the official value.
  c.stage2.lambdas = (0.0, 1.0, 10.0, 100.0)
  c.stage2.loss_options = {"refilled_classifier": {"temperature": 2.0, "centers": "global"}}
  c.stage2.num_epochs = 20
  c.stage2.num_steps = 0
  c.stage2.learning_rate = 0.1
  c.stage2.schedule = "step"
  c.stage2.decay_epochs = (10, 14, 18)
  c.stage2.decay_rate = 0.2
  c.student_labels_per_class = 0  # > 0: a class-balanced subset of the student's training split
  if arg == "few":
    c.student_labels_per_class = 10
    c.batch_size = 50             # the student's whole labelled set in one batch
    for stage in (c.stage1, c.stage2):
      stage.num_steps = 600
    c.stage1.eval_every_steps = 50
    c.stage2.decay_epochs = (300, 420, 540)  # one batch per epoch: steps
  elif arg:
    raise ValueError(f"unknown refilled_digits argument {arg!r}; expected '' or 'few'.")
  return c
