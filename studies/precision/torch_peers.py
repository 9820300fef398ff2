"""The PyTorch peers: ``torch.optim.Adam(amsgrad=True)`` and ``torchao.optim.Adam8bit``.

Run by the study as ``python -m studies.precision.torch_peers REQUEST.json RESULT.json``,
in its own process so that PyTorch's threads never share one with JAX. The request names
the tasks (their :class:`~studies.precision.tasks.TaskSpec` fields) and the folder of the
JAX side's handoff files; every run starts from the JAX float32 initial weights of its
seed (copied by name, kernels transposed) and trains on the same batches, so the peers are
paired with each other and with the JAX runs.

``torchao.optim.Adam8bit`` quantizes a state tensor only when the parameter has at least
4096 elements and a multiple of ``block_size`` (256); smaller ones stay float32. With
``amsgrad=True`` its step calls ``torch.maximum`` on the quantized running maximum, which
its tensor subclass does not implement (pytorch/ao#2497): the error is recorded as is.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from studies.precision import tasks
from studies.precision.metrics import all_finite, loss_curve, train_metrics
from studies.precision.tasks import PEERS, Data, TaskSpec

UNIMPLEMENTED = re.compile(
  r"(\w+) dispatch: attempting to run unimplemented operator/function: "
  r"func=<OpOverload\(op='([^']+)'"
)
LAYER_NORM_EPSILON = 1e-6  # flax.nnx.LayerNorm's default
DESCRIPTIONS = {
  "torch_amsgrad": "torch.optim.Adam(amsgrad=True), float32, from the JAX initial weights",
  "torchao_8bit": "torchao.optim.Adam8bit(amsgrad=True), from the JAX initial weights",
}


class RegressionMLP(nn.Module):
  """Linear-ReLU-Linear of examples/mlp_flax.py."""

  def __init__(self, sizes: dict[str, int]) -> None:
    super().__init__()
    self.hidden = nn.Linear(sizes["inputs"], sizes["hidden"])
    self.output = nn.Linear(sizes["hidden"], sizes["outputs"])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.output(torch.relu(self.hidden(x)))


class DigitsMLP(nn.Module):
  """64 pixels, two ReLU hidden layers, 10 logits."""

  def __init__(self, sizes: dict[str, int]) -> None:
    super().__init__()
    hidden = sizes["hidden"]
    self.hidden1 = nn.Linear(64, hidden)
    self.hidden2 = nn.Linear(hidden, hidden)
    self.output = nn.Linear(hidden, 10)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.output(torch.relu(self.hidden2(torch.relu(self.hidden1(x)))))


class SelfAttention(nn.Module):
  """Causal multi-head self-attention, as the JAX ``SelfAttention``."""

  def __init__(self, width: int, heads: int) -> None:
    super().__init__()
    self.heads = heads
    self.query, self.key = nn.Linear(width, width), nn.Linear(width, width)
    self.value, self.output = nn.Linear(width, width), nn.Linear(width, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    batch, length, width = x.shape

    def split_heads(y: torch.Tensor) -> torch.Tensor:
      return y.reshape(batch, length, self.heads, width // self.heads).transpose(1, 2)

    q, k, v = split_heads(self.query(x)), split_heads(self.key(x)), split_heads(self.value(x))
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // self.heads)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    weights = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)
    return self.output((weights @ v).transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
  """Pre-norm transformer block, as the JAX ``Block`` (GELU with the tanh approximation)."""

  def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
    super().__init__()
    self.attention_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPSILON)
    self.attention = SelfAttention(width, heads)
    self.mlp_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPSILON)
    self.mlp_in = nn.Linear(width, mlp_ratio * width)
    self.mlp_out = nn.Linear(mlp_ratio * width, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attention(self.attention_norm(x))
    hidden = nn.functional.gelu(self.mlp_in(self.mlp_norm(x)), approximate="tanh")
    return x + self.mlp_out(hidden)


class CharTransformer(nn.Module):
  """Token and position embeddings, pre-norm blocks, final norm, untied logits."""

  def __init__(self, sizes: dict[str, int], vocabulary_size: int) -> None:
    super().__init__()
    width = sizes["width"]
    self.embed = nn.Embedding(vocabulary_size, width)
    self.position = nn.Embedding(tasks.CONTEXT, width)
    self.blocks = nn.ModuleList(
      [Block(width, sizes["heads"], sizes["mlp_ratio"]) for _ in range(sizes["depth"])]
    )
    self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPSILON)
    self.unembed = nn.Linear(width, vocabulary_size, bias=False)

  def forward(self, tokens: torch.Tensor) -> torch.Tensor:
    x = self.embed(tokens) + self.position(torch.arange(tokens.shape[-1]))
    for block in self.blocks:
      x = block(x)
    return self.unembed(self.norm(x))


def build_model(spec: TaskSpec, data: Data) -> nn.Module:
  """The PyTorch port of the task's model (weights to be copied in)."""
  if spec.name == tasks.MLP_REGRESSION:
    return RegressionMLP(spec.sizes)
  if spec.name == tasks.DIGITS_MLP:
    return DigitsMLP(spec.sizes)
  return CharTransformer(spec.sizes, int(data["vocabulary_size"]))


def jax_sources(prefix: str, module: nn.Module) -> dict[str, tuple[str, bool]]:
  """For each parameter of ``module`` (not its children): the JAX weight it copies and
  whether it is transposed. Flax stores ``(in, out)`` kernels, PyTorch ``(out, in)``."""
  if isinstance(module, nn.Linear):
    return {"weight": (f"{prefix}.kernel", True), "bias": (f"{prefix}.bias", False)}
  if isinstance(module, nn.Embedding):
    return {"weight": (f"{prefix}.embedding", False)}
  if isinstance(module, nn.LayerNorm):
    return {"weight": (f"{prefix}.scale", False), "bias": (f"{prefix}.bias", False)}
  return {}


@torch.no_grad()
def load_weights(model: nn.Module, weights: Data) -> None:
  """Copy the JAX initial ``weights`` into ``model``; every weight must be used once."""
  used = set()
  for prefix, module in model.named_modules():
    for attribute, (source, transpose) in jax_sources(prefix, module).items():
      parameter = getattr(module, attribute)
      if parameter is None:
        continue
      value = weights[source].T if transpose else weights[source]
      parameter.copy_(torch.from_numpy(np.ascontiguousarray(value)))
      used.add(source)
  if used != set(weights):
    raise ValueError(f"weights not copied: {sorted(set(weights) - used)}")


def task_loss(name: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
  """The same losses as the JAX side: summed squared error, else mean cross-entropy."""
  if name == tasks.MLP_REGRESSION:
    return ((model(batch["x"]) - batch["y"]) ** 2).sum()
  if name == tasks.DIGITS_MLP:
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"].long())
  tokens = batch["tokens"].long()
  logits = model(tokens[:, :-1])
  return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def make_optimizer(peer: str, model: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
  """``Adam(amsgrad=True)`` or torchao's ``Adam8bit(amsgrad=True)``."""
  if peer == "torch_amsgrad":
    return torch.optim.Adam(model.parameters(), lr=learning_rate, amsgrad=True)
  from torchao.optim import Adam8bit

  return Adam8bit(model.parameters(), lr=learning_rate, amsgrad=True)


def tensor_bytes(tensor: torch.Tensor) -> tuple[int, int]:
  """``(bytes, lookup-table bytes)`` of one state tensor: a torchao quantized tensor
  counts its 8-bit codes and block scales, with its code table apart."""
  if hasattr(tensor, "codes") and hasattr(tensor, "scale"):
    quantized = tensor.codes.nbytes + tensor.scale.nbytes
    return quantized, getattr(tensor, "qmap", torch.empty(0)).nbytes
  return tensor.numel() * tensor.element_size(), 0


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
  """Every non-scalar state tensor, including, for a parameter not stepped yet (after a
  crash), the buffers the optimizer would create for it."""
  tensors = []
  for group in optimizer.param_groups:
    for parameter in group["params"]:
      state = optimizer.state.get(parameter) or {}
      if not state and hasattr(optimizer, "_new_buffer"):  # torchao's own buffer factory
        state = {
          "exp_avg": optimizer._new_buffer(parameter, True),
          "exp_avg_sq": optimizer._new_buffer(parameter, False),
          "max_exp_avg_sq": optimizer._new_buffer(parameter, False),
        }
      tensors += [value for value in state.values() if value.ndim > 0]
  return tensors


def state_size(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
  """State bytes per parameter (codes and scales for quantized tensors), the code tables'
  bytes per parameter, and how many state tensors are quantized."""
  parameters = sum(parameter.numel() for parameter in model.parameters())
  tensors = state_tensors(optimizer)
  sizes = [tensor_bytes(tensor) for tensor in tensors]
  return {
    "state_bytes_per_param": sum(size for size, _ in sizes) / parameters,
    "qmap_bytes_per_param": sum(table for _, table in sizes) / parameters,
    "quantized_state_tensors": sum(hasattr(tensor, "codes") for tensor in tensors),
    "state_tensors": len(tensors),
  }


def to_torch(batch: Data) -> dict[str, torch.Tensor]:
  """The arrays of ``batch`` as tensors (sharing memory where NumPy allows)."""
  return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in batch.items()}


def train_steps(
  spec: TaskSpec,
  model: nn.Module,
  optimizer: torch.optim.Optimizer,
  data: Data,
  plan: np.ndarray,
  losses: list[float],
) -> None:
  """Train for ``spec.steps`` steps, appending each step's loss (before its update) to
  ``losses`` as it goes, so that after an error it tells how far training got."""
  fixed = to_torch(tasks.fixed_batch(spec.name, data))
  for first in range(0, spec.steps, spec.chunk):
    chunk = to_torch(tasks.step_batches(spec.name, data, plan[first : first + spec.chunk]))
    for row in range(min(spec.chunk, spec.steps - first)):
      batch = fixed | {key: value[row] for key, value in chunk.items()}
      loss = task_loss(spec.name, model, batch)
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
      losses.append(loss.item())


@torch.no_grad()
def evaluation_metrics(spec: TaskSpec, model: nn.Module, data: Data) -> dict[str, float]:
  """Test accuracy (digits) or held-out loss (characters) at the final weights."""
  if spec.name == tasks.DIGITS_MLP:
    predictions = model(torch.from_numpy(data["x_test"])).argmax(-1).numpy()
    return {"test_accuracy": float(np.mean(predictions == data["y_test"]))}
  if spec.name == tasks.CHAR_TRANSFORMER:
    batch = {"tokens": torch.from_numpy(data["heldout_windows"])}
    return {"heldout_loss": float(task_loss(spec.name, model, batch))}
  return {}


def error_summary(error: Exception) -> str:
  """The error's type and first line, and, when a tensor subclass lacks an operator
  (which ``torch.compile`` reports only further down), which subclass and operator."""
  text = str(error).strip()
  summary = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
  missing = UNIMPLEMENTED.search(text)
  if missing and missing.group(0) not in summary:
    summary += f"; {missing.group(1)} does not implement {missing.group(2)}"
  return summary


def run_peer(spec: TaskSpec, peer: str, seed: int, handoff: Path) -> dict[str, Any]:
  """One peer at one seed: its run, or the error that stopped it (with its state size)."""
  weights, data, plan = tasks.load_handoff(str(handoff / f"{spec.name}_seed{seed}.npz"))
  torch.manual_seed(seed)
  model = build_model(spec, data)
  load_weights(model, weights)
  optimizer = make_optimizer(peer, model, spec.learning_rate)
  start = time.perf_counter()
  steps: list[float] = []
  try:
    train_steps(spec, model, optimizer, data, plan, steps)
  except Exception as error:
    return {
      "seed": seed,
      "error": error_summary(error),
      "failed_at_step": len(steps) + 1,
      "traceback": traceback.format_exc(limit=-3)[-3000:],
      **state_size(optimizer, model),
    }
  wall_s = time.perf_counter() - start
  losses = np.asarray(steps, np.float64)
  metrics = train_metrics(spec, losses) | evaluation_metrics(spec, model, data)
  return {
    "seed": seed,
    "metrics": metrics,
    "nan": not all_finite(losses, metrics),
    "curve": loss_curve(losses),
    "wall_s": wall_s,
    "step_ms": 1000 * wall_s / spec.steps,
    **state_size(optimizer, model),
  }


def run_task(spec: TaskSpec, handoff: Path) -> dict[str, Any]:
  """Both peers at every seed of one task."""
  entries: dict[str, Any] = {}
  for peer in PEERS:
    entry: dict[str, Any] = {"framework": "torch", "description": DESCRIPTIONS[peer], "runs": []}
    for seed in spec.seeds:
      run = run_peer(spec, peer, seed, handoff)
      report_run(spec, peer, run)
      entry["runs"].append(run)
    entries[peer] = entry
  return entries


def report_run(spec: TaskSpec, peer: str, run: dict[str, Any]) -> None:
  """One progress line."""
  if "error" in run:
    print(f"  {spec.name} {peer} seed {run['seed']}: {run['error'][:160]}", flush=True)
    return
  shown = ", ".join(f"{key} {value:.4g}" for key, value in run["metrics"].items())
  print(f"  {spec.name} {peer} seed {run['seed']}: {shown} ({run['wall_s']:.1f} s)", flush=True)


def versions() -> dict[str, str]:
  """PyTorch's and torchao's versions."""
  import torchao

  return {"torch": torch.__version__, "torchao": torchao.__version__}


def main(arguments: list[str]) -> None:
  """Read the request, run every peer, write the result (see the module docstring)."""
  request_path, result_path = arguments
  request = json.loads(Path(request_path).read_text())
  torch.set_num_threads(2)
  if request["eager"]:
    # Inductor compiles torchao's step for each parameter shape (about 25 s cold on 2
    # cores); the smoke run skips that. The full study runs torchao as shipped.
    torch.compiler.set_stance("force_eager")
  handoff = Path(request["handoff"])
  result: dict[str, Any] = {"versions": versions(), "tasks": {}}
  for fields in request["specs"]:
    spec = TaskSpec(**{**fields, "seeds": tuple(fields["seeds"])})
    print(f"[torch] {spec.name}", flush=True)
    result["tasks"][spec.name] = run_task(spec, handoff)
  Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1:])
