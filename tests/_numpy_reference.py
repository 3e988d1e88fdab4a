"""Float64 numpy restatements shared by tests (independent of kd_jax's own code)."""

import numpy as np


def log_softmax(z):
  """log softmax over the last axis, max-shifted."""
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kd(s, t, temperature):
  """Per-row Hinton KD: T^2 KL(softmax(t / T) || softmax(s / T))."""
  lt, ls = log_softmax(t / temperature), log_softmax(s / temperature)
  return temperature**2 * (np.exp(lt) * (lt - ls)).sum(-1)
