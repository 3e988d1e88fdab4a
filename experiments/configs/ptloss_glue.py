"""PTLoss on GLUE-style text classification: transformer teacher -> smaller transformer student.

  python -m experiments.ptloss_glue --config.task=rte --workdir=./workdir_rte
  python -m experiments.ptloss_glue --config.task=mnli --config.teacher.num_steps=20000

Needs the task prepared for `tfds.data_source` (array_record; see kd_jax.data.tfds_source's error
message for the one-off `tfds build ... --file_format=array_record`). BoolQ and CB come from
super_glue, whose TFDS builder needs TensorFlow installed. The dev split for PTLoss's coefficient
selection is carved out of the training split; test accuracy is on the task's labelled
validation split (GLUE's test labels are hidden). Distillation uses the teacher's soft labels
only (alpha = 0), on the training split. Sizes are for one accelerator; the student is the
teacher at half width and depth.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "rte"               # a key of kd_jax.data.glue.TASKS
  c.data_dir = ""              # "": TFDS's default (TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.dev_fraction = 0.05        # of the training split, held out for selection
  c.vocab_size = 16384
  c.max_len = 128
  c.batch_size = 32
  c.eval_batch_size = 128
  c.seed = 0
  c.progress = True

  c.teacher = ml_collections.ConfigDict()
  c.teacher.options = {"width": 256, "depth": 4, "num_heads": 4, "dropout_rate": 0.1}
  c.teacher.dtype = "float32"        # compute dtype: "bfloat16" for mixed precision
  c.teacher.param_dtype = "float32"  # parameters and optimizer state (float32 only)
  c.teacher.num_steps = 5000
  c.teacher.learning_rate = 3e-4
  c.teacher.weight_decay = 0.01

  c.student = ml_collections.ConfigDict()
  c.student.options = {"width": 128, "depth": 2, "num_heads": 4, "dropout_rate": 0.1}
  c.student.dtype = "float32"        # compute dtype: "bfloat16" for mixed precision
  c.student.param_dtype = "float32"  # parameters and optimizer state (float32 only)
  c.student.num_steps = 5000
  c.student.learning_rate = 3e-4
  c.student.weight_decay = 0.01

  c.methods = ("kd", "ptloss")   # kd: PTLoss with epsilon = 0 (KL to the teacher at T = 1)

  c.ptloss = ml_collections.ConfigDict()
  c.ptloss.order = 5
  c.ptloss.num_candidates = 1000
  c.ptloss.per_class = False
  c.ptloss.scale = 1.0
  c.ptloss.distance = "l2"
  return c
