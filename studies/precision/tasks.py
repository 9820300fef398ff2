"""The three tasks of the study, as plain NumPy: sizes, data, and the batches of every step.

Nothing here imports JAX or PyTorch. The JAX side builds each task's data and initial
weights once per seed and hands both, with the batch plan, to the PyTorch side, so every
configuration of a task trains from the same weights on the same batches at a given seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

MLP_REGRESSION = "mlp_regression"
DIGITS_MLP = "digits_mlp"
CHAR_TRANSFORMER = "char_transformer"
TASK_NAMES = (MLP_REGRESSION, DIGITS_MLP, CHAR_TRANSFORMER)
# The PyTorch peers; the first is the one the other is paired with.
TORCH_REFERENCE = "torch_amsgrad"
PEERS = (TORCH_REFERENCE, "torchao_8bit")

# examples/mlp_flax.py: batch, input, hidden and output sizes of the original listing.
REGRESSION_SIZES = {"batch": 64, "inputs": 1000, "hidden": 100, "outputs": 10}
DIGITS_SIZES = {"hidden": 128}
DIGITS_TEST_IMAGES = 360
CONTEXT = 64  # characters a transformer sees
TRANSFORMER_SIZES = {"width": 64, "depth": 2, "heads": 4, "mlp_ratio": 4}
SMOKE_TRANSFORMER_SIZES = {"width": 32, "depth": 1, "heads": 2, "mlp_ratio": 4}
HELDOUT_FRACTION = 0.1
HELDOUT_WINDOWS = 256
TAIL_STEPS = 50

Data = dict[str, np.ndarray]


@dataclass(frozen=True)
class TaskSpec:
  """How one task is trained and measured."""

  name: str
  title: str
  steps: int
  seeds: tuple[int, ...]
  learning_rate: float
  batch_size: int
  chunk: int  # steps per jitted ``lax.scan``; divides ``steps``
  tail: int  # the final training loss is the mean minibatch loss of the last ``tail`` steps
  sizes: dict[str, int]  # of the model

  @property
  def report_steps(self) -> tuple[int, ...]:
    """The 1-based steps whose loss the regression task reports (100, 200, 500 in full)."""
    return (self.steps // 5, 2 * self.steps // 5, self.steps)


def task_specs(smoke: bool) -> dict[str, TaskSpec]:
  """The full study's tasks, or tiny ones for ``--smoke``: a few steps in one chunk, one
  seed, and a smaller transformer (compiling dominates a smoke run)."""
  full = {
    MLP_REGRESSION: TaskSpec(
      name=MLP_REGRESSION,
      title="A: MLP regression (examples/mlp_flax.py)",
      steps=500,
      seeds=(0, 1, 2),
      learning_rate=1e-4,
      batch_size=REGRESSION_SIZES["batch"],
      chunk=100,
      tail=1,
      sizes=REGRESSION_SIZES,
    ),
    DIGITS_MLP: TaskSpec(
      name=DIGITS_MLP,
      title="B: MLP on digits",
      steps=3000,
      seeds=(0, 1, 2),
      learning_rate=1e-4,
      batch_size=64,
      chunk=250,
      tail=TAIL_STEPS,
      sizes=DIGITS_SIZES,
    ),
    CHAR_TRANSFORMER: TaskSpec(
      name=CHAR_TRANSFORMER,
      title="C: char transformer",
      steps=1500,
      seeds=(0, 1),
      learning_rate=1e-3,
      batch_size=32,
      chunk=100,
      tail=TAIL_STEPS,
      sizes=TRANSFORMER_SIZES,
    ),
  }
  if not smoke:
    return full
  tiny_steps = {MLP_REGRESSION: 20, DIGITS_MLP: 20, CHAR_TRANSFORMER: 10}
  tiny = {
    name: dataclasses.replace(
      spec, steps=tiny_steps[name], seeds=(0,), chunk=tiny_steps[name], tail=5
    )
    for name, spec in full.items()
  }
  tiny[CHAR_TRANSFORMER] = dataclasses.replace(
    tiny[CHAR_TRANSFORMER], sizes=SMOKE_TRANSFORMER_SIZES
  )
  return tiny


def digits_data() -> Data:
  """scikit-learn's 8x8 digits, pixels scaled to [0, 1], split once (stratified, seed 0)."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  images, labels = load_digits(return_X_y=True)
  x_train, x_test, y_train, y_test = train_test_split(
    (images / 16.0).astype(np.float32),
    labels.astype(np.int32),
    test_size=DIGITS_TEST_IMAGES,
    stratify=labels,
    random_state=0,
  )
  return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def corpus_text() -> str:
  """The text of Python's own help topics (``pydoc_data.topics``), values joined in order."""
  from pydoc_data.topics import topics

  return "".join(topics.values())


def char_data() -> Data:
  """Character ids of :func:`corpus_text`: the first 90 % to train on, and fixed held-out
  windows of ``context + 1`` characters spread evenly over the last 10 %."""
  text = corpus_text()
  vocabulary = sorted(set(text))
  ids = {char: index for index, char in enumerate(vocabulary)}
  tokens = np.fromiter((ids[char] for char in text), np.int32, len(text))
  split = int(len(tokens) * (1 - HELDOUT_FRACTION))
  heldout = tokens[split:]
  window = CONTEXT + 1
  starts = np.linspace(0, len(heldout) - window, HELDOUT_WINDOWS).astype(np.int64)
  return {
    "train_tokens": tokens[:split],
    "heldout_windows": heldout[starts[:, None] + np.arange(window)],
    "vocabulary_size": np.asarray(len(vocabulary), np.int32),
  }


def batch_plan(spec: TaskSpec, data: Data, seed: int) -> np.ndarray:
  """What each step trains on, one row per step.

  Regression: always the same full batch (the row is a placeholder). Digits: indices
  of training images, reshuffled every epoch. Characters: start offsets of windows.
  """
  rng = np.random.default_rng(seed)
  if spec.name == MLP_REGRESSION:
    return np.zeros((spec.steps, 1), np.int32)
  if spec.name == DIGITS_MLP:
    images = len(data["y_train"])
    epochs = -(-spec.steps * spec.batch_size // images)
    stream = np.concatenate([rng.permutation(images) for _ in range(epochs)])
    return stream[: spec.steps * spec.batch_size].reshape(spec.steps, spec.batch_size)
  last_start = len(data["train_tokens"]) - CONTEXT - 1
  return rng.integers(0, last_start + 1, (spec.steps, spec.batch_size)).astype(np.int32)


def fixed_batch(name: str, data: Data) -> Data:
  """The arrays every step of ``name`` uses unchanged (the regression's one batch)."""
  return {"x": data["x"], "y": data["y"]} if name == MLP_REGRESSION else {}


def step_batches(name: str, data: Data, plan_rows: np.ndarray) -> Data:
  """The minibatches of consecutive steps, stacked on a leading step axis."""
  if name == MLP_REGRESSION:
    return {}
  if name == DIGITS_MLP:
    return {"x": data["x_train"][plan_rows], "y": data["y_train"][plan_rows]}
  window = np.arange(CONTEXT + 1)
  return {"tokens": data["train_tokens"][plan_rows[..., None] + window]}


def save_handoff(path: str, weights: Data, data: Data, plan: np.ndarray) -> None:
  """Write one (task, seed)'s initial weights, data and batch plan for the PyTorch side."""
  arrays = {f"weight/{key}": value for key, value in weights.items()}
  arrays |= {f"data/{key}": value for key, value in data.items()}
  np.savez(path, plan=plan, **arrays)


def load_handoff(path: str) -> tuple[Data, Data, np.ndarray]:
  """``(weights, data, plan)`` as :func:`save_handoff` wrote them."""
  with np.load(path) as archive:
    weights = {key[7:]: archive[key] for key in archive.files if key.startswith("weight/")}
    data = {key[5:]: archive[key] for key in archive.files if key.startswith("data/")}
    return weights, data, archive["plan"]
