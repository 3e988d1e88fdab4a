"""Mixup and CutMix inside the jitted train step, the same mixed input for teacher and student.

"Function matching" (Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022; big_vision `trainers/proj/distill/distill.py`): the teacher and the
student see exactly the same mixed image, so the student matches the teacher's function on
inputs between the training images. As in big_vision's `utils.get_mixup`, one
`lam ~ Beta(alpha, alpha)` is drawn per step, `lam = max(lam, 1 - lam)` (the kept image
dominates), and every example is mixed with its neighbour in the batch (`jnp.roll(x, 1,
axis=0)`; the batches are shuffled, so the pairing is random).

- mixup (Zhang et al., ICLR 2018): `x' = lam x + (1 - lam) roll(x)`;
- CutMix (Yun et al., ICCV 2019; the box of clovaai/CutMix-PyTorch `rand_bbox`): a box of
  side `floor(H sqrt(1 - lam))` x `floor(W sqrt(1 - lam))` centred at a uniform pixel, clipped
  to the image, is pasted from `roll(x)`; the label weight is the kept area `1 - box / (H W)`.
  The centre is drawn as a fraction of the image, so views of different resolutions (a
  teacher's larger view) get proportionally the same box.

The draw is keyed by `fold_in(key(seed), step)`: a run is deterministic and a resumed run draws
what the uninterrupted one would. Under data parallelism every device uses the same draw and
mixes within its own rows. An example whose partner is a padded row (`batch["mask"]` False) is
left unmixed. The batch gains "mix_label" (the partner's label), "mix_lambda" (per example, 1
where unmixed) and, with a transfer set, "mix_labeled"; the "ce" term reads them
(`lam CE(y) + (1 - lam) CE(y_partner)`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

KINDS = ("mixup", "cutmix")


@dataclasses.dataclass(frozen=True)
class Mixing:
  """Mixup or CutMix applied inside the train step (`make_train_step(..., mixing=Mixing())`).

  Attributes:
    kind: "mixup" or "cutmix".
    alpha: the Beta(alpha, alpha) parameter of the mixing weight (big_vision's `p`; 1 in the
      function-matching configs).
    seed: the seed of the per-step draws (`fold_in(key(seed), step)`).
  """

  kind: str = "mixup"
  alpha: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"mixing kind must be one of {KINDS}, got {self.kind!r}.")
    if not self.alpha > 0:
      raise ValueError(f"mixing alpha must be > 0, got {self.alpha}.")


def draw_lambda(key, alpha: float) -> jax.Array:
  """`max(lam, 1 - lam)` with `lam ~ Beta(alpha, alpha)` (float32 scalar in [0.5, 1])."""
  lam = jax.random.beta(key, alpha, alpha, dtype=jnp.float32)
  return jnp.maximum(lam, 1.0 - lam)


def mixup(x, lam, keep=None):
  """`lam x + (1 - lam) roll(x, 1, axis=0)` per example; rows with `keep` False stay `x`."""
  lam_row = _per_row(lam, x.shape[0], keep)
  shape = (-1,) + (1,) * (x.ndim - 1)
  lam_row = lam_row.reshape(shape)
  out = lam_row * x.astype(jnp.float32) + (1.0 - lam_row) * jnp.roll(x, 1, axis=0).astype(
      jnp.float32)
  return out.astype(x.dtype)


def cutmix_box(height: int, width: int, lam, center):
  """Integer box `(y0, y1, x0, x1)` of clovaai/CutMix-PyTorch's `rand_bbox` for an H x W image:
  side `floor(H sqrt(1 - lam))` by `floor(W sqrt(1 - lam))`, centre `floor(center * (H, W))`
  with `center` in [0, 1)^2, clipped to the image."""
  cut = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * cut).astype(jnp.int32)
  cut_w = jnp.floor(width * cut).astype(jnp.int32)
  cy = jnp.floor(center[0] * height).astype(jnp.int32)
  cx = jnp.floor(center[1] * width).astype(jnp.int32)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  return y0, y1, x0, x1


def cutmix(x, lam, center, keep=None):
  """Pastes `roll(x, 1, axis=0)` into the CutMix box of an NHWC (or NHW) batch `x`; returns
  `(mixed, kept_area)` with `kept_area = 1 - box / (H W)`; rows with `keep` False stay `x`."""
  h, w = x.shape[1], x.shape[2]
  y0, y1, x0, x1 = cutmix_box(h, w, lam, center)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # [H, W]
  area = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
  take = inside.reshape((1, h, w) + (1,) * (x.ndim - 3))
  if keep is not None:
    take = take & _partner_valid(keep).reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.where(take, jnp.roll(x, 1, axis=0), x), jnp.asarray(area, jnp.float32)


def _partner_valid(keep):
  return keep & jnp.roll(keep, 1, axis=0)


def _per_row(lam, b, keep):
  lam = jnp.broadcast_to(jnp.asarray(lam, jnp.float32), (b,))
  return lam if keep is None else jnp.where(_partner_valid(keep), lam, 1.0)


def mix_batch(batch: Mapping[str, jax.Array], mixing: Mixing, *, step, keys: Sequence[str]
              ) -> dict[str, jax.Array]:
  """`batch` with the inputs `keys` mixed by one draw of `fold_in(key(mixing.seed), step)`.

  The first key sets the label weight (CutMix: its kept area). Adds "mix_label",
  "mix_lambda" ([b] float32) and, when the batch has "labeled", "mix_labeled".
  """
  keys = list(dict.fromkeys(keys))
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(f"mixing: the batch has no {missing} entry (keys: {sorted(batch)}).")
  key = jax.random.fold_in(jax.random.key(mixing.seed), step)
  k_lam, k_center = jax.random.split(key)
  lam = draw_lambda(k_lam, mixing.alpha)
  keep = batch.get("mask")
  keep = None if keep is None else jnp.asarray(keep, bool)
  out = dict(batch)
  b = batch[keys[0]].shape[0]
  if mixing.kind == "mixup":
    for k in keys:
      out[k] = mixup(batch[k], lam, keep)
    label_lam = lam
  else:
    center = jax.random.uniform(k_center, (2,), jnp.float32)
    for i, k in enumerate(keys):
      if batch[k].ndim < 3:
        raise ValueError(f"cutmix needs image batches [b, H, W(, C)]; batch[{k!r}] has shape "
                         f"{batch[k].shape}.")
      out[k], area = cutmix(batch[k], lam, center, keep)
      if i == 0:
        label_lam = area
  out["mix_lambda"] = _per_row(label_lam, b, keep)
  if "label" in batch:
    out["mix_label"] = jnp.roll(batch["label"], 1, axis=0)
  if "labeled" in batch:
    out["mix_labeled"] = jnp.roll(jnp.asarray(batch["labeled"], bool), 1, axis=0)
  return out
