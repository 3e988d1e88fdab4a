"""Data: the offline digits dataset, TFDS sources, Grain pipelines, augmentation (and in-step
mixup / CutMix, `mixing`), teacher caches."""

from kd_jax.data import augment
from kd_jax.data import class_splits
from kd_jax.data import cub
from kd_jax.data import mixing
from kd_jax.data import teacher_cache
from kd_jax.data import topk_cache
from kd_jax.data.augment import cifar_eval_transform
from kd_jax.data.augment import cifar_train_augment
from kd_jax.data.augment import compose
from kd_jax.data.checks import check_split
from kd_jax.data.digits import DatasetSplits
from kd_jax.data.digits import load_digits
from kd_jax.data.mixing import Mixing
from kd_jax.data.mnist1d import load_mnist1d
from kd_jax.data.mnist1d import mnist1d_transfer_set
from kd_jax.data.pipeline import ArraySource
from kd_jax.data.pipeline import batches
from kd_jax.data.pipeline import eval_batches
from kd_jax.data.pipeline import example_rng
from kd_jax.data.pipeline import example_view
from kd_jax.data.pipeline import steps_per_epoch
from kd_jax.data.sources import CIFAR_NUM_CLASSES
from kd_jax.data.sources import DatasetUnavailableError
from kd_jax.data.sources import cifar
from kd_jax.data.sources import tfds_source
from kd_jax.data.class_splits import ClassSplit
from kd_jax.data.class_splits import Setting
from kd_jax.data.class_splits import apply_split
from kd_jax.data.class_splits import balanced_subset
from kd_jax.data.class_splits import cifar100_settings
from kd_jax.data.class_splits import class_split
from kd_jax.data.class_splits import digits_settings
from kd_jax.data.class_splits import generalized_settings
from kd_jax.data.class_splits import label_map
