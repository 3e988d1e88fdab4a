"""PTLoss on digits: does the proxy teacher chosen on validation data give a better student?

Offline reproduction of the experiment design of Zhang et al., "Knowledge Distillation with
Perturbed Loss" (KDD 2024; docs/ptloss.md) at toy scale:

  python -m experiments.ptloss_digits --out=results.json
  python -m experiments.ptloss_digits --config.num_seeds=2 --config.student.num_epochs=10

1. A deliberately miscalibrated teacher: a wide MLP trained without regularisation far past
   convergence on half of the training split, 40% of whose labels are replaced by random ones. It
   memorises the noise, so on unseen digits it is over-confident (its ECE is reported).
2. A student learns from the teacher's soft labels only (no ground-truth cross-entropy: the
   paper's alpha = 0 setting) on the other half, the unlabelled distillation set. Teacher outputs
   are computed once (no augmentation on digits) and every student seed is trained in one
   vmapped, jitted program.
3. Methods: KD at T = 1; KD with T chosen by the students' validation accuracy; label smoothing
   of the teacher's soft labels, (1 - a) p^t + a / K, with a chosen the same way; PTLoss with
   coefficients chosen by `kd_jax.ptloss.select_coefficients` on the validation split (no
   student trained for the choice), class-shared ([M]) and per class ([K, M]); PTLoss with a
   random valid class-shared candidate (a different one per seed). Mean and standard deviation
   of test accuracy over `num_seeds` seeds.
4. The paper's claim: across candidates, the validation closeness score of the proxy teacher
   predicts the student's test accuracy. Pearson and Spearman correlations over a set of
   candidates spread over the score range, each student trained briefly.

Prints a table; `--out` writes everything as JSON (atomically: a temporary file, then a rename).
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import precision
from kd_jax import data as data_lib
from kd_jax import losses
from kd_jax import models
from kd_jax import ptloss as ptloss_lib
from kd_jax.train.step import apply_model

METHODS = ("kd_t1", "kd_tuned", "label_smoothing", "ptloss_selected",
           "ptloss_selected_per_class", "ptloss_random")


# ------------------------------------------------------------------------------------- data


def corrupt_labels(labels, rate: float, num_classes: int, seed: int) -> np.ndarray:
  """Replaces a `rate` fraction of the labels (chosen at random) by uniform random classes.

  A replaced label may by chance equal the original, so the realised noise is about
  `rate * (K - 1) / K`.

  Args:
    labels: int [N] labels.
    rate: fraction in [0, 1] of the examples whose label is redrawn.
    num_classes: K.
    seed: numpy seed.

  Returns:
    int32 [N] noisy labels.
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"noise rate must be in [0, 1], got {rate}.")
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels, np.int32).copy()
  flip = rng.permutation(labels.shape[0])[:int(round(rate * labels.shape[0]))]
  labels[flip] = rng.integers(0, num_classes, size=flip.shape[0])
  return labels


def split_half(arrays: dict[str, np.ndarray], seed: int):
  """Stratified halves of a split: (teacher's training part, unlabelled distillation set)."""
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  idx = np.arange(arrays["label"].shape[0])
  a, b = train_test_split(idx, test_size=0.5, stratify=arrays["label"], random_state=seed)
  a, b = np.sort(a), np.sort(b)
  return ({k: v[a] for k, v in arrays.items()}, {k: v[b] for k, v in arrays.items()})


def expected_calibration_error(probs, labels, num_bins: int = 15) -> float:
  r"""Expected calibration error with equal-width confidence bins.

  :math:`ECE = \sum_b \frac{|B_b|}{N} |acc(B_b) - conf(B_b)|` over bins
  :math:`B_b = \{i : c_i \in ((b-1)/n, b/n]\}` of the top-1 confidence :math:`c_i` (Guo et al.,
  "On Calibration of Modern Neural Networks", ICML 2017, 15 bins).

  Args:
    probs: [N, K] predicted distributions.
    labels: [N] integer labels.
    num_bins: number of equal-width bins on [0, 1].

  Returns:
    The ECE as a Python float in [0, 1].
  """
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  conf = probs.max(-1)
  correct = (probs.argmax(-1) == labels).astype(np.float64)
  bins = np.clip(np.ceil(conf * num_bins).astype(int) - 1, 0, num_bins - 1)
  ece = 0.0
  for b in range(num_bins):
    in_bin = bins == b
    if in_bin.any():
      ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
  return float(ece)


# ---------------------------------------------------------------------------------- training


def _init(cfg, num_classes: int, key):
  """`cfg.model` with `cfg.options` and its compute dtype (experiments/precision.py)."""
  model = models.create(cfg.model, num_classes=num_classes, rngs=nnx.Rngs(key),
                        **precision.model_options(cfg))
  return nnx.split(model, nnx.Param, ...)


def _logits(graphdef, params, state, x):
  out, _ = apply_model(graphdef, params, state, x, train=False)
  return out.logits


def train_teacher(cfg, x, y, num_classes: int):
  """Full-batch Adam on cross-entropy, no regularisation: memorises noisy labels.

  Returns:
    `predict(x) -> logits`, a jitted function of the trained teacher.
  """
  graphdef, params, state = _init(cfg, num_classes,
                                  jax.random.key(cfg.seed))
  tx = optax.adam(cfg.learning_rate)
  x, y = jnp.asarray(x), jnp.asarray(y)

  @jax.jit
  def fit(params, state):
    def body(carry, _):
      params, state, opt = carry

      def loss_fn(p):
        out, new_state = apply_model(graphdef, p, state, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(out.logits, y).mean(), new_state

      (loss, new_state), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt = tx.update(g, opt, params)
      return (optax.apply_updates(params, updates), new_state, opt), loss

    (params, state, _), loss = jax.lax.scan(body, (params, state, tx.init(params)), None,
                                            length=cfg.num_steps)
    return params, state, loss[-1]

  params, state, _ = fit(params, state)
  return jax.jit(functools.partial(_logits, graphdef, params, state))


def student_loss(student_logits, teacher_logits, *, temperature, smoothing, epsilon):
  r"""Per-example distillation loss of every compared method, as one family (no label term).

  With :math:`\bar p = (1 - a)\, softmax(t / T) + a / K`, the loss is
  :math:`T^2 \, L_{PT}(s / T, \log \bar p; \epsilon)` (`kd_jax.losses.ptloss`):

  - KD at temperature T (Hinton et al. 2015, `losses.kd`): a = 0, epsilon = 0;
  - label smoothing of the teacher's soft labels: T = 1, epsilon = 0, weight a; its gradient is
    the one of the cross-entropy with the smoothed target (they differ by the target's entropy);
  - PTLoss (Zhang et al., KDD 2024): T = 1, a = 0, coefficients epsilon.

  Writing all of them as one function lets every student of the experiment, whatever its method,
  share one vmapped program (one compile).

  Args:
    student_logits: [..., K] student logits.
    teacher_logits: [..., K] teacher logits.
    temperature: T > 0 (traced scalar).
    smoothing: a in [0, 1] (traced scalar).
    epsilon: [M] or [K, M] PTLoss coefficients.

  Returns:
    float32 [...] per-example loss.
  """
  k = teacher_logits.shape[-1]
  log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  log_target = jnp.logaddexp(jnp.log1p(-smoothing) + log_p, jnp.log(smoothing / k))
  return temperature**2 * losses.ptloss(student_logits / temperature, log_target, epsilon)


def make_student_runner(cfg, num_classes: int, x_dis, t_dis, eval_sets, *, num_epochs: int):
  """Builds `run(keys [S], hparams) -> {name: logits [S, N, K]}` for the arrays `eval_sets`.

  `hparams` = {"temperature": [S], "smoothing": [S], "epsilon": [S, M] or [S, K, M]} (see
  `student_loss`). Each of the S students (its own initialisation and data order from its key,
  its own hyperparameters) is trained with Adam on mini-batches of the distillation set against
  the precomputed teacher logits `t_dis`; all S run in one `vmap`-ed, jitted program.
  """
  n = x_dis.shape[0]
  b = cfg.batch_size
  if n < b:
    raise ValueError(f"distillation set of {n} examples is smaller than batch_size={b}.")
  steps = n // b
  x_dis, t_dis = jnp.asarray(x_dis), jnp.asarray(t_dis)
  eval_sets = {k: jnp.asarray(v) for k, v in eval_sets.items()}
  tx = optax.adam(cfg.learning_rate)
  graphdef, _, _ = _init(cfg, num_classes, jax.random.key(0))

  def train_one(key, hp):
    init_key, data_key = jax.random.split(key)
    _, params, state = _init(cfg, num_classes, init_key)

    def step(carry, idx):
      params, state, opt = carry

      def loss_fn(p):
        out, new_state = apply_model(graphdef, p, state, x_dis[idx], train=True)
        return student_loss(out.logits, t_dis[idx], **hp).mean(), new_state

      (_, new_state), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt = tx.update(g, opt, params)
      return (optax.apply_updates(params, updates), new_state, opt), None

    def epoch(carry, k):
      order = jax.random.permutation(k, n)[:steps * b].reshape(steps, b)
      return jax.lax.scan(step, carry, order)[0], None

    carry = (params, state, tx.init(params))
    (params, state, _), _ = jax.lax.scan(epoch, carry, jax.random.split(data_key, num_epochs))
    return {k: _logits(graphdef, params, state, v) for k, v in eval_sets.items()}

  return jax.jit(jax.vmap(train_one))


def hparams(num: int, eps_shape, *, temperature=1.0, smoothing=0.0, epsilon=None):
  """[num] hyperparameter rows for `make_student_runner` (KD at T = 1 by default)."""
  eps = (np.zeros((num, *eps_shape), np.float32) if epsilon is None
         else np.broadcast_to(np.asarray(epsilon, np.float32), (num, *eps_shape)))
  return {"temperature": np.broadcast_to(np.asarray(temperature, np.float32), (num,)),
          "smoothing": np.broadcast_to(np.asarray(smoothing, np.float32), (num,)),
          "epsilon": eps}


def _concat(*hps):
  return {k: jnp.asarray(np.concatenate([h[k] for h in hps])) for k in hps[0]}


def _accuracy(logits, labels) -> np.ndarray:
  return np.mean(np.asarray(logits).argmax(-1) == np.asarray(labels)[None], axis=-1)


def _seed_keys(num: int, offset: int = 0):
  return jax.vmap(jax.random.key)(jnp.arange(offset, offset + num))


# -------------------------------------------------------------------------------------- run


def run(config, *, progress: bool | None = None) -> dict:
  """Runs the whole experiment described in the module docstring; returns the results dict."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  t0 = time.time()
  for who in ("teacher", "student"):
    precision.check(config[who], who)
  progress = config.progress if progress is None else progress
  stages = ["teacher", "selection", "tuning + correlation students", "method students"]
  bar = tqdm(total=len(stages), disable=not progress, desc="ptloss_digits", file=sys.stdout)

  def done(stage):
    bar.set_postfix_str(stage)
    bar.update(1)

  splits = data_lib.load_digits(seed=config.data_seed)
  k = splits.num_classes
  teach, dis = split_half(splits.train, config.data_seed)
  noisy = corrupt_labels(teach["label"], config.teacher.noise_rate, k, config.teacher.seed)
  val, test = splits.val, splits.test

  # 1. The teacher and its outputs, computed once.
  predict = train_teacher(config.teacher, teach["image"], noisy, k)
  t_dis = np.asarray(predict(dis["image"]))
  t_val = np.asarray(predict(val["image"]))
  t_test = np.asarray(predict(test["image"]))
  p_test = np.asarray(jax.nn.softmax(t_test))
  teacher = {
      "train_label_noise": float(np.mean(noisy != teach["label"])),
      "fit_noisy_train": float(np.mean(np.asarray(predict(teach["image"])).argmax(-1) == noisy)),
      "test_accuracy": float(np.mean(t_test.argmax(-1) == test["label"])),
      "distillation_set_accuracy": float(np.mean(t_dis.argmax(-1) == dis["label"])),
      "test_ece": expected_calibration_error(p_test, test["label"]),
      "test_mean_confidence": float(p_test.max(-1).mean()),
  }
  done("teacher")

  # 2. PTLoss coefficients from the validation split: no student trained.
  pc = config.ptloss
  sel = ptloss_lib.select_coefficients(
      t_val, val["label"], key=jax.random.key(pc.seed), order=pc.order,
      num_candidates=pc.num_candidates, distance=pc.distance, per_class=False,
      scale=pc.scale)
  scores = np.asarray(sel.scores)
  valid = np.asarray(sel.valid)
  candidates = np.asarray(sel.candidates)
  # Every student's epsilon is [K, M] (a class-shared [M] repeats one row for every class), so
  # class-shared and per-class PTLoss share one program.
  eps_shape = (k, pc.order)
  sel_pc, per_class = None, {"skipped": "config.ptloss.per_class_row is False"}
  if pc.per_class_row:
    sel_pc = ptloss_lib.select_coefficients(
        t_val, val["label"], key=jax.random.key(pc.seed), order=pc.order,
        num_candidates=pc.num_candidates, distance=pc.distance, per_class=True, scale=pc.scale)
    per_class = {"epsilon": np.asarray(sel_pc.epsilon).tolist(), "index": int(sel_pc.index),
                 "score": float(sel_pc.scores[sel_pc.index]),
                 "num_invalid": int(sel_pc.num_invalid)}
  proxy = np.asarray(losses.proxy_teacher(jax.nn.softmax(t_test), sel.epsilon).probs)
  selection = {
      "epsilon": np.asarray(sel.epsilon).tolist(), "index": int(sel.index),
      "score": float(scores[int(sel.index)]), "score_vanilla_teacher": float(scores[0]),
      "num_candidates": int(candidates.shape[0]), "num_invalid": int(sel.num_invalid),
      "proxy_test_ece": expected_calibration_error(proxy, test["label"]),
      "proxy_test_accuracy": float(np.mean(proxy.argmax(-1) == test["label"])),
      "proxy_test_mean_confidence": float(proxy.max(-1).mean()),
      "per_class": per_class,
  }
  done("selection")

  sc = config.student
  run_students = make_student_runner(
      sc, k, dis["image"], t_dis, {"val": val["image"], "test": test["image"]},
      num_epochs=sc.num_epochs)

  # 3. Students for the validation grids (KD's T, the smoothing weight) and for the correlation
  # (candidates spread evenly over the ranks of the valid scores), one program.
  t_grid = np.asarray(config.kd_temperatures, np.float32)
  a_grid = np.asarray(config.smoothing_weights, np.float32)
  ranked = np.flatnonzero(valid)[np.argsort(scores[valid], kind="stable")]
  pick = ranked[np.unique(np.linspace(0, ranked.shape[0] - 1, config.correlation.num_candidates)
                          .round().astype(int))]
  hp = _concat(hparams(len(t_grid), eps_shape, temperature=t_grid),
               hparams(len(a_grid), eps_shape, smoothing=a_grid),
               hparams(len(pick), eps_shape, epsilon=candidates[pick][:, None, :]))
  out = run_students(_seed_keys(len(hp["temperature"]), offset=1000), hp)
  val_acc = _accuracy(out["val"], val["label"])
  test_acc = _accuracy(out["test"], test["label"])
  nt, na = len(t_grid), len(a_grid)
  best_t = float(t_grid[int(np.argmax(val_acc[:nt]))])
  best_a = float(a_grid[int(np.argmax(val_acc[nt:nt + na]))])
  tuning = {"kd": dict(zip(t_grid.tolist(), val_acc[:nt].tolist())),
            "smoothing": dict(zip(a_grid.tolist(), val_acc[nt:nt + na].tolist()))}
  acc_c, score_c = test_acc[nt + na:], scores[pick]
  correlation = {
      "candidate_index": pick.tolist(), "score": score_c.tolist(),
      "test_accuracy": acc_c.tolist(), "val_accuracy": val_acc[nt + na:].tolist(),
      "pearson": float(stats.pearsonr(score_c, acc_c)[0]),
      "spearman": float(stats.spearmanr(score_c, acc_c)[0]),
  }
  done("tuning + correlation students")

  # 4. Every method over the same seeds (same initialisations and data orders: paired).
  s = config.num_seeds
  rng = np.random.default_rng(pc.seed)
  random_pool = np.flatnonzero(valid & (np.arange(valid.shape[0]) != 0))
  random_idx = rng.choice(random_pool, size=s, replace=random_pool.shape[0] < s)
  plans = {
      "kd_t1": (hparams(s, eps_shape), "T=1"),
      "kd_tuned": (hparams(s, eps_shape, temperature=best_t), f"T={best_t:g} (val)"),
      "label_smoothing": (hparams(s, eps_shape, smoothing=best_a),
                          f"teacher soft labels, a={best_a:g} (val)"),
      "ptloss_selected": (hparams(s, eps_shape, epsilon=sel.epsilon),
                          f"select_coefficients, shared, M={pc.order}"),
      "ptloss_selected_per_class": (
          hparams(s, eps_shape, epsilon=None if sel_pc is None else sel_pc.epsilon),
          f"select_coefficients, per class [K, {pc.order}]"),
      "ptloss_random": (hparams(s, eps_shape, epsilon=candidates[random_idx][:, None, :]),
                        "random valid eps (one per seed)"),
  }
  if sel_pc is None:
    del plans["ptloss_selected_per_class"]
  keys = jnp.concatenate([_seed_keys(s)] * len(plans))
  out = run_students(keys, _concat(*[h for h, _ in plans.values()]))
  val_acc = _accuracy(out["val"], val["label"]).reshape(len(plans), s)
  test_acc = _accuracy(out["test"], test["label"]).reshape(len(plans), s)
  results = {}
  for i, (name, (_, desc)) in enumerate(plans.items()):
    results[name] = {"setting": desc, "test_accuracy": test_acc[i].tolist(),
                     "mean": float(test_acc[i].mean()),
                     "std": float(test_acc[i].std(ddof=1)) if s > 1 else 0.0,
                     "val_accuracy_mean": float(val_acc[i].mean())}
  results["ptloss_random"]["epsilon_index"] = random_idx.tolist()
  done("method students")
  bar.close()
  return {"teacher": teacher, "selection": selection,
          "kd_temperature_val_accuracy": tuning["kd"],
          "smoothing_val_accuracy": tuning["smoothing"],
          "methods": results, "correlation": correlation, "num_seeds": s,
          "seconds": time.time() - t0, "config": config.to_dict()}


def format_table(res: dict) -> str:
  """The results as a plain-text table."""
  t, sel, c = res["teacher"], res["selection"], res["correlation"]
  lines = [
      f"teacher: test acc {t['test_accuracy']:.3f}, ECE {t['test_ece']:.3f}, mean confidence "
      f"{t['test_mean_confidence']:.3f} (trained on {t['train_label_noise']:.0%} wrong labels, "
      f"fits them {t['fit_noisy_train']:.0%})",
      f"proxy teacher (selected eps, candidate {sel['index']} of {sel['num_candidates']}, "
      f"{sel['num_invalid']} rejected): test acc {sel['proxy_test_accuracy']:.3f}, ECE "
      f"{sel['proxy_test_ece']:.3f}; val score {sel['score']:.4f} vs teacher "
      f"{sel['score_vanilla_teacher']:.4f}",
      "",
      f"{'method':<27}{'setting':<40}{'test accuracy (mean ± std, ' + str(res['num_seeds'])}"
      " seeds)",
  ]
  for name, r in res["methods"].items():
    lines.append(f"{name:<27}{r['setting']:<40}{r['mean']:.4f} ± {r['std']:.4f}")
  lines += ["", f"closeness score vs student test accuracy over {len(c['score'])} candidates: "
            f"Pearson {c['pearson']:+.3f}, Spearman "
            f"{c['spearman']:+.3f} (negative: closer proxy, better student)",
            f"total {res['seconds']:.0f} s"]
  return "\n".join(lines)


def _to_jsonable(x):
  if isinstance(x, dict):
    return {str(k): _to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_jsonable(v) for v in x]
  if isinstance(x, (np.generic,)):
    return x.item()
  return x


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  res = run(flags.FLAGS.config)
  print(format_table(res))
  if flags.FLAGS.out:  # atomically: a kill leaves the previous file (or none), never half
    from experiments import _cli  # pylint: disable=g-import-not-at-top
    _cli.write_json(flags.FLAGS.out, _to_jsonable(res), indent=1)
  return 0


if __name__ == "__main__":
  import os  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from experiments import _cli  # pylint: disable=g-import-not-at-top
  _default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "ptloss_digits.py")
  _cli.precheck(_default)  # a missing --config file or unknown key: one line, before absl
  config_flags.DEFINE_config_file("config", _default, "experiments/configs/ptloss_digits.py")
  flags.DEFINE_string("out", "", "write the results as JSON here")
  _cli.run(main, _default)  # errors: one line (`error: ...`), `--verbose` for the traceback
