"""HetComp's student: a small matrix factorisation model, and its stand-alone BPR baseline.

The student is MF with user/item embeddings initialised from N(0, 0.01^2) and score
<e_u, e_i>; dim = 6 by default, as in `SeongKu-Kang/HetComp_WWW23: main.py, Models/HetComp.py`
(docs/hetcomp.md). It is `teachers.MF` with those settings, used functionally.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kd_jax.recsys.teachers import MF, TeacherSpec

STUDENT_DIM = 6
STUDENT_INIT_STD = 0.01


def make_student(num_users: int, num_items: int, key, *, dim: int = STUDENT_DIM) -> MF:
  """A fresh MF student with N(0, 0.01^2) embeddings of size `dim`."""
  if dim < 1:
    raise ValueError(f"Student dim must be positive, got {dim}.")
  return MF(num_users, num_items, dim, rngs=nnx.Rngs(params=key), init_std=STUDENT_INIT_STD)


def bpr_student_spec(dim: int = STUDENT_DIM, epochs: int = 40, lr: float = 5e-3) -> TeacherSpec:
  """The 'student alone' baseline: the same MF trained with BPR (no distillation)."""
  return TeacherSpec(MF, dim, epochs, lr, 1024, (("init_std", STUDENT_INIT_STD), ("l2", 0.0)))


def mf_scores(params, users, clip: float | None = None):
  """s[u, i] = <e_u, e_i> for the users given, over all items, from a pure param dict."""
  s = params["user"][users] @ params["item"].T
  return s if clip is None else jnp.clip(s, -clip, clip)


_jit_scores = jax.jit(mf_scores, static_argnames=("clip",))


def student_scorer(params):
  """A jitted `users -> [B, num_items]` scorer for evaluation and DKC (compiled once)."""
  return lambda users: _jit_scores(params, jnp.asarray(users))
