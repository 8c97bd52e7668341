"""Error measures the evaluations report that the package itself never computes."""

from __future__ import annotations

import torch


def lemma51_ratio(o_hat, o, probs_l2, v_op_norm) -> torch.Tensor:
    """‖Ô − O‖₂ / (‖softmax(K̃q)‖₂ · ‖Ṽ‖_op), the quantity Lemma 5.1 bounds by ε."""
    return (o_hat - o).norm(dim=-1) / (probs_l2 * v_op_norm)


def kron_value_op_norm(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """‖V1 ⊘ V2‖_op without forming the i²×d matrix: (V1⊘V2)ᵀ(V1⊘V2) = (V1ᵀV1) ⊙ (V2ᵀV2). v1, v2 [..., n, D]."""
    gram = (v1.transpose(-1, -2) @ v1) * (v2.transpose(-1, -2) @ v2)
    return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0).sqrt()
