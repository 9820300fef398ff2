"""Memory and precision: how AMSGrad's state and parameter formats change training.

Three tasks (the MLP regression of examples/mlp_flax.py, an MLP on scikit-learn's digits,
a small character-level transformer on the text of Python's help topics) are trained with
five ``amsgrad_jax.amsgrad`` configurations (float32, bfloat16 state, 8-bit block-wise
state, bfloat16 parameters rounded to nearest or stochastically) and two PyTorch peers
(``torch.optim.Adam(amsgrad=True)`` and ``torchao.optim.Adam8bit(amsgrad=True)``), every
run paired with its reference by seed: same initial weights, same batches.

Run ``python -m studies.precision --out DIR [--smoke]``; it writes
``DIR/precision_results.json``, ``DIR/precision_table.md`` and ``DIR/precision_curves.png``.
"""
