"""A small Flax NNX transformer encoder that classifies token sequences (PTLoss's NLU domain).

BERT-style but pre-LayerNorm: token + learned position embeddings -> `depth` blocks of
[LN -> multi-head self-attention -> residual, LN -> GELU MLP -> residual] -> final LN -> mean
pool over the non-padding tokens -> linear classifier. Token id 0 is padding and is masked out of
attention and of the pool. Same output contract as the image zoo: `model(tokens, train=...)`
returns `(logits, features)` with

  "stem"            [B, L, D] the embeddings (after dropout);
  "stage1".."stageN" [B, L, D] each block's output (N = depth);
  "pre_pool"        [B, L, D] the final normalised token states;
  "embedding"       [B, D] the masked mean pool the classifier reads.

Registered as "text_transformer"; the GLUE configs use a wider, deeper teacher and a smaller
student (experiments/configs/ptloss_glue.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kd_jax.models._registry import register

PAD_ID = 0


class TextTransformer(nnx.Module):
  """Pre-LN transformer encoder classifier over int token ids [B, L] (0 = padding)."""

  def __init__(self, *, num_classes: int, vocab_size: int = 8192, max_len: int = 128,
               width: int = 128, depth: int = 2, num_heads: int = 4, mlp_ratio: int = 4,
               dropout_rate: float = 0.1, dtype=None, rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"width={width} must be divisible by num_heads={num_heads}.")
    self.max_len = max_len
    self.vocab_size = vocab_size
    self.dtype = dtype
    init = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(vocab_size, width, embedding_init=init, dtype=dtype, rngs=rngs)
    self.pos = nnx.Param(init(rngs.params(), (max_len, width), jnp.float32))
    self.drop = nnx.Dropout(dropout_rate, rngs=rngs)
    self.blocks = nnx.List([_Block(width, num_heads, mlp_ratio, dropout_rate, dtype, rngs)
                            for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(width, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, tokens, *, train: bool):
    if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
      raise ValueError(f"text_transformer expects int tokens [batch, length <= {self.max_len}], "
                       f"got shape {tokens.shape}")
    tokens = tokens.astype(jnp.int32)
    keep = tokens != PAD_ID                                     # [B, L]
    x = self.embed(tokens) + self.pos[None, :tokens.shape[1]].astype(self.embed.embedding.dtype)
    x = self.drop(x, deterministic=not train)
    feats = {"stem": x}
    attn_mask = nnx.make_attention_mask(keep, keep)            # [B, 1, L, L]
    for i, block in enumerate(self.blocks):
      x = block(x, attn_mask, train=train)
      feats[f"stage{i + 1}"] = x
    x = self.norm(x)
    w = keep.astype(jnp.float32)[..., None]
    emb = (jnp.sum(x.astype(jnp.float32) * w, axis=1)
           / jnp.maximum(jnp.sum(w, axis=1), 1.0)).astype(x.dtype)
    logits = self.head(emb).astype(jnp.float32)
    feats.update(pre_pool=x, embedding=emb)
    return logits, feats


class _Block(nnx.Module):
  """LN -> self-attention -> residual; LN -> GELU MLP -> residual."""

  def __init__(self, width, num_heads, mlp_ratio, dropout_rate, dtype, rngs):
    self.ln1 = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=num_heads, in_features=width,
                                       dropout_rate=dropout_rate, decode=False, dtype=dtype,
                                       rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
    self.fc1 = nnx.Linear(width, mlp_ratio * width, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_ratio * width, width, dtype=dtype, rngs=rngs)
    self.drop = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(self, x, mask, *, train: bool):
    h = self.ln1(x)
    h = self.attn(h, mask=mask, deterministic=not train)
    x = x + self.drop(h, deterministic=not train)
    h = self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))
    return x + self.drop(h, deterministic=not train)


@register("text_transformer")
def text_transformer(*, num_classes, rngs, vocab_size: int = 8192, max_len: int = 128,
                     width: int = 128, depth: int = 2, num_heads: int = 4, mlp_ratio: int = 4,
                     dropout_rate: float = 0.1, dtype=None):
  """Pre-LN transformer text classifier over token ids (see the module docstring)."""
  return TextTransformer(num_classes=num_classes, vocab_size=vocab_size, max_len=max_len,
                         width=width, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         dropout_rate=dropout_rate, dtype=dtype, rngs=rngs)
