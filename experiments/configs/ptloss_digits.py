"""PTLoss on digits: a miscalibrated teacher distilled with KD, tuned KD, smoothing and PTLoss.

  python -m experiments.ptloss_digits --out=results.json
  python -m experiments.ptloss_digits --config.student.num_epochs=10 --config.num_seeds=2

The teacher (a wide MLP) is trained far past convergence, without any regularisation, on half of
the digits training split with 40% of its labels replaced by random ones: it memorises the noise
and is over-confident on unseen digits. The student sees only the teacher's soft labels on the
other half (the unlabelled distillation set; no ground-truth cross-entropy, the paper's alpha=0
setting). The validation split chooses KD's temperature, the smoothing weight and PTLoss's
coefficients (the last one without training any student). See docs/ptloss.md.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data_seed = 0              # the train/val/test split of load_digits
  c.num_seeds = 5              # student seeds per method
  c.progress = True

  c.teacher = ml_collections.ConfigDict()
  c.teacher.model = "mlp_digits"
  c.teacher.options = {"hidden": (256, 256)}
  c.teacher.dtype = "float32"        # compute dtype: "bfloat16" for mixed precision
  c.teacher.param_dtype = "float32"  # parameters and optimizer state (float32 only)
  c.teacher.noise_rate = 0.4   # fraction of the teacher's labels replaced by uniform ones
  c.teacher.num_steps = 3000   # full-batch Adam steps, no weight decay: memorises the noise
  c.teacher.learning_rate = 3e-3
  c.teacher.seed = 0

  c.student = ml_collections.ConfigDict()
  c.student.model = "mlp_digits"
  c.student.options = {"hidden": (64, 32)}
  c.student.dtype = "float32"        # compute dtype: "bfloat16" for mixed precision
  c.student.param_dtype = "float32"  # parameters and optimizer state (float32 only)
  c.student.num_epochs = 60    # over the distillation set
  c.student.batch_size = 64
  c.student.learning_rate = 3e-3

  c.kd_temperatures = (1.0, 2.0, 4.0, 8.0)       # the grid of temperature-tuned KD
  c.smoothing_weights = (0.1, 0.2, 0.4, 0.6)     # label smoothing of the teacher's soft labels

  c.ptloss = ml_collections.ConfigDict()
  c.ptloss.order = 5
  c.ptloss.num_candidates = 1000
  c.ptloss.scale = 1.0
  c.ptloss.distance = "l2"
  c.ptloss.per_class_row = True   # also select and train per-class [K, M] coefficients
  c.ptloss.seed = 0

  c.correlation = ml_collections.ConfigDict()
  c.correlation.num_candidates = 32   # valid candidates spread over the score ranks, 1 seed each
  return c
