"""PyTorch-equivalent layer builders, so every model matches its RepDistiller reference exactly.

Convolutions take PyTorch's symmetric integer padding (not "SAME", which pads a stride-2 layer
asymmetrically), batch norm uses PyTorch's defaults (momentum 0.1 == flax momentum 0.9,
eps 1e-5, running variance of the unbiased batch variance), pooling follows `nn.AvgPool2d` / `nn.MaxPool2d`. Parameters are always float32;
`dtype` sets the compute dtype (e.g. bfloat16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kd_jax.backends.cpu import relu  # noqa: F401  (the XLA:CPU-friendly form)
from kd_jax.models import _conv

# torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu"), RepDistiller's conv init.
CONV_INIT = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
LINEAR_INIT = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
           padding: int = 0, *, groups: int = 1, bias: bool = False, dtype=None,
           rngs: nnx.Rngs) -> nnx.Conv:
  """`torch.nn.Conv2d(in, out, k, stride, padding, groups=groups, bias=bias)` in NHWC.

  On CPU, compile models with `kd_jax.compile_options` (the library's steps do): jaxlib's
  default hands convolutions to a single-threaded YNNPACK kernel. Strided convolutions use
  `kd_jax.models._conv.conv_general_dilated`, whose CPU gradients skip the zeros of autodiff's
  dilated cotangent (same values; parameters and checkpoints unchanged).

  Args:
    in_channels: input channels.
    out_channels: output channels.
    kernel_size: square kernel size.
    stride: square stride.
    padding: symmetric zero padding on each spatial side, as PyTorch's integer `padding`.
    groups: feature groups (in_channels for a depthwise convolution).
    bias: whether the convolution has a bias.
    dtype: compute dtype (None: float32).
    rngs: parameter initialisation streams.
  """
  return nnx.Conv(
      in_channels, out_channels, (kernel_size, kernel_size), (stride, stride),
      padding=((padding, padding), (padding, padding)), feature_group_count=groups,
      use_bias=bias, dtype=dtype, param_dtype=jnp.float32, kernel_init=CONV_INIT,
      conv_general_dilated=_conv.conv_general_dilated, rngs=rngs)


class TorchBatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` whose running variance follows PyTorch: it averages the unbiased batch
  variance, var_run <- m var_run + (1 - m) var_batch n / (n - 1), n = elements per channel.

  Normalisation itself uses the biased batch variance in train mode, as both frameworks do.
  With `axis_name` set (synchronized batch norm, `make_train_step(sync_batch_norm=True)`) the
  statistics and n cover the whole mapped axis, as `torch.nn.SyncBatchNorm`.
  """

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average or mask is not None:
      return super().__call__(x, use_running_average, mask=mask)
    # A copy: inside a trace the Variable may hold a mutable reference that the update rewrites.
    old = jnp.array(self.var[...], copy=True)
    y = super().__call__(x, False)
    n = x.size // x.shape[-1]
    if self.axis_name is not None:  # synchronized: the statistics cover every device's rows
      n *= jax.lax.axis_size(self.axis_name)
    if n > 1:
      # flax stored m old + (1 - m) v_biased; rescale the new term to the unbiased variance.
      m = self.momentum
      self.var[...] = m * old + (self.var[...] - m * old) * (n / (n - 1))
    return y


def batch_norm(num_features: int, *, dtype=None, rngs: nnx.Rngs) -> TorchBatchNorm:
  """`torch.nn.BatchNorm2d(num_features)`: momentum 0.1 (flax 0.9), eps 1e-5, unbiased
  running variance (see `TorchBatchNorm`).

  Call it as `bn(x, use_running_average=not train)`.
  """
  return TorchBatchNorm(num_features, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        param_dtype=jnp.float32, rngs=rngs)


def linear(in_features: int, out_features: int, *, bias: bool = True, dtype=None,
           kernel_init=LINEAR_INIT, rngs: nnx.Rngs) -> nnx.Linear:
  """`torch.nn.Linear(in_features, out_features)`; the kernel is stored [in, out]."""
  return nnx.Linear(in_features, out_features, use_bias=bias, dtype=dtype,
                    param_dtype=jnp.float32, kernel_init=kernel_init, rngs=rngs)


def global_avg_pool(x):
  """Mean over the spatial axes of an NHWC map -> [B, C] (RepDistiller's final avg-pool + view)."""
  return jnp.mean(x, axis=(1, 2))


def avg_pool(x, window: int, stride: int, padding: int = 0):
  """`nn.AvgPool2d(window, stride, padding)` with count_include_pad=True (zeros counted)."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  summed = jax.lax.reduce_window(x, jnp.zeros((), x.dtype), jax.lax.add,
                                 (1, window, window, 1), (1, stride, stride, 1), pad)
  return summed / (window * window)


def max_pool(x, window: int, stride: int):
  """`nn.MaxPool2d(window, stride)` (no padding) on an NHWC map."""
  return nnx.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")


def channel_shuffle(x, groups: int):
  """ShuffleNet's channel shuffle: channel c = g * (C / groups) + j moves to j * groups + g.

  The NHWC form of PyTorch's view(N, g, C/g, H, W).permute(0, 2, 1, 3, 4).reshape(N, C, H, W).
  """
  n, h, w, c = x.shape
  x = x.reshape(n, h, w, groups, c // groups)
  return jnp.swapaxes(x, 3, 4).reshape(n, h, w, c)


def to_compute(x, dtype):
  """Casts the network input to the compute dtype (float32 unless `dtype` says otherwise)."""
  return jnp.asarray(x, dtype if dtype is not None else jnp.float32)
