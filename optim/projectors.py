"""Low-rank gradient projectors: the subspace a GaLore-style optimizer keeps its moments in.

A projector works on a stack of same-shape gradients G (B, m, n) and one side of them:
``project(G)`` gives the low-rank gradient, ``project_back(L)`` maps a low-rank step back to
(B, m, n), and ``refresh(G, ...)`` picks a new subspace from the current gradient. Its state
lives as tensors in the optimizer's state (never as Python objects), so checkpoints load with
``torch.load(weights_only=True)``.
"""
