"""Cost of each distillation loss alone, against the matmul it is built on.

The one idea: a loss is cheap enough when it costs about what its unavoidable core costs. For
each loss of `kd_jax.losses` on realistic CIFAR shapes (B = 64 / 256, K = 100 classes,
resnet8x4/resnet32x4 `pre_pool` maps [B, 8, 8, 256], embeddings [B, 256]) this times the jitted
forward and forward+backward (gradient with respect to the student input) and the jitted
reference matmul:

  kd, dkd, ptloss   the classifier matmul that makes the logits, [B, 256] @ [256, K]
  sp                the Gram matrix of the flattened map, [B, 16384] @ [16384, B]
  rkd               the angle tensor, einsum("ijd,ikd->ijk") on [B, B, 256]
  pkt, cc           the embedding Gram, [B, 256] @ [256, B]
  crd               scoring the memory-bank rows, einsum("bkd,bd->bk") on [B, K, 128] (K
                    negatives, default 4096 here; RepDistiller uses 16384)

and prints ms and the ratios loss forward / matmul forward and loss forward+backward / matmul
forward+backward (gradient of the matmul's sum with respect to its first operand), interleaved
rounds, medians.

    python benchmarks/losses.py            # B = 64 and 256
    python benchmarks/losses.py --batches 64 --losses kd,sp
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _timing  # pylint: disable=g-import-not-at-top


def _cases(b: int, k: int, num_neg: int):
  """name -> (loss fn(student, teacher, *extra), student shape, teacher shape,
  (ref fn, ref shapes), extra shapes)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kd_jax import losses  # pylint: disable=g-import-not-at-top

  labels = jnp.arange(b, dtype=jnp.int32) % k
  logits_ref = (lambda a, w: a @ w, [(b, 256), (256, k)])
  cases = {
      "kd": (lambda s, t: jnp.mean(losses.kd(s, t, temperature=4.0)), (b, k), (b, k), logits_ref),
      "dkd": (lambda s, t: jnp.mean(losses.dkd(s, t, labels, alpha=1.0, beta=8.0,
                                               temperature=4.0)), (b, k), (b, k), logits_ref),
      "ptloss": (lambda s, t: jnp.mean(losses.ptloss(s, t, jnp.asarray([0.1]), temperature=4.0)),
                 (b, k), (b, k), logits_ref),
      "sp": (lambda s, t: losses.sp(s, t), (b, 8, 8, 256), (b, 8, 8, 256),
             (lambda a, c: a @ c.T, [(b, 8 * 8 * 256), (b, 8 * 8 * 256)])),
      "rkd": (lambda s, t: losses.rkd(s, t), (b, 256), (b, 256),
              (lambda u, v: jnp.einsum("ijd,ikd->ijk", u, v), [(b, b, 256), (b, b, 256)])),
      "pkt": (lambda s, t: losses.pkt(s, t), (b, 256), (b, 256),
              (lambda a, c: a @ c.T, [(b, 256), (b, 256)])),
      "cc": (lambda s, t: losses.cc(s, t), (b, 256), (b, 256),
             (lambda a, c: a @ c.T, [(b, 256), (b, 256)])),
  }
  cases = {name: case + ((),) for name, case in cases.items()}
  if hasattr(losses, "crd"):
    cases["crd"] = (
        lambda s, t, neg_s, neg_t: jnp.mean(losses.crd(s, t, neg_s, neg_t, num_data=50_000,
                                                       normalizers=(1.0, 1.0))),
        (b, 128), (b, 128),
        (lambda m, e: jnp.einsum("bkd,bd->bk", m, e), [(b, num_neg, 128), (b, 128)]),
        ((b, num_neg, 128), (b, num_neg, 128)))
  return cases


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batches", default="64,256")
  p.add_argument("--losses", default="kd,dkd,ptloss,sp,rkd,pkt,cc,crd")
  p.add_argument("--crd-negatives", type=int, default=4096)
  p.add_argument("--classes", type=int, default=100)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=10)
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  print(_timing.machine_line())
  print(f"jax {jax.__version__}, backend {jax.default_backend()}")
  rng = np.random.default_rng(0)

  def arr(shape):
    return jax.numpy.asarray(rng.standard_normal(shape, np.float32))

  def runner(fn, *xs):
    def one():
      jax.block_until_ready(fn(*xs))
    return lambda n: _timing.time_steps(one, n)

  rows = []
  for b in (int(x) for x in args.batches.split(",")):
    cases = _cases(b, args.classes, args.crd_negatives)
    for name in args.losses.split(","):
      case = cases.get(name)
      if case is None:
        print(f"  {name}: not available here, skipped")
        continue
      fn, s_shape, t_shape, (ref, ref_shapes), extra_shapes = case
      s, t = arr(s_shape), arr(t_shape)
      extra = [arr(sh) for sh in extra_shapes]
      fwd = jax.jit(fn)
      fwd_bwd = jax.jit(jax.value_and_grad(fn))
      ref_j = jax.jit(ref)
      ref_fb = jax.jit(jax.value_and_grad(lambda a, c, ref=ref: jax.numpy.sum(ref(a, c))))
      ref_args = [arr(sh) for sh in ref_shapes]
      cs = [_timing.Contestant("fwd", runner(fwd, s, t, *extra)),
            _timing.Contestant("fwd+bwd", runner(fwd_bwd, s, t, *extra)),
            _timing.Contestant("matmul", runner(ref_j, *ref_args)),
            _timing.Contestant("matmul fwd+bwd", runner(ref_fb, *ref_args))]
      _timing.interleave(cs, args.rounds, args.steps, warmup=2, verbose=False)
      f, fb, mm, mmb = cs
      row = (name, b, 1e3 * f.median_s, 1e3 * fb.median_s, 1e3 * mm.median_s,
             1e3 * mmb.median_s, _timing.paired_ratio(f, mm), _timing.paired_ratio(fb, mmb))
      rows.append(row)
      print(f"{name:7s} B={b:<4d} fwd {row[2]:8.3f} ms  fwd+bwd {row[3]:8.3f} ms  matmul "
            f"{row[4]:8.3f} / {row[5]:8.3f} ms  ratios {row[6]:6.2f} / {row[7]:6.2f}", flush=True)
  print("\n| loss | B | fwd ms | fwd+bwd ms | matmul fwd ms | matmul fwd+bwd ms | fwd / matmul "
        "| fwd+bwd / matmul fwd+bwd |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.2f} "
          f"| {r[7]:.2f} |")


if __name__ == "__main__":
  main()
