"""ReFilled on CUB-200-2011 (TFDS `caltech_birds2011`): MobileNet teacher and students at 224x224.

Official code `njulus/REFILLED` (docs/refilled.md): teacher MobileNet(V1) width 1.0, students
widths 1.0, 0.75, 0.5, 0.25; train images RandomResizedCrop 224 + flip, test images resize 256 +
centre crop 224, ImageNet normalisation (`kd_jax.data.cub`); SGD Nesterov 0.1, momentum 0.9,
weight decay 5e-4; stage 1 cosine to 0.01 with NCM selection every 10 epochs, stage 2 CE + 100 x
the embedding-induced classifier (tau_2 = 2, global centres) with x0.2 at epochs 100/140/180; 200
epochs each, batch 128. 10% of the training images are held out for selection (never the test
split). Whether the official runs started from ImageNet weights is not stated in what we read;
here every network starts from scratch unless `teacher.checkpoint` points to a trained teacher.

Pick the student width after a colon (default 0.5); "full" is the README's setting (both on all
200 classes), "same" / "overlap" / "disjoint" are 100/100 class splits (student on 100-199):

  python -m experiments.refilled --config=experiments/configs/refilled_cub.py:0.25 \\
      --workdir=./workdir/refilled_cub_025

Needs CUB-200-2011 prepared by TFDS (downloaded on first use, or `--config.data_dir`).
"""

import ml_collections

WIDTHS = (1.0, 0.75, 0.5, 0.25)


def get_config(width: str | None = None) -> ml_collections.ConfigDict:
  width = float(width or 0.5)
  if width not in WIDTHS:
    raise ValueError(f"unknown ReFilled CUB student width {width}; choose from {WIDTHS}.")
  c = ml_collections.ConfigDict()
  c.dataset = "caltech_birds2011"
  c.data_dir = ""
  c.train_split = "train"
  c.test_split = "test"
  c.val_fraction = 0.1
  c.image_size = 224
  c.resize_size = 256
  c.class_settings = "cub"
  c.settings = ("full",)
  c.seed = 960402
  c.seeds = (960402,)
  c.batch_size = 128
  c.eval_batch_size = 128
  c.num_devices = 0
  c.parallel = "shard_map"
  c.distributed = False
  c.coordinator_address = ""   # off Cloud TPU / SLURM / Open MPI: "host:port" of process 0,
  c.num_processes = -1         # the number of processes and this one's id
  c.process_id = -1            # (-1: found by jax.distributed)
  c.sync_batch_norm = False    # True: BN statistics over the global batch (default: per device)
  c.checkpoint_every = 1000
  c.log_every = 50
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
  c.teacher.model = "mobilenet_v1"
  c.teacher.options = {"width_multiplier": 1.0}
  c.teacher.dtype = "float32"        # compute dtype: "bfloat16" for mixed precision
  c.teacher.param_dtype = "float32"  # parameters and optimizer state (float32 only)
  c.teacher.checkpoint = ""
  sgd_step(c.teacher)

  c.student = ml_collections.ConfigDict()
  c.student.model = "mobilenet_v1"
  c.student.options = {"width_multiplier": width}
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
