"""PTLoss: KD with a perturbed Maclaurin series of the KL, and the proxy teacher it implies.

Zhang et al., "Knowledge Distillation with Perturbed Loss: From a Vanilla Teacher to a Proxy
Teacher" (KDD 2024; arXiv 2305.05010). No official code was released; the formulas and which
parts are our derivations are in docs/ptloss.md ("The method"). Writing u_k = 1 - p^s_k, the
KL's student term is -sum_k p^t_k log p^s_k = sum_k p^t_k sum_{m>=1} u_k^m / m, and PTLoss
perturbs the leading M coefficients 1/m by eps_{k,m}:

  L_PT = KL(p^t || p^s) + sum_k p^t_k sum_{m=1}^{M} eps_{k,m} u_k^m.

Minimising L_PT over the student's distribution gives the "proxy teacher" the student is really
fitted to; `proxy_teacher` computes it exactly.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.losses import _numerics as nm
from kd_jax.losses import _validation as val

__all__ = ["ptloss", "proxy_teacher", "ProxyTeacher", "epsilon_is_valid"]


# ------------------------------------------------------------------------------ shared helpers


def _check_epsilon(epsilon, num_classes: int, name: str = "epsilon") -> None:
  """epsilon is `[M]` (shared over classes) or `[K, M]` (one row per class)."""
  shape = tuple(jnp.shape(epsilon))
  if len(shape) == 1:
    return
  if len(shape) == 2 and shape[0] == num_classes:
    return
  raise ValueError(
      f"{name} must have shape [M] (shared over classes) or [num_classes, M] = "
      f"[{num_classes}, M] (per class), got {name}.shape={shape} for {num_classes} classes."
  )


def _as_class_rows(epsilon):
  """`[M]` -> `[1, M]` (broadcasts over classes); `[K, M]` unchanged. float32."""
  epsilon = nm.to_float32(epsilon)
  return epsilon[None, :] if epsilon.ndim == 1 else epsilon


def _horner(coefficients, u):
  """sum_j coefficients[..., j] * u^j for coefficients `[K or 1, J]` and u `[..., K]`."""
  num = coefficients.shape[-1]
  if num == 0:
    return jnp.zeros_like(u)
  top = coefficients[:, num - 1]
  acc = jnp.broadcast_to(top, jnp.broadcast_shapes(u.shape, top.shape))  # not 0 * u + top
  for j in range(num - 2, -1, -1):
    acc = acc * u + coefficients[:, j]
  return acc


def _derivative_coefficients(eps):
  """Coefficients of P'(u) and P''(u) in powers of u, for P(u) = sum_{m=1}^M eps_m u^m."""
  # numpy constants, not jnp.arange: XLA folds `eps * m` for a constant eps only when m is a
  # literal (an iota left five [K, 1] kernels in every PTLoss step).
  m = np.arange(1, eps.shape[-1] + 1, dtype=np.float32)
  d1 = eps * m  # P'(u) = sum_{j>=0} (j+1) eps_{j+1} u^j
  d2 = (eps * (m * (m - 1)))[:, 1:]  # P''(u) = sum_{j>=0} (j+2)(j+1) eps_{j+2} u^j
  return d1, d2


# -------------------------------------------------------------------------------------- ptloss


def ptloss(student_logits, teacher_logits, epsilon, *, temperature=1.0, where=None,
           series_terms=None, vocab_axis=None):
  r"""Perturbed KD loss (PTLoss) per example.

  With :math:`p^t = softmax(t/T)`, :math:`p^s = softmax(s/T)` and :math:`u_k = 1 - p^s_k`,

  .. math::
    L_{PT} = KL(p^t \| p^s) + \sum_k p^t_k \sum_{m=1}^{M} \epsilon_{k,m} u_k^m

  (Zhang et al., KDD 2024, "Knowledge Distillation with Perturbed Loss"; docs/ptloss.md; no
  official code exists). `epsilon = 0` gives `KL(p^t || p^s)`, i.e. `kd(...) / T**2` (no
  `T**2` factor here). A one-hot teacher with `M = 1` and a shared `epsilon` gives Poly-1
  (Leng et al., ICLR 2022): `CE + eps * (1 - p_y)`.

  Exact form (`series_terms=None`, the default and the one to train with): the KL from
  `log_softmax`, plus the M-term polynomial. Series form (`series_terms=N`): the Maclaurin series
  :math:`\sum_k p^t_k \log p^t_k + \sum_k p^t_k \sum_{m=1}^{N} (1/m + \epsilon_{k,m}
  [m \le M]) u_k^m` itself, truncated at N terms. It converges slowly when a teacher-weighted
  class has a small student probability (about `1/p` terms are needed), so it exists for study
  and tests only.

  Args:
    student_logits: `[..., K]` student logits (computed in float32).
    teacher_logits: `[..., K]` teacher logits.
    epsilon: perturbation coefficients, `[M]` shared over classes or `[K, M]` per class;
      `epsilon[..., m-1]` perturbs the order-m term.
    temperature: `T > 0`, applied to both teacher and student (the paper's choice was not
      available to us; docs/ptloss.md).
    where: optional boolean mask of the batch shape; masked examples give exactly 0.
    series_terms: `None` for the exact form, or a static Python int `N >= M` for the truncated
      series.
    vocab_axis: a mesh axis name, inside `jax.shard_map` with the class axis of both logits
      sharded over it (an LM vocabulary): the softmax normalisers are a `pmax` and a `psum` of
      per-shard statistics and the sums over classes a `psum` of per-shard sums, so the logits
      are never gathered; a per-class `[K, M]` epsilon is then this shard's rows (shard it over
      its first axis like the logits), a shared `[M]` one is replicated. None: unsharded.

  Returns:
    float32 array of the batch shape `[...]`.
  """
  val.check_logits_pair(student_logits, teacher_logits)
  num_classes = jnp.shape(student_logits)[-1]
  val.check_where(where, jnp.shape(student_logits)[:-1])
  _check_epsilon(epsilon, num_classes)
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  if series_terms is not None:
    order = jnp.shape(epsilon)[-1]
    if not isinstance(series_terms, (int, np.integer)) or series_terms < max(order, 1):
      raise ValueError(
          f"series_terms must be None or a Python int >= M = {order} (epsilon.shape="
          f"{tuple(jnp.shape(epsilon))}), got {series_terms!r}."
      )
    series_terms = int(series_terms)
  return _ptloss(student_logits, teacher_logits, epsilon, temperature, where,
                 series_terms=series_terms, vocab_axis=vocab_axis)


@functools.partial(jax.jit, static_argnames=("series_terms", "vocab_axis"))
def _ptloss(student_logits, teacher_logits, epsilon, temperature, where, *, series_terms,
            vocab_axis):
  s = nm.to_float32(student_logits)
  t = nm.to_float32(teacher_logits)
  if where is not None:  # Zeros in masked rows, so that garbage there cannot reach a gradient.
    s = jnp.where(where[..., None], s, 0.0)
    t = jnp.where(where[..., None], t, 0.0)
  temperature = jnp.asarray(temperature, jnp.float32)
  s, t = s / temperature, t / temperature
  eps = _as_class_rows(epsilon)

  if series_terms is None:
    loss = _exact_ptloss(s, t, eps, vocab_axis)
  else:
    num_terms = series_terms
    order = eps.shape[-1]
    inv_m = 1.0 / jnp.arange(1, num_terms + 1, dtype=jnp.float32)
    coefficients = jnp.broadcast_to(inv_m, (eps.shape[0], num_terms))
    coefficients = coefficients.at[:, :order].add(eps)  # [K or 1, N]

    def horner_step(acc, c):
      return acc * u + c, None

    if vocab_axis is None:
      log_ps = jax.nn.log_softmax(s, axis=-1)
      pt = jax.nn.softmax(t, axis=-1)
    else:
      log_ps = s - nm.softmax_and_logsumexp(s, vocab_axis)[1]
      pt = nm.softmax_and_logsumexp(t, vocab_axis)[0]
    u = jnp.clip(-jnp.expm1(log_ps), 0.0, 1.0)  # 1 - p^s, accurate when p^s is close to 1
    acc, _ = jax.lax.scan(horner_step, jnp.zeros_like(u), coefficients.T[::-1])
    series = u * acc  # sum_{m=1}^N c_m u^m
    neg_entropy = jnp.sum(jax.scipy.special.xlogy(pt, pt), axis=-1)
    loss = neg_entropy + jnp.sum(pt * series, axis=-1)
    if vocab_axis is not None:
      loss = jax.lax.psum(loss, vocab_axis)
  return nm.apply_where(loss, where)


def _exact_parts(s, t, eps, axis_name=None):
  """Shared by the value and its derivative: p^t, p^s, u = 1 - p^s, per-class terms a, loss.

  With `axis_name` the class axis is sharded over that mesh axis (normalisers and class sums
  combined with `pmax`/`psum`, `nm.softmax_and_logsumexp`); the loss is then the global one."""
  # One exp per softmax, and the sums as `row_sum` (a GEMV on CPU: value+grad at B = 256,
  # K = 100 in 0.58-0.75x the time of `jnp.sum` reductions; docs/ptloss.md). Finite logits
  # keep every a_k finite, so a class with p^t_k = 0 contributes exactly 0.
  pt, lse_t = nm.softmax_and_logsumexp(t, axis_name)
  ps, lse_s = nm.softmax_and_logsumexp(s, axis_name)
  u = 1.0 - ps
  # KL(p^t || p^s) + sum_m eps_m u^m, with log p^t - log p^s = (t - s) - (lse_t - lse_s) and the
  # polynomial as u * (eps_1 + u * (eps_2 + ...)): `kl_from_logits` fused with the perturbation.
  # A -inf teacher logit (p^t_k = 0) gives a_k = 0 there instead of -inf (`neg_inf_to_zero`).
  a = nm.neg_inf_to_zero(t, t - s) - (lse_t - lse_s) + u * _horner(eps, u)
  return pt, ps, u, a, nm.class_sum(pt * a, axis_name)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _exact_ptloss(s, t, eps, axis_name=None):
  """Exact PTLoss of tempered float32 logits `s`, `t` `[..., K]` and eps `[K or 1, M]` (`K` this
  shard's classes when `axis_name` names the mesh axis the class axis is sharded over)."""
  return _exact_parts(s, t, eps, axis_name)[-1]


def _is_zero(tangent):
  return isinstance(tangent, jax.custom_derivatives.SymbolicZero)


def _exact_ptloss_jvp(axis_name, primals, tangents):
  # Closed-form derivatives (docs/ptloss.md): dL/ds_j = S p^s_j - p~_j with
  # p~_k = p^t_k (1 + p^s_k P_k'(u_k)), S = sum_k p~_k; dL/dt_j = p^t_j (a_j - L);
  # dL/deps_{k,m} = p^t_k u_k^m. Plain autodiff through the Horner polynomial made value+grad
  # about 2-3x KD's cost on CPU; with this rule and `row_sum` PTLoss costs 1.0-1.3x KD
  # (benchmarks/ptloss_selection.py), and, being a JVP, it still supports forward mode and higher
  # derivatives. Inside a train step the two cost the same (benchmarks/README.md).
  s, t, eps = primals
  ds, dt, deps = tangents
  pt, ps, u, a, loss = _exact_parts(s, t, eps, axis_name)
  d1, _ = _derivative_coefficients(eps)
  tilde = pt * (1.0 + ps * _horner(d1, u))
  terms = []  # Symbolic zeros skip the work for arguments nobody differentiates.
  if not _is_zero(ds):
    terms.append((nm.class_sum(tilde, axis_name)[..., None] * ps - tilde) * ds)
  if not _is_zero(dt):
    terms.append(pt * (a - loss[..., None]) * dt)
  if not _is_zero(deps):  # sum_m deps_m u^m by Horner on the tangent's coefficients.
    terms.append(pt * u * _horner(jnp.broadcast_to(deps, eps.shape), u))
  return loss, nm.class_sum(sum(terms[1:], terms[0]), axis_name)


_exact_ptloss.defjvp(_exact_ptloss_jvp, symbolic_zeros=True)


# ------------------------------------------------------------------------------- proxy teacher


class ProxyTeacher(NamedTuple):
  """Result of `proxy_teacher`.

  Attributes:
    probs: `[..., K]` the proxy-teacher distribution.
    iterations: `[...]` int32, solver iterations each example needed (`max_iter` if it did not
      converge).
    residual: `[...]` final fixed-point residual `||q - p~(q)/S(q)||_1` of `probs`.
    converged: `[...]` bool, `residual <= tol`.
    valid: scalar bool, whether `epsilon` passes the validity check (`epsilon_is_valid`).
  """

  probs: jax.Array
  iterations: jax.Array
  residual: jax.Array
  converged: jax.Array
  valid: jax.Array


def epsilon_is_valid(epsilon, num_classes: int | None = None, *, grid_size: int = 1025):
  r"""Whether `epsilon` defines a proper, unique proxy teacher (checked on a grid of q).

  With :math:`\rho_k(q) = 1 + q P_k'(1-q)` and :math:`P_k(u) = \sum_m \epsilon_{k,m} u^m`:

  * docs/ptloss.md: :math:`\tilde p_k = p^t_k \rho_k(q) \ge 0` for every :math:`q \in [0, 1]`;
    we require :math:`\rho_k > 0`.
  * Ours: :math:`1 + q^2 P_k''(1-q) > 0`, i.e. each class's term
    :math:`-\log q + P_k(1-q)` is strictly convex. Then :math:`q/\rho_k(q)` is increasing, the
    stationarity condition has exactly one solution and it is the minimiser; without it the
    solver could stop at a saddle.

  Args:
    epsilon: `[M]` or `[K, M]`.
    num_classes: K, only used to validate a `[K, M]` epsilon's shape.
    grid_size: number of equispaced q in [0, 1] (endpoints included).

  Returns:
    scalar bool array (jit/vmap compatible).
  """
  if num_classes is not None:
    _check_epsilon(epsilon, num_classes)
  return _epsilon_is_valid(epsilon, grid_size=int(grid_size))


@functools.partial(jax.jit, static_argnames=("grid_size",))
def _epsilon_is_valid(epsilon, *, grid_size):
  eps = _as_class_rows(epsilon)
  d1, d2 = _derivative_coefficients(eps)
  q = jnp.linspace(0.0, 1.0, grid_size, dtype=jnp.float32)[:, None]  # [G, 1]
  u = 1.0 - q
  rho = 1.0 + q * _horner(d1, u)
  convex = 1.0 + q * q * _horner(d2, u)
  return jnp.all(rho > 0) & jnp.all(convex > 0)


def proxy_teacher(teacher_probs, epsilon, *, method="newton", max_iter=None, tol=1e-5,
                  damping=0.5, strict=True, grid_size=1025):
  r"""The proxy teacher of PTLoss: :math:`\arg\min_{q \in \Delta} L_{PT}(p^t, q; \epsilon)`.

  docs/ptloss.md (derivation ours; the paper's Eqs. 8-9 were not available to us). Stationarity of
  :math:`\sum_k p^t_k [-\log q_k + P_k(1 - q_k)]` on the simplex gives the fixed point

  .. math::
    q_k = \tilde p_k(q) / S(q), \quad
    \tilde p_k(q) = p^t_k [1 + q_k \sum_m m \epsilon_{k,m} (1-q_k)^{m-1}], \quad
    S = \sum_k \tilde p_k.

  `p~_k` depends on q only through `q_k`, so with the normaliser `lam = S` as one extra unknown
  the system `F_k = p~_k(q_k) - lam q_k = 0`, `sum_k q_k = 1` has an arrowhead Jacobian: a
  Newton step costs O(K) (each class's update is explicit given the scalar step in `lam`).

  Methods:
    * `"newton"` (default): Newton on `(q, lam)` from `(p^t, S(p^t))`, with q clipped to [0, 1].
      Converges quadratically; for epsilons of the default size (U[-1/m, 1/m], K = 100)
      examples need 2-3 iterations on average and at most about 6 (the damped fixed point: 15-30).
    * `"fixed_point"`: the damped iteration `q <- (1 - damping) q + damping p~(q)/S(q)` from
      `q = p^t` (docs/ptloss.md); linear convergence, kept for comparison.

  Validity: see `epsilon_is_valid`. With `strict=True` and a concrete (not traced) epsilon an
  invalid one raises `ValueError`; under `jax.jit`/`vmap` (or with `strict=False`) the `valid`
  flag of the result is False instead and `probs` is meaningless.

  Args:
    teacher_probs: `[..., K]` teacher distributions (rows on the simplex; zeros allowed).
    epsilon: `[M]` shared or `[K, M]` per class; `0` gives back `teacher_probs`.
    method: `"newton"` or `"fixed_point"`.
    max_iter: iteration cap (default 50 for Newton, 500 for the fixed point).
    tol: convergence threshold on the L1 residual `||q - p~(q)/S(q)||_1`. A threshold of
      1e-6 sits at float32's rounding floor of the residual, about `K * 1e-8` (~1e-6 for
      K = 100), so the default is 1e-5 (Newton's last step usually lands far below it).
    damping: step size of the fixed-point method.
    strict: raise on an invalid concrete epsilon (see above).
    grid_size: size of the q grid of the validity check.

  Returns:
    a `ProxyTeacher(probs, iterations, residual, converged, valid)`.
  """
  val.check_rank(teacher_probs, 1, "teacher_probs")
  num_classes = jnp.shape(teacher_probs)[-1]
  _check_epsilon(epsilon, num_classes)
  if method not in ("newton", "fixed_point"):
    raise ValueError(f"method must be 'newton' or 'fixed_point', got {method!r}.")
  if max_iter is None:
    max_iter = 50 if method == "newton" else 500
  if strict and not isinstance(epsilon, jax.core.Tracer):
    if not bool(epsilon_is_valid(epsilon, grid_size=grid_size)):
      raise ValueError(
          f"epsilon (shape {tuple(jnp.shape(epsilon))}) does not define a valid proxy teacher: "
          "1 + q * sum_m m eps_m (1-q)^(m-1) > 0 and 1 + q^2 P''(1-q) > 0 must hold for every "
          "q in [0, 1] (docs/ptloss.md). Use smaller coefficients, or strict=False to get a "
          "`valid` flag instead."
      )
  return _proxy_teacher(teacher_probs, epsilon, tol, damping, method=method,
                        max_iter=int(max_iter), grid_size=int(grid_size))


def _tilde(pt, q, d1):
  """p~(q) = p^t * (1 + q P'(1-q))."""
  return pt * (1.0 + q * _horner(d1, 1.0 - q))


def _residual(q, tilde):
  s = jnp.sum(tilde, axis=-1, keepdims=True)
  return jnp.sum(jnp.abs(q - tilde / jnp.where(s > 0, s, 1.0)), axis=-1)


@functools.partial(jax.jit, static_argnames=("method", "max_iter", "grid_size"))
def _proxy_teacher(teacher_probs, epsilon, tol, damping, *, method, max_iter, grid_size):
  pt = nm.to_float32(teacher_probs)
  pt = pt / jnp.maximum(jnp.sum(pt, axis=-1, keepdims=True), 1e-30)
  eps = _as_class_rows(epsilon)
  d1, d2 = _derivative_coefficients(eps)
  valid = _epsilon_is_valid(epsilon, grid_size=grid_size)
  batch_shape = pt.shape[:-1]

  def newton_step(q, lam, dp, tilde):
    drho = dp - q * _horner(d2, 1.0 - q)  # rho'(q) = P'(u) - q P''(u)
    f = tilde - lam * q
    # dF/dq_k = p^t_k rho'(q_k) - lam, negative near the solution of a valid epsilon; keep it so.
    inv_d = 1.0 / jnp.minimum(pt * drho - lam, -1e-6 * lam)
    r = 1.0 - jnp.sum(q, axis=-1, keepdims=True)
    dlam = ((r + jnp.sum(f * inv_d, axis=-1, keepdims=True))
            / jnp.sum(q * inv_d, axis=-1, keepdims=True))
    q_new = jnp.clip(q + (q * dlam - f) * inv_d, 0.0, 1.0)
    return q_new, jnp.maximum(lam + dlam, 1e-12)

  def evaluate(q):
    """P'(1 - q), p~(q) and the residual at q."""
    dp = _horner(d1, 1.0 - q)
    tilde = pt * (1.0 + q * dp)
    return dp, tilde, _residual(q, tilde)

  def body(state):
    it, q, lam, dp, res, iters = state
    active = res > tol
    tilde = pt * (1.0 + q * dp)
    if method == "newton":
      q_new, lam_new = newton_step(q, lam, dp, tilde)
    else:
      s = jnp.sum(tilde, axis=-1, keepdims=True)
      q_new = (1.0 - damping) * q + damping * tilde / jnp.where(s > 0, s, 1.0)
      lam_new = lam
    # Keep iterates on the simplex, so that the residual tested is the one reported.
    q_new = q_new / jnp.maximum(jnp.sum(q_new, axis=-1, keepdims=True), 1e-30)
    dp_new, _, res_new = evaluate(q_new)
    keep = active[..., None]
    return (it + 1, jnp.where(keep, q_new, q), jnp.where(keep, lam_new, lam),
            jnp.where(keep, dp_new, dp), jnp.where(active, res_new, res),
            iters + active.astype(jnp.int32))

  def cond(state):
    it, *_, res, _ = state
    return (it < max_iter) & jnp.any(res > tol)

  dp0, tilde0, res0 = evaluate(pt)
  lam0 = jnp.sum(tilde0, axis=-1, keepdims=True)
  init = (jnp.int32(0), pt, lam0, dp0, res0, jnp.zeros(batch_shape, jnp.int32))
  _, q, _, _, residual, iters = jax.lax.while_loop(cond, body, init)
  return ProxyTeacher(q, iters, residual, residual <= tol, valid)
