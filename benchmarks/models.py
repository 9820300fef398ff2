"""The models whose parameter trees the benchmarks update.

* :class:`Transformer`: a small decoder-only Flax NNX transformer (case c). With the
  full configuration (vocabulary 4096, width 512, 6 blocks) it has 23.1M parameters in
  100 leaves: embeddings, attention and MLP kernels, biases, layer-norm scales and biases.
* The MLP of ``examples/mlp_flax.py`` (case d) is loaded from the example itself, so the
  benchmark times the example's own model and train step.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import jax
from flax import nnx

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mlp_flax.py"


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


def abstract_transformer_params(config: dict[str, int]) -> nnx.State:
  """The parameter tree of :class:`Transformer` with ``jax.ShapeDtypeStruct`` leaves.

  Built with ``nnx.eval_shape``: nothing is allocated or initialised. The benchmarks fill
  the leaves with random numbers, which is much faster on the CPU than running the
  initialisers (the update step's speed does not depend on the values).
  """
  model = nnx.eval_shape(lambda: Transformer(**config, rngs=nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)


def transformer_shapes(config: dict[str, int]) -> tuple[tuple[int, ...], ...]:
  """The parameter shapes of :class:`Transformer`, in tree order."""
  return tuple(tuple(leaf.shape) for leaf in jax.tree.leaves(abstract_transformer_params(config)))


def mlp_example() -> ModuleType:
  """``examples/mlp_flax.py`` as a module: its ``MLP``, ``make_train_step`` and sizes."""
  spec = importlib.util.spec_from_file_location("mlp_flax_example", EXAMPLE)
  if spec is None or spec.loader is None:
    raise ImportError(f"cannot load {EXAMPLE}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
