"""Evaluation: top-1 accuracy and cross-entropy over padded, masked batches, data-parallel.

Batches come from `kd_jax.data.eval_batches` (fixed size, boolean "mask" for the padding). Each
device sums correct predictions, losses and valid rows over its shard; the sums are `psum`-med
over the batch axis, so the result is exact whatever the padding and the number of devices.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from kd_jax import compile_options
from kd_jax import parallel


def _sums(graphdef, variables, batch, axis_name, input_key):
  model = nnx.merge(graphdef, variables["params"], variables["batch_stats"])
  logits, _ = model(batch[input_key], train=False)
  logits = logits.astype(jnp.float32)
  mask = batch.get("mask")
  valid = jnp.ones(logits.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
  labels = batch["label"]
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * valid
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels) * valid
  sums = {"correct": jnp.sum(correct), "loss": jnp.sum(ce), "count": jnp.sum(valid)}
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums


@functools.lru_cache(maxsize=32)
def make_eval_step(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh | None = None, *,
                   input_key: str = "image"):
  """A jitted `eval_step(variables, batch) -> {"correct", "loss", "count"}` (sums).

  Cached per (graphdef, mesh), so runs of the same architecture share one compilation. With a
  mesh the batch is split over its devices (batch size divisible by the device count) and
  the variables must be replicated on it; without one it runs on the default device.
  """
  if mesh is None:
    return compile_options.jit(lambda v, b: _sums(graphdef, v, b, None, input_key))

  def per_device(v, b):
    return _sums(graphdef, v, b, parallel.BATCH_AXIS, input_key)

  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(parallel.BATCH_AXIS)),
                         out_specs=P(), check_vma=False)
  return compile_options.jit(mapped)


def evaluate(eval_step, variables: Mapping[str, Any], batches: Iterable[Mapping[str, Any]], *,
             mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Top-1 accuracy and mean cross-entropy over every valid example of `batches`.

  accuracy = sum(correct * mask) / max(sum(mask), 1), loss likewise.
  """
  total = {"correct": 0.0, "loss": 0.0, "count": 0.0}
  for batch in batches:
    if mesh is not None:  # every host reads the full batch and contributes its block of rows
      batch = parallel.shard_batch(parallel.host_block(batch), mesh)
    sums = jax.device_get(eval_step(variables, batch))
    for k in total:
      total[k] += float(sums[k])
  count = max(total["count"], 1.0)
  return {"accuracy": total["correct"] / count, "loss": total["loss"] / count,
          "count": int(total["count"])}


def predict_logits(graphdef: nnx.GraphDef, variables, batches, *, input_key: str = "image"):
  """Concatenated inference-mode logits over the valid rows of `batches` (for analysis)."""
  apply = compile_options.jit(lambda v, x: nnx.merge(graphdef, v["params"], v["batch_stats"])(
      x, train=False)[0])
  out = []
  for batch in batches:
    logits = np.asarray(apply(variables, batch[input_key]))
    mask = batch.get("mask")
    out.append(logits if mask is None else logits[np.asarray(mask)])
  return np.concatenate(out)
