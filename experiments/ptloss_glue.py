"""PTLoss in the paper's domain: distil a transformer text classifier on a GLUE-style task.

Zhang et al., "Knowledge Distillation with Perturbed Loss" (KDD 2024; docs/ptloss.md):

  python -m experiments.ptloss_glue --config.task=rte --out=results_rte.json

1. A teacher (`text_transformer`, experiments/configs/ptloss_glue.py) is trained with
   cross-entropy on the task's training split (minus a dev slice), with the library's train step
   (`kd_jax.train.step.make_train_step`).
2. Its logits on the dev slice choose PTLoss's coefficients with
   `kd_jax.ptloss.select_coefficients` (no student trained).
3. A smaller student is distilled from the teacher's soft labels only (alpha = 0) with each
   method of `config.methods`: "kd" (epsilon = 0, plain KL at T = 1) and "ptloss" (the selected
   epsilon), the teacher running inside the same jitted step.
4. Test accuracy on the task's labelled validation split; a table and `--out` JSON.

Data: `kd_jax.data.glue` (TFDS `data_source`, hashing tokenizer, Grain). The pipeline is tested
end to end offline on `tfds.testing.mock_data` (tests/test_ptloss_experiments.py).
"""

from __future__ import annotations

import itertools
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx

from experiments import precision
from kd_jax import compile_options
from kd_jax import models
from kd_jax import ptloss as ptloss_lib
from kd_jax.data import glue as glue_lib
from kd_jax.models import text as _text  # noqa: F401  (registers "text_transformer")
from kd_jax import train as train_lib
from kd_jax.train.evaluate import predict_logits

INPUT_KEY = "tokens"


def _model(config, cfg, num_classes, seed):
  """The text transformer with `cfg.options` and its compute dtype (experiments/precision.py)."""
  return models.create("text_transformer", num_classes=num_classes, rngs=nnx.Rngs(seed),
                       vocab_size=config.vocab_size, max_len=config.max_len,
                       **precision.model_options(cfg))


def _train(state, step_fn, batches, num_steps, desc, progress, teacher_variables=None):
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  metrics = {}
  for batch in tqdm(itertools.islice(batches, num_steps), total=num_steps, desc=desc,
                    disable=not progress, file=sys.stdout):
    if teacher_variables is None:
      state, metrics = step_fn(state, batch)
    else:
      state, metrics = step_fn(state, batch, teacher_variables)
  return state, {k: float(v) for k, v in jax.device_get(metrics).items()}


def _logits_and_labels(graphdef, variables, batches):
  batches = list(batches)
  logits = predict_logits(graphdef, variables, batches, input_key=INPUT_KEY)
  labels = np.concatenate([np.asarray(b["label"])[np.asarray(b["mask"])] for b in batches])
  return logits, labels


def run(config, *, progress: bool | None = None) -> dict:
  """Teacher, coefficient selection, one student per method; returns the results dict."""
  t0 = time.time()
  for who in ("teacher", "student"):
    precision.check(config[who], who)
  progress = config.progress if progress is None else progress
  task = glue_lib.task(config.task)
  k = task.num_classes
  tok = glue_lib.HashTokenizer(config.vocab_size, config.max_len)
  splits = glue_lib.splits_of(config.task, dev_fraction=config.dev_fraction)
  data_dir = config.data_dir or None

  def train_stream(seed):
    return glue_lib.glue(config.task, splits["train"], tokenizer=tok,
                         batch_size=config.batch_size, train=True, seed=seed, data_dir=data_dir)

  def eval_stream(split):
    return glue_lib.glue(config.task, splits[split], tokenizer=tok,
                         batch_size=config.eval_batch_size, train=False, data_dir=data_dir)

  def optimizer(c):
    return optax.adamw(c.learning_rate, weight_decay=c.weight_decay)

  # 1. Teacher.
  teacher = _model(config, config.teacher, k, config.seed)
  state = train_lib.TrainState.create(teacher, optimizer(config.teacher),
                                      rng=jax.random.key(config.seed))
  step = compile_options.jit(train_lib.make_train_step("ce", axis_name=None, input_key=INPUT_KEY))
  state, teacher_train = _train(state, step, train_stream(config.seed), config.teacher.num_steps,
                                "teacher", progress)
  t_graphdef, t_vars = state.graphdef, state.variables()
  t_eval = train_lib.make_eval_step(t_graphdef, input_key=INPUT_KEY)
  results = {"task": config.task, "splits": splits,
             "teacher": {"test": train_lib.evaluate(t_eval, t_vars, eval_stream("test")),
                         "last_train_metrics": teacher_train}}

  # 2. PTLoss coefficients from the dev slice.
  dev_logits, dev_labels = _logits_and_labels(t_graphdef, t_vars, eval_stream("dev"))
  pc = config.ptloss
  sel = ptloss_lib.select_coefficients(
      dev_logits, dev_labels, key=jax.random.key(config.seed), order=pc.order,
      num_candidates=pc.num_candidates, distance=pc.distance, per_class=pc.per_class,
      scale=pc.scale)
  epsilon = np.asarray(sel.epsilon)
  results["selection"] = {
      "epsilon": epsilon.tolist(), "index": int(sel.index), "score": float(sel.scores[sel.index]),
      "score_vanilla_teacher": float(sel.scores[0]), "num_invalid": int(sel.num_invalid),
      "dev_examples": int(dev_labels.shape[0])}

  # 3. Students, distilled from the teacher's soft labels only.
  results["students"] = {}
  for method in config.methods:
    if method not in ("kd", "ptloss"):
      raise ValueError(f"unknown method {method!r}; expected 'kd' or 'ptloss'.")
    eps = np.zeros_like(epsilon) if method == "kd" else epsilon
    student = _model(config, config.student, k, config.seed + 1)
    state = train_lib.TrainState.create(student, optimizer(config.student),
                              rng=jax.random.key(config.seed + 1))
    step = compile_options.jit(train_lib.make_train_step("ptloss", teacher_graphdef=t_graphdef,
                                   loss_options={"ptloss": {"epsilon": eps.tolist()}},
                                   axis_name=None, input_key=INPUT_KEY))
    state, train_metrics = _train(state, step, train_stream(config.seed + 1),
                                  config.student.num_steps, method, progress,
                                  teacher_variables=t_vars)
    s_eval = train_lib.make_eval_step(state.graphdef, input_key=INPUT_KEY)
    results["students"][method] = {
        "test": train_lib.evaluate(s_eval, state.variables(), eval_stream("test")),
        "epsilon": eps.tolist(), "last_train_metrics": train_metrics}
  results["seconds"] = time.time() - t0
  results["config"] = config.to_dict()
  return results


def format_table(res: dict) -> str:
  """The results as a plain-text table."""
  sel = res["selection"]
  lines = [f"task {res['task']}: teacher test accuracy {res['teacher']['test']['accuracy']:.4f}",
           f"selected candidate {sel['index']} (dev score {sel['score']:.4f} vs teacher "
           f"{sel['score_vanilla_teacher']:.4f}, {sel['num_invalid']} rejected)",
           f"{'student':<10}test accuracy"]
  for name, r in res["students"].items():
    lines.append(f"{name:<10}{r['test']['accuracy']:.4f}")
  return "\n".join(lines)


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  res = run(flags.FLAGS.config)
  print(format_table(res))
  if flags.FLAGS.out:  # atomically: a kill leaves the previous file (or none), never half
    from experiments import _cli  # pylint: disable=g-import-not-at-top
    _cli.write_json(flags.FLAGS.out, res, indent=1,
                    default=lambda x: x.item() if hasattr(x, "item") else str(x))
  return 0


if __name__ == "__main__":
  import os  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from experiments import _cli  # pylint: disable=g-import-not-at-top
  _default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "ptloss_glue.py")
  _cli.precheck(_default)  # a missing --config file or unknown key: one line, before absl
  config_flags.DEFINE_config_file("config", _default, "experiments/configs/ptloss_glue.py")
  flags.DEFINE_string("out", "", "write the results as JSON here")
  _cli.run(main, _default)  # errors: one line (`error: ...`), `--verbose` for the traceback
