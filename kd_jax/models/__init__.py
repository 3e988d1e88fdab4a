"""Flax NNX classifiers that return logits and named features, so feature losses need no hooks.

Build a model by name: `create(name, *, num_classes, rngs=None, **options)`; `available()` lists
the names (RepDistiller's `model_dict` names for the CIFAR zoo plus `cnn_digits`/`mlp_digits`,
`mobilenet_v1` for CUB-200 at 224x224, and `text_transformer`, which takes int32 token ids
[B, L] with 0 as padding instead of NHWC images).
Parameter counts equal RepDistiller's PyTorch models (tests/models/test_param_counts.py).

Call: `logits, features = model(x, train=...)` with x NHWC float ([B, 32, 32, 3] for CIFAR,
[B, 8, 8, 1] for digits). train=True: batch norm normalises with batch statistics and updates its
running averages, dropout is active; train=False: running averages, no dropout. Logits are
float32; features are in the compute dtype (option `dtype`, default float32).

`features` (RepDistiller's `feat` list from `model(x, is_feat=True, preact=...)`, named)::

  "stem"            feat[0]: output of the first conv block (after its ReLU; WRN: raw conv1).
  "stage1".."stageN" feat[1..N]: each stage's output before pooling (N = 3 for resnet*,
                    wrn_*, ShuffleV1/V2, cnn_digits: 2, mlp_digits: 1; N = 4 for vgg*,
                    MobileNetV2, ResNet50).
  "preact_stageK"   the `preact=True` feature where the reference has one: the stage's last
                    block output before its final ReLU (resnets, ShuffleNets, vgg, digits); for
                    WRN the next BN applied to stageK (block2/3's first bn1, the final bn1) —
                    taken from the forward pass itself, so running stats update once. MobileNetV2
                    has none (its stage outputs are already linear).
  "pre_pool"        exactly RepDistiller's feat[-2], the map SP uses: the last stage output
                    (WRN: block3's raw output before the final BN+ReLU; MobileNetV2: blocks[6]
                    output, before conv2).
  "embedding"       feat[-1]: the pooled penultimate vector the classifier reads, [B, D].

Functional use: `graphdef, params, rest = nnx.split(model, nnx.Param, ...)`, where
`rest` holds the batch-norm statistics (`nnx.BatchStat`) and, for a WRN with dropout, its RNG
stream; `nnx.merge(graphdef, params, rest)` inside the jitted step, and return
`nnx.state(model, nnx.BatchStat)` after a train-mode call to carry the updated statistics.
Batch norm normalises with the statistics of the batch it sees (per device under shard_map or
pmap, as RepDistiller's single-GPU recipe); its running variance follows PyTorch (unbiased).
Pooling is global, which equals RepDistiller's fixed pooling windows for 32x32 inputs.
PyTorch checkpoints: `kd_jax.models.torch_file` reads `torch.save` files without torch,
`kd_jax.models.torch_convert.from_torch_state_dict` converts a state dict, and
`python -m kd_jax.convert_teacher` writes an Orbax teacher from a `.pth` file in one command.
"""

from kd_jax.models._registry import available, create, create_compiled
# Importing the model modules registers their names.
from kd_jax.models import digits, mnist1d, mobilenet_v1, mobilenetv2, resnet, shufflenet, text, vgg, wrn  # noqa: F401

__all__ = ["available", "create", "create_compiled"]
