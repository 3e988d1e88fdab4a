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


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dataset = "digits"
  c.seed = 0                   # data order; the students' seeds start here
  c.seeds = 1                  # students per method (seed, seed + 1, ...), trained at once
  c.batch_size = 64            # global batch, split over the devices
  c.eval_batch_size = 256
  c.num_devices = 0            # 0: every visible device
  c.parallel = "shard_map"     # or "pmap", or "none" (one device, no mapping)
  c.distributed = False        # call jax.distributed.initialize() first (multi-host)
  c.checkpoint_every = 200     # steps; a checkpoint is also written at the end of each run
  c.log_every = 25
  c.eval_every_epochs = 5      # validation accuracy during training (0: only at the end)
  c.progress = True

  c.teacher = ml_collections.ConfigDict()
  c.teacher.model = "cnn_digits"
  c.teacher.options = {"width": 16}
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
  return c
