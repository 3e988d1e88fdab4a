"""The one cross-device helper of the losses: all-gathering the batch axis.

Every batch-relational loss (`sp`, `rkd`, `pkt`, `cc`, `refilled_relationship`) takes
`axis_name=None` and, when it is given (inside `jax.shard_map` or `jax.pmap`), all-gathers its
rows and its mask with `gather_batch` first, so the [b, b] structure covers the global batch and
every device returns the same value.
"""

from __future__ import annotations

import jax

__all__ = ["gather_batch"]


def gather_batch(tree, axis_name: str | None):
  """All-gathers axis 0 of every array in `tree` over `axis_name` (tiled: [n * b, ...]).

  Identity when `axis_name` is None; `None` leaves stay None.
  """
  if axis_name is None:
    return tree
  return jax.tree.map(lambda x: jax.lax.all_gather(x, axis_name, axis=0, tiled=True), tree)
