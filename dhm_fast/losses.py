"""One loss entry point for every method: baseline, deep supervision (dsl), DKS and DHM.

    L = sum_h lambda_h * CE(z_h, y) + alpha * sum_{i != j} w_ij * T^2 * KL(p~_i || q~_j)

p_i = softmax(z_i / T) is head i as a teacher (detached), q_j = softmax(z_j / T) is head j as a
student; both are smoothed as (p + eps) / (1 + K * eps) like the authors' release, and the KL is the
batch mean of the class sum. `w_ij` folds together the pair weights mu_ij, the direction and which
heads are active this step (see `mimic_weights`).

Two backends compute exactly this with the same signature:
- the fused native op (kernels/, loaded by `dhm_fast.fused`), the default wherever it is built;
- `reference_backend` below, plain PyTorch, used when the op is absent or `reference=True`.
Both return the loss and a flat float32 stats vector [ce (H), kl (H*H, row = teacher), correct (H)].
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

METHODS = ("baseline", "dsl", "dks", "dhm")
DIRECTIONS = ("both", "top-down", "bottom-up")


@dataclass(frozen=True)
class LossStats:
    """Per-step numbers for logging, computed alongside the loss (no extra pass)."""

    ce: Tensor  # [H] cross-entropy of each head (0 for an inactive head)
    kl: Tensor  # [H, H] KL(p~_i || q~_j): row i = teacher, column j = student
    correct: Tensor  # [H] number of correct top-1 predictions of each head


def stats_size(num_heads: int) -> int:
    return 2 * num_heads + num_heads * num_heads


def unpack_stats(stats: Tensor, num_heads: int) -> LossStats:
    h = num_heads
    return LossStats(ce=stats[:h], kl=stats[h : h + h * h].view(h, h), correct=stats[h + h * h :])


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; choose one of {', '.join(DIRECTIONS)}")


@functools.lru_cache(maxsize=256)
def _weights_on_host(
    num_heads: int,
    method: str,
    direction: str,
    active: tuple[bool, ...],
    ce_weights: tuple[float, ...] | None,
    kl_weights: tuple[tuple[float, ...], ...] | None,
) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
    check_method(method)
    check_direction(direction)
    h = num_heads
    lam = list(ce_weights) if ce_weights is not None else [1.0] * h
    if len(lam) != h:
        raise ValueError(f"ce_weights has {len(lam)} entries for {h} heads")
    mu = [list(r) for r in kl_weights] if kl_weights is not None else [[1.0] * h for _ in range(h)]
    if len(mu) != h or any(len(r) != h for r in mu):
        raise ValueError(f"kl_weights must be {h}x{h}")
    ce_w = [lam[k] * float(active[k]) for k in range(h)]
    if method == "baseline":
        ce_w = [lam[0] * float(active[0])] + [0.0] * (h - 1)
    kl_w = [[0.0] * h for _ in range(h)]
    if method in ("dks", "dhm"):
        # Head order is (main, aux1, aux2, ...): a lower index is a deeper head.
        for i in range(h):  # teacher
            for j in range(h):  # student
                if i == j or not (active[i] and active[j]):
                    continue
                if direction == "top-down" and not i < j:
                    continue
                if direction == "bottom-up" and not i > j:
                    continue
                kl_w[i][j] = mu[i][j]
    return tuple(ce_w), tuple(tuple(r) for r in kl_w)


def mimic_weights(
    num_heads: int,
    method: str,
    direction: str = "both",
    active: Sequence[bool] | None = None,
    ce_weights: Sequence[float] | None = None,
    kl_weights: Sequence[Sequence[float]] | None = None,
) -> tuple[list[float], list[list[float]]]:
    """Per-head CE weights and the H x H KL weight matrix (teacher row, student column) a method uses."""
    act = tuple(bool(a) for a in active) if active is not None else (True,) * num_heads
    if len(act) != num_heads:
        raise ValueError(f"active has {len(act)} entries for {num_heads} heads")
    ce_w, kl_w = _weights_on_host(
        num_heads,
        method,
        direction,
        act,
        tuple(float(x) for x in ce_weights) if ce_weights is not None else None,
        tuple(tuple(float(x) for x in r) for r in kl_weights) if kl_weights is not None else None,
    )
    return list(ce_w), [list(r) for r in kl_w]


def reference_backend(
    logits: Sequence[Tensor],
    target: Tensor,
    ce_weights: Tensor,
    kl_weights: Tensor,
    temperature: float,
    alpha: float,
    eps: float,
    label_smoothing: float,
) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch loss over H heads (all computed in float32, or float64 for float64 input)."""
    dtype = torch.float64 if logits[0].dtype == torch.float64 else torch.float32
    z = torch.stack([x.to(dtype) for x in logits])  # [H, B, K]
    h, b, k = z.shape
    ce = torch.stack(
        [F.cross_entropy(z[i], target, label_smoothing=label_smoothing) for i in range(h)]
    )
    correct = (z.argmax(dim=2) == target.unsqueeze(0)).sum(dim=1).to(dtype)
    loss = (ce_weights.to(dtype) * ce).sum()

    zt = z / temperature
    if eps > 0:
        q = torch.softmax(zt, dim=2)
        log_norm = torch.log1p(torch.tensor(k * eps, dtype=dtype, device=z.device))
        log_q = torch.log(q + eps) - log_norm
        p = (q.detach() + eps) / (1.0 + k * eps)
    else:
        log_q = torch.log_softmax(zt, dim=2)
        p = log_q.detach().exp()
    log_p = log_q.detach()
    # KL_ij = mean_b sum_k p_i (log p_i - log q_j): teacher entropy term minus a cross term.
    neg_entropy = (p * log_p).sum(dim=(1, 2)) / b  # [H]
    cross = (p.reshape(h, -1) @ log_q.reshape(h, -1).t()) / b  # [H teacher, H student]
    kl = neg_entropy.unsqueeze(1) - cross
    loss = loss + alpha * temperature**2 * (kl_weights.to(dtype) * kl).sum()
    stats = torch.cat([ce.detach(), kl.detach().reshape(-1), correct]).float()
    return loss, stats


def _pick_backend(reference: bool):
    if not reference:
        from dhm_fast import fused

        if fused.available():
            return fused.fused_loss
    return reference_backend


def dhm_loss(
    logits: Sequence[Tensor | None],
    target: Tensor,
    *,
    method: str = "dhm",
    temperature: float = 1.0,
    alpha: float = 1.0,
    direction: str = "both",
    eps: float = 1e-8,
    label_smoothing: float = 0.0,
    active: Sequence[bool] | None = None,
    ce_weights: Sequence[float] | None = None,
    kl_weights: Sequence[Sequence[float]] | None = None,
    reference: bool = False,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, LossStats]:
    """The training objective of `method` over the heads' logits, ordered (main, aux1, aux2, ...).

    A head whose logits are None (a branch skipped this step) or whose `active` entry is False adds
    no CE and no KL term. `ce_weights` are the per-head lambda_h, `kl_weights` the H x H mu_ij
    (teacher row, student column). `reference=True` forces the plain-PyTorch backend.
    With `return_stats`, also returns a `LossStats` laid out over all H heads.
    """
    h = len(logits)
    if h == 0:
        raise ValueError("dhm_loss needs at least one head's logits")
    if active is not None and len(active) != h:
        raise ValueError(f"active has {len(active)} entries for {h} heads")
    present = [x is not None for x in logits]
    act = [p and (active is None or bool(active[i])) for i, p in enumerate(present)]
    if not act[0]:
        raise ValueError("the main head (index 0) must be active")
    ce_w, kl_w = mimic_weights(h, method, direction, act, ce_weights, kl_weights)

    # Only the active heads go to the backend; their weights are sliced to match.
    idx = [i for i in range(h) if act[i]]
    device = logits[0].device
    kl_active = tuple(tuple(kl_w[i][j] for j in idx) for i in idx)
    ce_t, kl_t = _weight_tensors(tuple(ce_w[i] for i in idx), kl_active, device)
    backend = _pick_backend(reference)
    loss, compact = backend(
        [logits[i] for i in idx], target, ce_t, kl_t, float(temperature), float(alpha), float(eps),
        float(label_smoothing),
    )
    if not return_stats:
        return loss
    return loss, _expand_stats(compact, idx, h)


@functools.lru_cache(maxsize=256)
def _weight_tensors(
    ce_w: tuple[float, ...], kl_w: tuple[tuple[float, ...], ...], device: torch.device
) -> tuple[Tensor, Tensor]:
    # Cached per active pattern and device: no host-to-device copy per step.
    return (
        torch.tensor(ce_w, dtype=torch.float32, device=device),
        torch.tensor(kl_w, dtype=torch.float32, device=device),
    )


def _expand_stats(compact: Tensor, idx: list[int], num_heads: int) -> LossStats:
    n = len(idx)
    part = unpack_stats(compact, n)
    if n == num_heads:
        return part
    where = torch.tensor(idx, device=compact.device)
    ce = compact.new_zeros(num_heads).index_copy(0, where, part.ce)
    correct = compact.new_zeros(num_heads).index_copy(0, where, part.correct)
    kl = compact.new_zeros(num_heads, num_heads)
    kl[where.unsqueeze(1), where.unsqueeze(0)] = part.kl
    return LossStats(ce=ce, kl=kl, correct=correct)
