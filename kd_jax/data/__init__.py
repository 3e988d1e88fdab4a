"""Data: the offline digits dataset, TFDS sources, Grain pipelines, augmentation, teacher caches."""

from kd_jax.data.digits import DatasetSplits
from kd_jax.data.digits import load_digits
from kd_jax.data.pipeline import ArraySource
from kd_jax.data.pipeline import batches
from kd_jax.data.pipeline import eval_batches
from kd_jax.data.pipeline import example_rng
from kd_jax.data.pipeline import steps_per_epoch
