"""RepDistiller's CIFAR-100 recipe for the teacher -> student pairs of the KD benchmark tables.

`HobbitLong/RepDistiller` (Tian et al., "Contrastive Representation Distillation", ICLR 2020),
whose recipe `megvii-research/mdistiller` (Zhao et al., "Decoupled Knowledge Distillation", CVPR
2022) also uses, the community standard: 240 epochs, batch 64, SGD momentum 0.9, weight decay
5e-4, learning rate 0.05 (0.01 for MobileNetV2 / ShuffleV1 / ShuffleV2 students) decayed x0.1 at
epochs 150, 180 and 210; crop 32 / pad 4 + flip, CIFAR-100 mean/std. Methods: KD (T = 4, CE 0.1 +
KD 0.9), SP (CE 1 + 3000 x SP on the last feature map before pooling, `pre_pool` = RepDistiller's
feat[-2]), DKD (CE 1, alpha 1, beta per pair, T 4, 20-epoch linear warm-up), RKD (CE 1 + 1 x RKD
25/50 on the pooled embedding). Teachers are trained with the same recipe (RepDistiller
`train_teacher.py`) unless `teacher.checkpoint` points to one (e.g. a RepDistiller teacher converted with
`python -m kd_jax.convert_teacher --pth=ckpt_epoch_240.pth --arch=resnet32x4 --num_classes=100
--out=DIR`).

Pick the pair after a colon (names as in the CIFAR-100 tables of RepDistiller's README):

  python -m experiments.main --workdir=/tmp/r32x4_r8x4 \\
      --config=experiments/configs/cifar100.py:resnet32x4-resnet8x4

A second colon picks the later logit methods instead of the classic set (`:logit`): the student
alone, KD, logit-standardised KD (Sun et al., CVPR 2024: CE 0.1 + 9 x KD on z-scored logits at
the authors' per-pair base temperature, sunshangquan/logit-standardization-KD), DIST (Huang et
al., NeurIPS 2022: CE 1 + 2 x DIST, T = 4, beta = gamma = 1, hunto/image_classification_sota
`configs/strategies/distill/dist_cifar.yaml`, whose schedule is this one), KD + DOT (Zhao et
al., ICCV 2023: the KD recipe trained with `kd_jax.train.dot`, delta 0.075, mdistiller
`configs/cifar100/dot/`) and DKD + DOT (the DKD recipe with the same optimizer; mdistiller ships
DOT configs for KD only):

  python -m experiments.main --workdir=/tmp/r32x4_r8x4_logit \\
      --config=experiments/configs/cifar100.py:resnet32x4-resnet8x4:logit

`:ensemble` (pairs of `ENSEMBLES`; `cifar100.py:ensemble` is resnet32x4-resnet8x4:ensemble)
distils a two-teacher ensemble with the KD recipe: the student alone, KD from the pair's
teacher, KD from the second teacher alone, and KD against the mean of the two teachers'
softmaxes at T = 4 (`config.teachers`, `config.method_teachers`); each teacher is trained with
the same recipe in `<workdir>/teacher` and `<workdir>/teachers/<name>` unless its `checkpoint`
is set:

  python -m experiments.main --workdir=/tmp/r32x4_w402_r8x4 \\
      --config=experiments/configs/cifar100.py:ensemble \\
      --config.teachers.wrn_40_2.checkpoint=teachers/wrn_40_2

Needs CIFAR-100 from TFDS (downloaded and prepared on first use, or `--config.data_dir`).
"""

import ml_collections

# (teacher, student) -> DKD beta (`megvii-research/mdistiller: configs/cifar100/dkd/`).
PAIRS = {
    "resnet56-resnet20": 2.0,
    "resnet110-resnet20": 8.0,
    "resnet110-resnet32": 2.0,
    "resnet32x4-resnet8x4": 8.0,
    "wrn_40_2-wrn_16_2": 6.0,
    "wrn_40_2-wrn_40_1": 6.0,
    "vgg13-vgg8": 6.0,
    "vgg13-MobileNetV2": 6.0,
    "ResNet50-MobileNetV2": 8.0,
    "ResNet50-vgg8": 8.0,
    "resnet32x4-ShuffleV1": 8.0,
    "resnet32x4-ShuffleV2": 8.0,
    "wrn_40_2-ShuffleV1": 8.0,
}
# (teacher, student) -> (base temperature, KD weight) of logit-standardised KD, from the log
# names of the authors' README tables (sunshangquan/logit-standardization-KD); pairs not in
# their KD tables use their default (2, 9).
LS_KD = {
    "vgg13-vgg8": (3.0, 9.0),
    "vgg13-MobileNetV2": (3.0, 9.0),
    "resnet110-resnet20": (4.0, 12.0),
    "ResNet50-MobileNetV2": (3.0, 1.0),
}
LS_KD_DEFAULT = (2.0, 9.0)
DOT_DELTA = 0.075  # mdistiller `CFG.SOLVER.DOT.DELTA` and its CIFAR-100 DOT configs
VARIANTS = ("", "logit", "ensemble")
# Pair -> the second teacher of its `:ensemble` variant.
ENSEMBLES = {"resnet32x4-resnet8x4": "wrn_40_2"}
# RepDistiller lowers the learning rate for these students.
SMALL_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
TRAIN_SIZE, BATCH_SIZE = 50_000, 64
STEPS_PER_EPOCH = TRAIN_SIZE // BATCH_SIZE  # full batches only (781)


def _schedule(c: ml_collections.ConfigDict, learning_rate: float) -> None:
  c.num_epochs = 240
  c.num_steps = 0
  c.learning_rate = learning_rate
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.decay_epochs = (150, 180, 210)
  c.decay_rate = 0.1


def get_config(pair: str = "resnet32x4-resnet8x4") -> ml_collections.ConfigDict:
  if pair == "ensemble":
    pair = "resnet32x4-resnet8x4:ensemble"
  pair, _, variant = pair.partition(":")
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of the CIFAR-100 config; known: "
                     f"{', '.join(repr(v) for v in VARIANTS)}")
  if pair not in PAIRS:
    raise ValueError(f"unknown pair {pair!r}; known pairs: {', '.join(PAIRS)}")
  teacher, student = pair.split("-")
  c = ml_collections.ConfigDict()
  c.dataset = "cifar100"
  c.data_dir = ""              # "": TFDS's default (TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.train_split = "train"
  c.val_split = "test"         # RepDistiller reports test accuracy every epoch
  c.seed = 0
  c.batch_size = BATCH_SIZE    # global; the recipe is single-GPU batch 64 (RepDistiller issue 3)
  c.eval_batch_size = 256
  c.num_devices = 0
  c.parallel = "shard_map"
  c.distributed = False
  c.coordinator_address = ""   # off Cloud TPU / SLURM / Open MPI: "host:port" of process 0,
  c.num_processes = -1         # the number of processes and this one's id
  c.process_id = -1            # (-1: found by jax.distributed)
  c.sync_batch_norm = False    # True: BN statistics over the global batch (default: per device)
  c.checkpoint_every = 5 * STEPS_PER_EPOCH
  c.log_every = 100
  c.eval_every_epochs = 1      # val (= test) accuracy every epoch: last and best epoch both kept
  c.progress = True
  # Distillation diagnostics (kd_jax.train.evaluate.evaluate_distillation); CKA on the maps SP
  # compares.
  c.diagnostics = ml_collections.ConfigDict({"student_feature": "pre_pool",
                                             "teacher_feature": "pre_pool", "num_bins": 15})

  c.teacher = ml_collections.ConfigDict()
  c.teacher.model = teacher
  c.teacher.options = {}
  c.teacher.dtype = "float32"        # compute dtype: "bfloat16" for mixed precision
  c.teacher.param_dtype = "float32"  # parameters and optimizer state (float32 only)
  c.teacher.num_classes = 0
  c.teacher.checkpoint = ""
  _schedule(c.teacher, 0.05)

  c.student = ml_collections.ConfigDict()
  c.student.model = student
  c.student.options = {}
  c.student.dtype = "float32"        # compute dtype: "bfloat16" for mixed precision
  c.student.param_dtype = "float32"  # parameters and optimizer state (float32 only)
  c.student.num_classes = 0
  _schedule(c.student, 0.01 if student in SMALL_LR_STUDENTS else 0.05)

  c.methods = ml_collections.ConfigDict({
      "student": "ce:1",
      "kd": "ce:0.1,kd:0.9",
      "sp": "ce:1,sp:3000",
      "dkd": "ce:1,dkd:1",
      "rkd": "ce:1,rkd:1",
  })
  c.method_order = ("student", "kd", "sp", "dkd", "rkd")
  c.loss_options = ml_collections.ConfigDict({
      "kd": {"temperature": 4.0},
      "sp": {"feature": "pre_pool", "all_gather": False},
      "dkd": {"alpha": 1.0, "beta": PAIRS[pair], "temperature": 4.0,
              "warmup_steps": 20 * STEPS_PER_EPOCH},
      "rkd": {"feature": "embedding", "distance_weight": 25.0, "angle_weight": 50.0},
  })
  if variant == "logit":
    ls_temperature, ls_weight = LS_KD.get(pair, LS_KD_DEFAULT)
    c.methods = ml_collections.ConfigDict({
        "student": "ce:1",
        "kd": "ce:0.1,kd:0.9",
        "ls_kd": f"ce:0.1,ls_kd:{ls_weight:g}",
        "dist": "ce:1,dist:2",
        "kd_dot": "ce:0.1,kd:0.9",
        "dkd": "ce:1,dkd:1",
        "dkd_dot": "ce:1,dkd:1",
    })
    c.method_order = ("student", "kd", "ls_kd", "dist", "kd_dot", "dkd", "dkd_dot")
    c.loss_options = ml_collections.ConfigDict({
        "kd": {"temperature": 4.0},
        "ls_kd": {"temperature": ls_temperature},
        "dist": {"beta": 1.0, "gamma": 1.0, "temperature": 4.0},
        "dkd": {"alpha": 1.0, "beta": PAIRS[pair], "temperature": 4.0,
                "warmup_steps": 20 * STEPS_PER_EPOCH},
    })
    # DOT: the same SGD schedule, task momentum 0.9 - delta, distillation momentum 0.9 + delta.
    c.method_optimizer = ml_collections.ConfigDict({
        "kd_dot": {"optimizer": "dot", "delta": DOT_DELTA},
        "dkd_dot": {"optimizer": "dot", "delta": DOT_DELTA},
    })
  if variant == "ensemble":
    if pair not in ENSEMBLES:
      raise ValueError(f"the ensemble variant is defined for {', '.join(ENSEMBLES)}, not "
                       f"{pair!r}.")
    second = ENSEMBLES[pair]
    partner = c.teacher.to_dict()
    partner.update(model=second, checkpoint="")
    # The pair's teacher is config.teacher itself (equal config: one checkpoint, one forward).
    c.teachers = ml_collections.ConfigDict({teacher: c.teacher.to_dict(), second: partner})
    c.methods = ml_collections.ConfigDict({
        "student": "ce:1",
        "kd": "ce:0.1,kd:0.9",
        f"kd_{second}": "ce:0.1,kd:0.9",
        "kd_ensemble": "ce:0.1,kd:0.9",
    })
    c.method_order = ("student", "kd", f"kd_{second}", "kd_ensemble")
    c.loss_options = ml_collections.ConfigDict({"kd": {"temperature": 4.0}})
    c.method_teachers = ml_collections.ConfigDict({
        f"kd_{second}": {"members": (second,)},
        "kd_ensemble": {"members": (teacher, second), "weights": (1.0, 1.0)}})
  c.ptloss = ml_collections.ConfigDict()
  c.ptloss.select = False
  c.ptloss.epsilon = (0.0,)
  return c
