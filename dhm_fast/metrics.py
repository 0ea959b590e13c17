"""Per-head running metrics kept on the device; read back (one host sync) only when summarised."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dhm_fast.losses import LossStats


class TrainMeter:
    """Sums of the loss stats over the steps of an epoch, weighted by batch size."""

    def __init__(self, num_heads: int, device: torch.device) -> None:
        h = num_heads
        self.num_heads = h
        self.loss_sum = torch.zeros((), device=device)
        self.ce_sum = torch.zeros(h, device=device)
        self.kl_sum = torch.zeros(h, h, device=device)
        self.correct = torch.zeros(h, device=device)
        # How many samples each head / pair saw: known on the host, no sync needed.
        self.samples = 0
        self.head_samples = [0] * h
        self.pair_samples = [[0] * h for _ in range(h)]

    def update(self, loss: Tensor, stats: LossStats, batch: int, active: Sequence[bool]) -> None:
        self.loss_sum += loss.detach().float() * batch
        self.ce_sum += stats.ce * batch
        self.kl_sum += stats.kl * batch
        self.correct += stats.correct
        self.samples += batch
        for i, a in enumerate(active):
            if a:
                self.head_samples[i] += batch
                for j, b in enumerate(active):
                    if b and i != j:
                        self.pair_samples[i][j] += batch

    def summary(self, head_names: Sequence[str]) -> dict:
        """Epoch means per head (None for a head that never ran)."""
        loss, ce, kl, correct = (t.tolist() for t in (self.loss_sum, self.ce_sum, self.kl_sum, self.correct))
        out = {"loss": loss / max(self.samples, 1), "samples": self.samples, "heads": {}, "kl": {}}
        for i, name in enumerate(head_names):
            n = self.head_samples[i]
            out["heads"][name] = {
                "ce": ce[i] / n if n else None,
                "top1": 100.0 * correct[i] / n if n else None,
            }
            for j, student in enumerate(head_names):
                if i != j and self.pair_samples[i][j]:
                    out["kl"][f"{name}->{student}"] = kl[i][j] / self.pair_samples[i][j]
        return out

    def state_dict(self) -> dict:
        return {k: v for k, v in vars(self).items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v.to(self.loss_sum.device) if isinstance(v, Tensor) else v)


class EvalMeter:
    """Per-head cross-entropy, top-1 and top-5 over an evaluation pass."""

    def __init__(self, num_heads: int, device: torch.device) -> None:
        self.ce_sum = torch.zeros(num_heads, device=device, dtype=torch.float64)
        self.top1 = torch.zeros(num_heads, device=device, dtype=torch.float64)
        self.top5 = torch.zeros(num_heads, device=device, dtype=torch.float64)
        self.samples = torch.zeros((), device=device, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: Sequence[Tensor], labels: Tensor) -> None:
        z = torch.stack([x.float() for x in logits])  # [H, B, K]
        h, b, k = z.shape
        ce = torch.nn.functional.cross_entropy(
            z.reshape(h * b, k), labels.repeat(h), reduction="none"
        ).view(h, b)
        self.ce_sum += ce.sum(1).double()
        topk = z.topk(min(5, k), dim=2).indices  # [H, B, k]
        hits = topk == labels.view(1, b, 1)
        self.top1 += hits[:, :, 0].sum(1).double()
        self.top5 += hits.any(2).sum(1).double()
        self.samples += b

    def tensors(self) -> list[Tensor]:
        """The raw sums, so a multi-process run can all-reduce them before `summary`."""
        return [self.ce_sum, self.top1, self.top5, self.samples]

    def summary(self, head_names: Sequence[str]) -> dict:
        n = max(self.samples.item(), 1.0)
        ce, t1, t5 = self.ce_sum.tolist(), self.top1.tolist(), self.top5.tolist()
        return {
            "samples": int(self.samples.item()),
            "heads": {
                name: {"ce": ce[i] / n, "top1": 100.0 * t1[i] / n, "top5": 100.0 * t5[i] / n}
                for i, name in enumerate(head_names)
            },
        }
