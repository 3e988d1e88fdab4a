"""Teachers' Orbax trajectories (save/restore), every teacher's forward pass, and a tiny
end-to-end HetComp distillation on synthetic data."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax.recsys import data, distill, knowledge, metrics, teachers


def test_trajectory_epoch_rule():
  assert teachers.trajectory_epochs(40) == [5, 10, 20, 40]
  assert teachers.trajectory_epochs(16) == [2, 4, 8, 16]
  assert teachers.trajectory_epochs(4) == [1, 2, 3, 4]
  with pytest.raises(ValueError, match="distinct"):
    teachers.trajectory_epochs(2)


def test_trajectory_save_restore(tiny_split, tmp_path):
  spec = teachers.TeacherSpec(teachers.MF, 4, 4, 1e-2, 64)
  traj = teachers.train_teacher("mf", tiny_split, str(tmp_path / "mf"), seed=0, spec=spec,
                                select="epochs")
  assert traj.epochs == [1, 2, 3, 4] and traj.valid_recall is None
  ctx = teachers.make_context(tiny_split)
  restored = [teachers.restore_teacher("mf", tiny_split, traj.directory, e, spec=spec)
              for e in traj.epochs]
  users = np.arange(5)
  s = [np.asarray(teachers.score_fn(m, ctx)(users)) for m in restored]
  # checkpoints differ along the trajectory and differ from the fresh initialisation
  fresh = teachers.build_teacher("mf", tiny_split, jax.random.key(0), spec)
  assert not np.allclose(s[0], s[-1])
  assert not np.allclose(np.asarray(fresh.scores(users)), s[-1])
  # restoring twice gives identical parameters
  again = teachers.restore_teacher("mf", tiny_split, traj.directory, 4, spec=spec)
  np.testing.assert_array_equal(again.user[...], restored[-1].user[...])
  with pytest.raises(ValueError, match="saved epochs"):
    teachers.restore_teacher("mf", tiny_split, traj.directory, 7, spec=spec)


def test_validation_quality_trajectory_rule():
  # best 1.0 at epoch 6; 80 / 90 / 95 % of it first reached at epochs 3, 4 and 5
  assert teachers.select_trajectory([0.1, 0.5, 0.8, 0.9, 0.95, 1.0, 0.99]) == [3, 4, 5, 6]
  # levels reached late are moved earlier so that each checkpoint keeps its own epoch
  assert teachers.select_trajectory([0.1, 0.2, 0.3, 0.95, 0.96, 1.0]) == [3, 4, 5, 6]
  # only improving epochs count: epoch 3 (0.7 < 0.9 reached at epoch 2) is never chosen
  assert teachers.select_trajectory([0.1, 0.9, 0.7, 0.92, 0.96, 1.0]) == [2, 4, 5, 6]
  assert teachers.select_trajectory([0.5, 0.6, 0.7, 1.0], (0.5,)) == [1, 4]
  with pytest.raises(ValueError, match="improve the validation"):
    teachers.select_trajectory([0.5, 0.4, 0.6, 0.3])
  with pytest.raises(ValueError, match="fractions"):
    teachers.select_trajectory([0.1, 0.2, 0.3, 0.4], (0.9, 0.8, 0.95))


def test_validation_selected_trajectory_is_saved_and_measured(make_interactions, tmp_path):
  # a catalogue larger than 50 items, so that validation Recall@50 can move
  split = data.split_per_user(make_interactions(num_users=60, num_items=200, per_user=30))
  spec = teachers.TeacherSpec(teachers.MF, 8, 8, 5e-3, 128)
  traj = teachers.train_teacher("mf", split, str(tmp_path / "mf"), seed=0, spec=spec,
                                fractions=(0.5,))
  assert len(traj.valid_recall) == 8
  assert traj.epochs == teachers.select_trajectory(traj.valid_recall, (0.5,))
  assert traj.epochs[-1] == int(np.argmax(traj.valid_recall)) + 1
  # only the selected checkpoints stay on disk, and each holds the model that was measured
  with pytest.raises(ValueError, match="saved epochs"):
    teachers.restore_teacher("mf", split, traj.directory, 8 if traj.epochs[-1] != 8 else 7,
                             spec=spec)
  ctx = teachers.make_context(split)
  for e in traj.epochs:
    m = teachers.restore_teacher("mf", split, traj.directory, e, spec=spec)
    got = metrics.evaluate(teachers.score_fn(m, ctx), split, "valid")["recall@50"]
    assert got == pytest.approx(traj.valid_recall[e - 1], abs=1e-12)


@pytest.mark.parametrize("name", teachers.TEACHER_NAMES)
def test_every_teacher_scores_and_learns(tiny_split, name):
  spec = dataclasses.replace(teachers.DEFAULT_SPECS[name], dim=8, batch_size=32)
  model = teachers.build_teacher(name, tiny_split, jax.random.key(1), spec)
  ctx = teachers.make_context(tiny_split)
  s = model.scores(jnp.arange(3), ctx)
  assert s.shape == (3, tiny_split.num_items) and np.all(np.isfinite(s))
  tx = optax.adam(1e-2)
  _, params, epoch = teachers.make_epoch_fn(model, tx, tiny_split.num_items)
  opt = tx.init(params)
  batches = jax.tree.map(jnp.asarray, teachers._epoch_batches(
      model.batch_kind, tiny_split, spec.batch_size, np.random.default_rng(0)))
  losses = []
  for e in range(6):
    params, opt, loss = epoch(params, opt, jax.random.key(e), batches, ctx)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def _tiny_knowledge(split):
  rng = np.random.default_rng(0)
  u, i = split.num_users, split.num_items
  tables = [[jnp.asarray(rng.normal(size=(u, i)), jnp.float32) for _ in range(4)]
            for _ in range(2)]
  scorers = [[lambda x, t=t: t[jnp.asarray(x)] for t in row] for row in tables]
  return knowledge.build_knowledge(scorers, split, top_n=12, num_observed=3, chunk_size=64)


# shared by the distillation tests, so that their phase-B steps compile once
_TINY = dict(top_k=12, lr=1e-2, batch_size=24, alpha=1.0)


def test_hetcomp_distillation_end_to_end(tiny_split):
  know = _tiny_knowledge(tiny_split)
  # DKC every 2 steps, evaluation every 4: blocks of 2 steps
  cfg = distill.DistillConfig(period_steps=2, eval_every_steps=4, patience_steps=4,
                              max_steps=40, debias="weight", **_TINY)
  res = distill.distill(tiny_split, know, cfg)
  assert np.isfinite(res.test["recall@10"]) and res.best_step % 4 == 0
  assert [h["step"] for h in res.history] == list(range(4, res.steps_run + 1, 4))
  assert [t["step"] for t in res.dkc_trace][:2] == [2, 4]
  if res.capped:
    assert res.steps_run == 40
  else:  # stopped by patience, counted from the later of the best step and DKC's end
    assert res.steps_run - max(res.best_step, res.dkc_finished_step) >= 4
  for leaf in jax.tree.leaves(res.params):
    assert np.all(np.isfinite(leaf))
  d = distill.all_discrepancies(res.params, know, distill.train_lists(tiny_split))
  assert d.shape == (tiny_split.num_users, 2, 4) and np.all((d >= 0) & (d <= 1))


def test_schedule_in_steps_cap_and_rrd(tiny_split):
  know = _tiny_knowledge(tiny_split)
  per_epoch = -(-len(tiny_split.pairs("train")[0]) // _TINY["batch_size"])
  assert per_epoch > 8 and per_epoch % 8  # the cap below ends mid-epoch
  for method in ("all_at_once", "rrd"):
    cfg = distill.DistillConfig(method=method, max_steps=8, eval_every_steps=2,
                                patience_steps=1000, **_TINY)
    res = distill.distill(tiny_split, know, cfg)
    assert res.capped and res.steps_run == 8 and res.steps_per_epoch == per_epoch
    assert [h["step"] for h in res.history] == [2, 4, 6, 8] and res.dkc_finished_step == 0
    assert np.isfinite(res.test["ndcg@10"])
  with pytest.raises(ValueError, match="period_steps must be a positive int"):
    distill.distill(tiny_split, know, distill.DistillConfig(period_steps=0))
  with pytest.raises(ValueError, match="needs DistillConfig.max_steps"):
    distill.distill(tiny_split, know, distill.DistillConfig(), evaluate=False)
  with pytest.raises(ValueError, match="DKC may never finish"):
    distill.distill(tiny_split, know, distill.DistillConfig(decay=1.0, advance_on_drift=False))
  with pytest.raises(ValueError, match="method must be one of"):
    distill.distill(tiny_split, know, distill.DistillConfig(method="all"))


def test_uniform_from_draws_only_pool_items_uniformly():
  pool = np.zeros((3, 10), bool)
  pool[0, [1, 4, 7]] = True
  pool[1] = True
  ids, has = distill.uniform_from(jax.random.key(0), jnp.asarray(pool), 6000)
  ids = np.asarray(ids)
  assert list(np.asarray(has)) == [True, True, False]
  assert set(ids[0]) == {1, 4, 7} and set(ids[1]) == set(range(10))
  # chi-square against uniform: 3 and 10 cells
  for row, cells in ((0, [1, 4, 7]), (1, list(range(10)))):
    counts = np.array([(ids[row] == c).sum() for c in cells])
    exp = 6000 / len(cells)
    assert np.sum((counts - exp) ** 2 / exp) < 30


def test_rejection_negatives_avoid_training_items():
  train = np.zeros((2, 8), bool)
  train[0, :6] = True  # 2 of 8 items free: some draws stay on training items after 4 rounds
  ids, ok = distill.rejection_negatives(jax.random.key(1), jnp.asarray(train), 4000)
  ids, ok = np.asarray(ids), np.asarray(ok)
  assert np.all(~train[np.arange(2)[:, None], ids] == ok)  # ok exactly where off-train
  assert ok[1].all() and set(ids[1]) == set(range(8))
  assert set(ids[0][ok[0]]) == {6, 7}
  assert abs((~ok[0]).mean() - 0.75 ** 4) < 0.03  # four rounds of rejection
