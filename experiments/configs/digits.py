"""Offline digits: distil a digits CNN (width 16) into a 4-wide one with CE, KD, PTLoss and SP.

Runs on a fresh machine with no download (scikit-learn's 8x8 digits) in a few minutes on two CPU
cores:

  python -m experiments.main --config=experiments/configs/digits.py --workdir=./workdir/digits
  python -m experiments.main --config=experiments/configs/digits.py --config.student.num_steps=50 \
      --workdir=./workdir/digits_50

The other configs start from this one (experiments/configs/mnist1d.py, the main job's default).

The same student (architecture, seed, data order) is trained once per entry of `methods`; the
loss weights follow RepDistiller's CIFAR-100 recipe (KD: CE 0.1 + KD 0.9 at T = 4; SP: CE 1 +
3000 x SP on the last feature map before pooling).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The full-label table; `digits.py:few` 10 labelled images per class (the teacher on the whole
  training split), `digits.py:few_transfer` the same with the other training images unlabelled
  for the distillation terms (a transfer set)."""
  c = ml_collections.ConfigDict()
  c.dataset = "digits"
  c.seed = 0                   # data order; the students' seeds start here
  c.seeds = 1                  # students per method (seed, seed + 1, ...), trained at once
  c.batch_size = 64            # global batch, split over the devices
  c.eval_batch_size = 256
  c.num_devices = 0            # 0: every visible device
  c.parallel = "shard_map"     # or "pmap", or "none" (one device, no mapping)
  c.distributed = False        # call jax.distributed.initialize() first (multi-host)
  c.coordinator_address = ""   # off Cloud TPU / SLURM / Open MPI: "host:port" of process 0,
  c.num_processes = -1         # the number of processes and this one's id
  c.process_id = -1            # (-1: found by jax.distributed)
  c.sync_batch_norm = False    # True: BN statistics over the global batch (default: per device)
  c.checkpoint_every = 200     # steps; a checkpoint is also written at the end of each run
  c.log_every = 25
  c.eval_every_epochs = 5      # validation accuracy during training (0: only at the end)
  c.progress = True
  # Distillation diagnostics of every student against the teacher, at every evaluation and on
  # the test split (kd_jax.train.evaluate.evaluate_distillation): top-1 agreement, KL at T = 1,
  # ECE of both, linear CKA between these two feature maps ("" for either: no CKA).
  c.diagnostics = ml_collections.ConfigDict({"student_feature": "pre_pool",
                                             "teacher_feature": "pre_pool", "num_bins": 15})

  c.teacher = ml_collections.ConfigDict()
  c.teacher.model = "cnn_digits"
  c.teacher.options = {"width": 16}
  c.teacher.dtype = "float32"        # compute dtype: "bfloat16" for mixed precision
  c.teacher.param_dtype = "float32"  # parameters and optimizer state (float32 only)
  c.teacher.num_classes = 0    # 0: the dataset's
  c.teacher.checkpoint = ""    # "": <workdir>/teacher/checkpoint, trained there if absent
  c.teacher.num_epochs = 30
  c.teacher.num_steps = 0      # > 0 overrides num_epochs
  c.teacher.learning_rate = 0.05
  c.teacher.momentum = 0.9
  c.teacher.weight_decay = 5e-4
  c.teacher.decay_epochs = (20, 25)
  c.teacher.decay_rate = 0.1

  c.student = ml_collections.ConfigDict()
  c.student.model = "cnn_digits"
  c.student.options = {"width": 4}
  c.student.dtype = "float32"        # compute dtype: "bfloat16" for mixed precision
  c.student.param_dtype = "float32"  # parameters and optimizer state (float32 only)
  c.student.num_classes = 0
  c.student.num_epochs = 30
  c.student.num_steps = 0
  c.student.learning_rate = 0.05
  c.student.momentum = 0.9
  c.student.weight_decay = 5e-4
  c.student.decay_epochs = (20, 25)
  c.student.decay_rate = 0.1

  # Method name -> loss spec "term:weight(option=value,...),..." (kd_jax.train.terms).
  c.methods = ml_collections.ConfigDict({
      "student": "ce:1",
      "kd": "ce:0.1,kd:0.9",
      "ptloss": "ce:0.1,ptloss:0.9",
      "sp": "ce:1,sp:3000",
  })
  c.method_order = ("student", "kd", "ptloss", "sp")  # table order (others follow, sorted)
  c.baseline = "student"       # paired differences (per seed) are taken against this method
  c.compare = ()               # further (method, method) paired comparisons
  # {reported name: candidate methods}: the candidate with the best mean validation accuracy.
  c.select_on_val = ml_collections.ConfigDict()
  # Per-term options, merged into every method that uses the term.
  c.loss_options = ml_collections.ConfigDict({
      "kd": {"temperature": 4.0},
      "ptloss": {"temperature": 1.0},  # PTLoss has no T^2 factor; T = 1 keeps its scale
      "sp": {"feature": "pre_pool", "all_gather": False},
  })
  # PTLoss coefficients: selected on the validation split (kd_jax.ptloss.select_coefficients),
  # or the fixed `epsilon` when select is False.
  c.ptloss = ml_collections.ConfigDict()
  c.ptloss.select = True
  c.ptloss.order = 5
  c.ptloss.num_candidates = 64
  c.ptloss.scale = 1.0
  # The closeness score of the selection (kd_jax.ptloss.closeness): "l2" (the paper's),
  # "sq_l2" (Brier) or "ce" (log score), both proper, or "tvd".
  c.ptloss.distance = "l2"
  c.ptloss.epsilon = (0.0,)
  if arg in ("few", "few_transfer"):
    _few_labels(c, transfer=arg == "few_transfer")
  elif arg:
    raise ValueError(f"unknown digits config argument {arg!r}; expected '', 'few' or "
                     "'few_transfer'.")
  return c


def _few_labels(c: ml_collections.ConfigDict, *, transfer: bool) -> None:
  """10 labelled images per class for the students, 5 seeds, KD / PTLoss at the same T and SP's
  weight chosen on validation (as the MNIST-1D table)."""
  c.data = ml_collections.ConfigDict({"labels_per_class": 10, "subset_seed": 0,
                                      "transfer_rest": transfer, "transfer_batch_size": 100})
  c.seeds = 5
  c.batch_size = 50
  c.num_devices = 1            # small models: one device is the fastest on a CPU host
  c.checkpoint_every = 0
  c.log_every = 100
  c.progress = False
  c.eval_every_epochs = 50     # 2 labelled batches per epoch: every 100 steps
  c.student.num_steps = 600
  c.student.decay_epochs = (200, 250)  # epochs of the 100-image labelled set
  seed_table_methods(c)


def seed_table_methods(c: ml_collections.ConfigDict) -> None:
  """The multi-seed table's methods (also MNIST-1D's): the student alone; KD at T = 4; PTLoss at
  the same T with weight 0.9 T^2 = 14.4, so that epsilon = 0 is the KD row, its coefficients
  selected with the squared L2 (Brier) score; SP on the penultimate features with its weight
  chosen on validation from 300 / 3000 / 30000; PTLoss compared with KD in pairs."""
  c.methods = ml_collections.ConfigDict({
      "student": "ce:1",
      "kd": "ce:0.1,kd:0.9",
      "ptloss": "ce:0.1,ptloss:14.4",
      "sp_300": "ce:1,sp:300",
      "sp_3000": "ce:1,sp:3000",
      "sp_30000": "ce:1,sp:30000",
  })
  c.method_order = ("student", "kd", "ptloss", "sp_300", "sp_3000", "sp_30000")
  c.select_on_val = ml_collections.ConfigDict({"sp": ("sp_300", "sp_3000", "sp_30000")})
  c.compare = (("ptloss", "kd"),)  # PTLoss against KD at the same T (epsilon = 0 is KD)
  c.ptloss.distance = "sq_l2"  # a proper score (docs/ptloss.md: the paper's l2 rewards sharpening)
  c.loss_options = ml_collections.ConfigDict({
      "kd": {"temperature": 4.0},
      "ptloss": {"temperature": 4.0},
      "sp": {"feature": "pre_pool", "all_gather": False},
  })
