"""The small Flax NNX transformer whose parameter shapes make the ``transformer`` case.

With :data:`benchmarks.cases.TRANSFORMER` (vocabulary 4096, width 512, 6 blocks) it has
23.1M parameters in 100 leaves: embeddings, attention and MLP kernels, biases, layer-norm
scales and biases.
"""

from __future__ import annotations

import jax
from flax import nnx


class Block(nnx.Module):
  """Pre-norm transformer block: causal self-attention, then a two-layer GELU MLP."""

  def __init__(self, width: int, heads: int, mlp_ratio: int, rngs: nnx.Rngs) -> None:
    self.attention_norm = nnx.LayerNorm(width, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
      num_heads=heads, in_features=width, decode=False, rngs=rngs
    )
    self.mlp_norm = nnx.LayerNorm(width, rngs=rngs)
    self.mlp_in = nnx.Linear(width, mlp_ratio * width, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_ratio * width, width, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    mask = nnx.make_causal_mask(x[..., 0])
    x = x + self.attention(self.attention_norm(x), mask=mask)
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class Transformer(nnx.Module):
  """Token embedding, ``depth`` blocks, final norm and an untied output projection."""

  def __init__(
    self, vocab: int, width: int, depth: int, heads: int, mlp_ratio: int, rngs: nnx.Rngs
  ) -> None:
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.blocks = nnx.List([Block(width, heads, mlp_ratio, rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.unembed = nnx.Linear(width, vocab, use_bias=False, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.unembed(self.norm(x))


def transformer_shapes(config: dict[str, int]) -> list[list[int]]:
  """The parameter shapes of :class:`Transformer`, in tree order, found with
  ``nnx.eval_shape`` (nothing is allocated)."""
  model = nnx.eval_shape(lambda: Transformer(**config, rngs=nnx.Rngs(0)))
  return [list(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))]
