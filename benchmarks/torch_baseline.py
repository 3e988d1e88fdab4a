"""The anchors' eager PyTorch KD training step, timed: the baseline kd_jax has to beat.

The one idea: reproduce what one iteration of RepDistiller's `train_distill` (and mdistiller's
KD trainer) costs on this machine, so that kd_jax's step can be compared with it as a ratio:

    with torch.no_grad(): t_logits = teacher(x)          # teacher.eval(): BN running statistics
    s_logits = student(x)                                # student.train()
    loss = 0.1 * CE(s_logits, y) + 0.9 * KL(softmax(t/T) || softmax(s/T)) * T^2,  T = 4
    optimizer.zero_grad(); loss.backward(); optimizer.step()   # SGD, momentum 0.9, wd 5e-4

with KL summed over classes and averaged over the batch (RepDistiller `DistillKL`: `kl_div(...,
reduction='sum') / B * T^2`). Modes `student` (the CE-only step of the same student) and
`teacher` (the teacher forward alone) give the parts of the step.

Runs only in an interpreter that has torch (never a kd_jax dependency):

    $KD_JAX_TORCH_PYTHON benchmarks/torch_baseline.py --pair resnet32x4:resnet8x4 --batch 64
    ... --serve        # JSON-lines server used by train_step.py to interleave measurements
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _timing  # pylint: disable=g-import-not-at-top
import torch_models  # pylint: disable=g-import-not-at-top

import torch  # pylint: disable=g-import-not-at-top,g-bad-import-order
from torch.nn import functional as F  # pylint: disable=g-import-not-at-top,g-bad-import-order

MODES = ("kd", "student", "teacher", "study")


def distill_kl(s_logits, t_logits, temperature: float):
  """RepDistiller DistillKL: KL(p_t^T || p_s^T) summed over classes, / batch, * T^2."""
  log_ps = F.log_softmax(s_logits / temperature, dim=1)
  pt = F.softmax(t_logits / temperature, dim=1)
  return F.kl_div(log_ps, pt, reduction="sum") * temperature**2 / s_logits.shape[0]


def build_step(teacher: str, student: str, batch: int, mode: str = "kd", num_classes: int = 100,
               seed: int = 0, channels_last: bool = False, device: str = "cpu",
               amp: str | None = None, temperatures=(4.0,), num_seeds: int = 1):
  """Returns a zero-argument callable that performs one step of `mode` on a fixed batch.

  `device`: "cpu" or e.g. "cuda" (the step then waits for the device before returning);
  `amp`: None (float32) or "bfloat16" (`torch.autocast`: bfloat16 compute, float32 weights).
  Mode "study": len(temperatures) x num_seeds students (each its own network and optimizer,
  CE 0.1 + KD 0.9 at its temperature), one KD step each, one after another, each with its own
  teacher forward: one step of as many separate RepDistiller runs.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if mode == "study":
    steps = [build_step(teacher, student, batch, "kd", num_classes, seed + 10 * i + j,
                        channels_last, device, amp, temperatures=(t,))
             for i, t in enumerate(temperatures) for j in range(num_seeds)]

    def study_step():
      for one in steps:
        one()
    return study_step
  temperature = float(temperatures[0])
  torch.manual_seed(seed)
  dev = torch.device(device)
  x = torch.randn(batch, 3, 32, 32)
  y = torch.randint(0, num_classes, (batch,)).to(dev)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  x = x.contiguous(memory_format=fmt).to(dev)
  t_net = torch_models.create(teacher, num_classes).to(dev, memory_format=fmt).eval()
  for p in t_net.parameters():
    p.requires_grad_(False)
  s_net = torch_models.create(student, num_classes).to(dev, memory_format=fmt).train()
  opt = torch.optim.SGD(s_net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
  amp_dtype = getattr(torch, amp) if amp else torch.bfloat16
  autocast = lambda: torch.autocast(dev.type, dtype=amp_dtype, enabled=amp is not None)  # noqa: E731
  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

  if mode == "teacher":
    def step():
      with torch.no_grad(), autocast():
        t_net(x, is_feat=True)
      sync()
    return step

  def step():
    with autocast():
      if mode == "kd":
        with torch.no_grad():
          t_logits, _ = t_net(x, is_feat=True)
      s_logits, _ = s_net(x, is_feat=True)
      s_logits = s_logits.float()
      loss = F.cross_entropy(s_logits, y)
      if mode == "kd":
        loss = 0.1 * loss + 0.9 * distill_kl(s_logits, t_logits.float(), temperature)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sync()
    return loss
  return step


def _info(threads: int) -> dict:
  return {"torch": torch.__version__, "threads": threads,
          "mkldnn": bool(torch.backends.mkldnn.is_available()),
          "cuda": bool(torch.cuda.is_available()),
          "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def serve(threads: int):
  """JSON-lines server (see _timing.TorchWorker): setup once, then timed runs on request."""
  step = None
  for line in sys.stdin:
    msg = json.loads(line)
    try:
      if msg["cmd"] == "hello":
        reply = {"info": _info(threads)}
      elif msg["cmd"] == "setup":
        kw = {k: v for k, v in msg.items() if k != "cmd"}
        step = build_step(**kw)
        reply = {"ok": True}
      elif msg["cmd"] == "run":
        ts = _timing.time_steps(step, msg["n"])
        reply = {"times": list(ts), "cpu": ts.cpu}
      elif msg["cmd"] == "quit":
        return
      else:
        reply = {"error": f"unknown command {msg['cmd']!r}"}
    except Exception as e:  # pylint: disable=broad-except
      reply = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--pair", default="resnet32x4:resnet8x4", help="teacher:student")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--mode", default="all", choices=MODES + ("all",))
  p.add_argument("--steps", type=int, default=5, help="timed steps per round")
  p.add_argument("--rounds", type=int, default=4)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--channels-last", action="store_true")
  p.add_argument("--serve", action="store_true")
  args = p.parse_args(argv)
  torch.set_num_threads(args.threads)
  if args.serve:
    serve(args.threads)
    return
  teacher, student = args.pair.split(":")
  print(_timing.machine_line())
  print(f"torch {torch.__version__}, threads {args.threads}, {args.pair}, batch {args.batch}")
  modes = MODES[:3] if args.mode == "all" else (args.mode,)
  cs = []
  for mode in modes:
    step = build_step(teacher, student, args.batch, mode, channels_last=args.channels_last)
    cs.append(_timing.Contestant(mode, lambda n, s=step: _timing.time_steps(s, n)))
  _timing.interleave(cs, args.rounds, args.steps, args.warmup)
  for c in cs:
    print(f"pytorch {c.name:8s} {1e3 * c.median_s:8.1f} ms/step  "
          f"{args.batch / c.median_s:8.1f} images/s  (CPU {1e3 * c.cpu_median_s:8.1f} ms/step)")
  if args.mode == "all":
    kd, st, te = cs
    print(f"KD / (student + teacher) = {kd.median_s / (st.median_s + te.median_s):.3f}")


if __name__ == "__main__":
  main()
