"""How many dimensions does a task need? Random-subspace fine-tuning and its sweep over d.

    projection.py   P (D × d): dense, or Fastfood H G Π H B applied matrix-free
    said.py         the `intrinsic` method: θ = θ0 + P θ_d (SAID: per-tensor scales λ_i)
    run.py          `deltatune intrinsic`: train at each d, find d90, table + plot, cost per step
"""
