"""One loss entry point for every method: baseline, deep supervision (dsl), DKS and DHM.

    L = sum_h lambda_h * CE(z_h, y) + alpha * sum_{i != j} w_ij * T^2 * KL(p~_i || q~_j)

p_i = softmax(z_i / T) is head i as a teacher (detached), q_j = softmax(z_j / T) is head j as a
student; both are smoothed as (p + eps) / (1 + K * eps) like the authors' release, and the KL is the
batch mean of the class sum. `w_ij` folds together the pair weights mu_ij, the direction and which
heads are active this step (see `mimic_weights`).

The settings are a frozen `LossConfig`; `LossConfig.compute` is the trainer's call. Two backends
compute exactly this with the same signature, `fused_backend` (the native op of kernels/) and
`reference_backend` (plain PyTorch); `select_backend` is the one place that chooses, and says why.
Both return the loss and a flat float32 stats vector [ce (H), kl (H*H, row = teacher), correct (H)].
The per-pattern weight and index tensors are made once per device and cached: a step costs no
host-device synchronisation and no host-to-device copy.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import kernels
from dhm_fast.catalog import DIRECTIONS, METHODS

FUSED_OP = "fused_loss"
_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossStats:
    """Per-step numbers for logging, computed alongside the loss (no extra pass)."""

    ce: Tensor  # [H] cross-entropy of each head (0 for an inactive head)
    kl: Tensor  # [H, H] KL(p~_i || q~_j): row i = teacher, column j = student
    correct: Tensor  # [H] number of correct top-1 predictions of each head


# Head order is (main, aux1, aux2, ...): a lower index is a deeper head. Which (teacher i, student j)
# pairs each direction keeps:
_PAIRS = {"both": lambda i, j: i != j, "top-down": lambda i, j: i < j, "bottom-up": lambda i, j: i > j}


def mimic_weights(
    num_heads: int,
    method: str,
    direction: str = "both",
    active: Sequence[bool] | None = None,
    ce_weights: Sequence[float] | None = None,
    kl_weights: Sequence[Sequence[float]] | None = None,
) -> tuple[list[float], list[list[float]]]:
    """Per-head CE weights and the H x H KL weight matrix (teacher row, student column) a method uses."""
    _check_choice("method", method, METHODS)
    _check_choice("direction", direction, DIRECTIONS)
    h = num_heads
    act = [True] * h if active is None else [bool(a) for a in active]
    lam = [1.0] * h if ce_weights is None else [float(x) for x in ce_weights]
    mu = [[1.0] * h] * h if kl_weights is None else [[float(x) for x in r] for r in kl_weights]
    if len(act) != h:
        raise ValueError(f"active has {len(act)} entries for {h} heads")
    if len(lam) != h:
        raise ValueError(f"ce_weights has {len(lam)} entries for {h} heads")
    if len(mu) != h or any(len(r) != h for r in mu):
        raise ValueError(f"kl_weights must be {h}x{h}")
    ce_w = [lam[k] if act[k] and (method != "baseline" or k == 0) else 0.0 for k in range(h)]
    mimics, pair = method in ("dks", "dhm"), _PAIRS[direction]
    kl_w = [[mu[i][j] if mimics and act[i] and act[j] and pair(i, j) else 0.0 for j in range(h)] for i in range(h)]
    return ce_w, kl_w


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


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
        log_q = torch.log(q + eps) - math.log1p(k * eps)  # a Python float: no tensor copied in
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


def fused_backend(
    logits: Sequence[Tensor],
    target: Tensor,
    ce_weights: Tensor,
    kl_weights: Tensor,
    temperature: float,
    alpha: float,
    eps: float,
    label_smoothing: float,
) -> tuple[Tensor, Tensor]:
    """The same loss and stats from the fused native op, in one pass over every head's logits (mixed
    precisions are computed in the widest), the gradient included. The gradient is saved in the logits'
    dtype, except float16's, saved in float32: a GradScaler's loss scale is applied in backward, and
    many unscaled entries would be subnormal or zero in float16. The caller has checked that the op has
    a kernel for the device and that there is at least one head.

    At small shapes the Python around the op is a measurable share of a call (docs/benchmarks.md), so
    conversions are skipped where nothing needs converting (the usual case: one dtype, and weights
    made by `_step_constants`), and eager calls take the library's direct entry."""
    dtype = logits[0].dtype
    if any(x.dtype != dtype for x in logits):
        dtype = functools.reduce(torch.promote_types, (x.dtype for x in logits))
        logits = [x.to(dtype) for x in logits]
    device = logits[0].device
    if ce_weights.dtype != torch.float32 or ce_weights.device != device:
        ce_weights = ce_weights.to(device=device, dtype=torch.float32)
    if kl_weights.dtype != torch.float32 or kl_weights.device != device:
        kl_weights = kl_weights.to(device=device, dtype=torch.float32)
    compute_grad = torch.is_grad_enabled() and any(x.requires_grad for x in logits)
    args = (logits, target, ce_weights, kl_weights, float(temperature), float(alpha), float(eps),
            float(label_smoothing), compute_grad)
    eager = kernels.eager_entry(FUSED_OP)
    if eager is not None and not torch.compiler.is_compiling():
        out = eager(*args)
        if out is not NotImplemented:
            return out
    loss, stats, _ = kernels.op(FUSED_OP).default(*args)
    return loss, stats


# ---------------------------------------------------------------------------- backend choice
@dataclass(frozen=True)
class LossBackend:
    """The backend that computes the loss on a device: its name ("fused" or "reference") and why."""

    name: str
    reason: str
    run: Callable[..., tuple[Tensor, Tensor]] = field(repr=False, compare=False)


_BACKENDS: dict[tuple[str, int | None, bool], LossBackend] = {}
_warned: set[str] = set()


def select_backend(device: torch.device | str, *, reference: bool = False) -> LossBackend:
    """The loss backend for `device`: the fused op where it has a kernel for the device, else the
    plain-PyTorch reference (with one warning saying why); the reference when `reference` is True."""
    device = torch.device(device)
    key = (device.type, device.index, bool(reference))
    backend = _BACKENDS.get(key)
    if backend is None:
        backend = _BACKENDS[key] = _choose_backend(device, reference)
    return backend


def _choose_backend(device: torch.device, reference: bool) -> LossBackend:
    if reference:
        return LossBackend("reference", "the plain-PyTorch loss was asked for (reference=True)", reference_backend)
    if kernels.has_kernel(FUSED_OP, device):
        return LossBackend("fused", f"the native op has a kernel for {device}", fused_backend)
    why = _why_no_kernel(device)
    # meta tensors only count FLOPs or shapes: no loss is computed there, so there is nothing to warn about
    if why not in _warned and device.type != "meta" and not torch.compiler.is_compiling():
        _warned.add(why)
        _LOG.warning("%s; the loss uses the slower plain-PyTorch reference", why)
    return LossBackend("reference", why, reference_backend)


def _why_no_kernel(device: torch.device) -> str:
    error = kernels.load_error()
    if error is not None:
        return (f"the native library is not built ({error}); rebuild it with "
                f"`pip install --no-build-isolation -e .`")
    if device.type != "cuda":
        return f"the fused op has no kernel for {device.type} devices"
    if not kernels.built_cuda_targets():
        return f"the native library was built without CUDA, so the fused op cannot run on {device}"
    major, minor = kernels.device_capability(device)
    return (f"the fused op has no code for {device} (compute capability {major}.{minor}); the library holds "
            f"{', '.join(kernels.built_cuda_targets())}: rebuild it on this machine")


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class LossConfig:
    """The loss settings of a run: validated once, hashable, and the trainer's way to compute it."""

    method: str = "dhm"
    direction: str = "both"
    eps: float = 1e-8
    label_smoothing: float = 0.0
    ce_weights: tuple[float, ...] | None = None  # lambda_h per head (None: all 1)
    kl_weights: tuple[tuple[float, ...], ...] | None = None  # mu_ij, teacher row (None: all 1)
    reference: bool = False  # force the plain-PyTorch backend

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("direction", self.direction, DIRECTIONS)
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be finite and >= 0, got {self.eps}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        # Sequences become tuples: the config stays immutable and hashable (a cache key).
        ce, kl = self.ce_weights, self.kl_weights
        object.__setattr__(self, "eps", float(self.eps))
        object.__setattr__(self, "label_smoothing", float(self.label_smoothing))
        object.__setattr__(self, "ce_weights", None if ce is None else tuple(float(x) for x in ce))
        object.__setattr__(self, "kl_weights", None if kl is None else tuple(tuple(float(x) for x in r) for r in kl))
        object.__setattr__(self, "reference", bool(self.reference))

    def backend(self, device: torch.device | str) -> LossBackend:
        """Which backend `compute` uses on `device`, and why."""
        return select_backend(device, reference=self.reference)

    def compute(
        self,
        logits: Sequence[Tensor | None],
        target: Tensor,
        *,
        active: Sequence[bool] | None = None,
        alpha: float = 1.0,
        temperature: float = 1.0,
    ) -> tuple[Tensor, LossStats]:
        """The loss over the heads' logits, ordered (main, aux1, aux2, ...), and its stats over all H.

        A head whose logits are None (a branch skipped this step) or whose `active` entry is False
        adds no CE and no KL term, and gets zeros in the stats.
        """
        h = len(logits)
        if h == 0:
            raise ValueError("the loss needs at least one head's logits")
        if active is not None and len(active) != h:
            raise ValueError(f"active has {len(active)} entries for {h} heads")
        act = tuple(x is not None and (active is None or bool(active[i])) for i, x in enumerate(logits))
        if not act[0]:
            raise ValueError("the main head (index 0) must be active")
        device = logits[0].device
        ce_t, kl_t, scatter = _step_constants(self, act, device)
        backend = select_backend(device, reference=self.reference)
        loss, stats = backend.run(
            [x for x, a in zip(logits, act, strict=True) if a], target, ce_t, kl_t, float(temperature),
            float(alpha), self.eps, self.label_smoothing,
        )
        if scatter is not None:  # compact stats of the active heads -> their places among all H heads'
            stats = stats.new_zeros(2 * h + h * h).index_copy_(0, scatter, stats)
        ce, kl, correct = stats.split((h, h * h, h))  # one call for the three views
        return loss, LossStats(ce=ce, kl=kl.view(h, h), correct=correct)


def _step_constants(
    config: LossConfig, active: tuple[bool, ...], device: torch.device
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The active heads' CE weights and KL weight matrix, and where their stats go among all H heads'
    (None when every head is active), as tensors on `device`. Eager: made once per pattern and device.
    Compiled: traced into the graph as constants (Dynamo would ignore an lru_cache, and warn)."""
    if torch.compiler.is_compiling():
        return _make_step_constants(config, active, device)
    return _cached_step_constants(config, active, device)


def _make_step_constants(
    config: LossConfig, active: tuple[bool, ...], device: torch.device
) -> tuple[Tensor, Tensor, Tensor | None]:
    h = len(active)
    ce_w, kl_w = mimic_weights(h, config.method, config.direction, active, config.ce_weights, config.kl_weights)
    idx = [i for i in range(h) if active[i]]
    ce_t = torch.tensor([ce_w[i] for i in idx], dtype=torch.float32, device=device)
    kl_t = torch.tensor([[kl_w[i][j] for j in idx] for i in idx], dtype=torch.float32, device=device)
    if len(idx) == h:
        return ce_t, kl_t, None
    # Compact stats [ce (n), kl (n*n), correct (n)] -> positions in the full [ce (H), kl (H*H), correct (H)].
    where = idx + [h + i * h + j for i in idx for j in idx] + [h + h * h + i for i in idx]
    return ce_t, kl_t, torch.tensor(where, dtype=torch.long, device=device)


_cached_step_constants = functools.lru_cache(maxsize=512)(_make_step_constants)


def dhm_loss(
    logits: Sequence[Tensor | None],
    target: Tensor,
    *,
    active: Sequence[bool] | None = None,
    alpha: float = 1.0,
    temperature: float = 1.0,
    return_stats: bool = False,
    **settings: Any,
) -> Tensor | tuple[Tensor, LossStats]:
    """`LossConfig(**settings).compute(...)` in one call, for scripts and tests: `settings` are the
    `LossConfig` fields (method, direction, eps, ...). With `return_stats`, also the `LossStats`."""
    loss, stats = LossConfig(**settings).compute(logits, target, active=active, alpha=alpha, temperature=temperature)
    return (loss, stats) if return_stats else loss
