"""The study's Flax NNX models and their losses.

Module and attribute names matter: :mod:`studies.precision.torch_peers` builds PyTorch
modules with the same names and copies the weights across by them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from studies.precision.tasks import CONTEXT, DIGITS_MLP, MLP_REGRESSION


class RegressionMLP(nnx.Module):
  """Linear-ReLU-Linear, as ``MLP`` in examples/mlp_flax.py (and initialised the same way)."""

  def __init__(self, sizes: dict[str, int], rngs: nnx.Rngs) -> None:
    self.hidden = nnx.Linear(sizes["inputs"], sizes["hidden"], rngs=rngs)
    self.output = nnx.Linear(sizes["hidden"], sizes["outputs"], rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.output(jax.nn.relu(self.hidden(x)))


class DigitsMLP(nnx.Module):
  """64 pixels, two ReLU hidden layers, 10 logits."""

  def __init__(self, sizes: dict[str, int], rngs: nnx.Rngs) -> None:
    hidden = sizes["hidden"]
    self.hidden1 = nnx.Linear(64, hidden, rngs=rngs)
    self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.output = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.hidden1(x))
    return self.output(jax.nn.relu(self.hidden2(x)))


class SelfAttention(nnx.Module):
  """Causal multi-head self-attention with separate query, key, value and output kernels."""

  def __init__(self, width: int, heads: int, rngs: nnx.Rngs) -> None:
    self.heads = heads
    self.query = nnx.Linear(width, width, rngs=rngs)
    self.key = nnx.Linear(width, width, rngs=rngs)
    self.value = nnx.Linear(width, width, rngs=rngs)
    self.output = nnx.Linear(width, width, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, width = x.shape

    def split_heads(y: jax.Array) -> jax.Array:
      return y.reshape(batch, length, self.heads, width // self.heads)

    q, k, v = split_heads(self.query(x)), split_heads(self.key(x)), split_heads(self.value(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(width // self.heads)
    causal = jnp.tril(jnp.ones((length, length), bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
    return self.output(mixed)


class Block(nnx.Module):
  """Pre-norm transformer block: causal self-attention, then a two-layer GELU MLP."""

  def __init__(self, width: int, heads: int, mlp_ratio: int, rngs: nnx.Rngs) -> None:
    self.attention_norm = nnx.LayerNorm(width, rngs=rngs)
    self.attention = SelfAttention(width, heads, rngs)
    self.mlp_norm = nnx.LayerNorm(width, rngs=rngs)
    self.mlp_in = nnx.Linear(width, mlp_ratio * width, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_ratio * width, width, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attention(self.attention_norm(x))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class CharTransformer(nnx.Module):
  """Token and learned position embeddings, pre-norm blocks, final norm, untied logits."""

  def __init__(self, sizes: dict[str, int], vocabulary_size: int, rngs: nnx.Rngs) -> None:
    width = sizes["width"]
    self.embed = nnx.Embed(vocabulary_size, width, rngs=rngs)
    self.position = nnx.Embed(CONTEXT, width, rngs=rngs)
    self.blocks = nnx.List(
      [Block(width, sizes["heads"], sizes["mlp_ratio"], rngs) for _ in range(sizes["depth"])]
    )
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.unembed = nnx.Linear(width, vocabulary_size, use_bias=False, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.position(jnp.arange(tokens.shape[-1]))
    for block in self.blocks:
      x = block(x)
    return self.unembed(self.norm(x))


def build_model(
  name: str, sizes: dict[str, int], rngs: nnx.Rngs, vocabulary_size: int = 0
) -> nnx.Module:
  """The float32 model of task ``name`` with ``sizes``, initialised from ``rngs``."""
  if name == MLP_REGRESSION:
    return RegressionMLP(sizes, rngs)
  if name == DIGITS_MLP:
    return DigitsMLP(sizes, rngs)
  return CharTransformer(sizes, vocabulary_size, rngs)


def task_loss(name: str, model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
  """The training loss of task ``name`` on one batch, in float32.

  Regression: the sum of squared errors (``MSELoss(reduction="sum")`` of the example).
  Digits and characters: mean softmax cross-entropy.
  """
  if name == MLP_REGRESSION:
    return jnp.sum((model(batch["x"]) - batch["y"]) ** 2)
  if name == DIGITS_MLP:
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  tokens = batch["tokens"]
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
