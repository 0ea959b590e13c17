"""Multi-process training on PyTorch's own engine: torchrun's environment, process group, DDP, reductions.

Without torchrun's variables (or with WORLD_SIZE=1) a process is alone: no process group, and every
helper here is a no-op. docs/distributed.md describes the design.
"""

from __future__ import annotations

import copy
import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dhm_fast.errors import UserError
from dhm_fast.metrics import TrainMeter


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_from_env(env: dict[str, str] | None = None) -> World:
    """Rank, local rank and world size from torchrun's variables (a single process when they are absent)."""
    env = os.environ if env is None else env
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("RANK, LOCAL_RANK and WORLD_SIZE must be integers (torchrun sets them)") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise UserError(f"inconsistent launcher variables: RANK={rank}, LOCAL_RANK={local_rank}, "
                        f"WORLD_SIZE={world_size}")
    return World(rank, local_rank, world_size)


def process_device(name: str, world: World) -> torch.device:
    """The device this process trains on, with its index always set.

    Under a launcher a CUDA process takes GPU LOCAL_RANK, or the only GPU it sees when a scheduler gives
    each task its own (CUDA_VISIBLE_DEVICES holding one GPU, as SLURM often does).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is available here")
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if not world.distributed:
        index = 0 if device.index is None else device.index
        if index >= count:
            raise UserError(f"--device {name}: only {count} GPU(s) visible")
        return torch.device("cuda", index)
    if device.index is not None:
        raise UserError(f"--device {name}: under torchrun each process takes its GPU from LOCAL_RANK; "
                        "pass --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if count == 1:
        return torch.device("cuda", 0)
    if world.local_rank >= count:
        raise UserError(f"LOCAL_RANK {world.local_rank} but only {count} GPU(s) visible on this node; "
                        "start at most one process per GPU (--nproc_per_node)")
    return torch.device("cuda", world.local_rank)


def init(device_name: str, timeout_s: float) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (if any); returns this process's world and device.

    The process's GPU becomes the current device first, before any model or loader exists: DALI and
    FFCV create their streams, and pinning threads their buffers, on the current device.
    """
    world = world_from_env()
    device = process_device(device_name, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not world.distributed:
        return world, device
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise UserError(f"WORLD_SIZE={world.world_size} but {var} is not set; launch with torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, store=_attempt_store(timeout), rank=world.rank,
                                world_size=world.world_size, timeout=timeout, **kwargs)
    return World(world.rank, world.local_rank, world.world_size, backend), device


def _attempt_store(timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store of torchrun's environment, with keys private to this restart attempt.

    torchrun's agent serves one store for the whole job; the processes of a restarted group would
    otherwise find the dead group's addresses under the same keys and fail to connect (seen in about
    half of the restarts with gloo). TORCHELASTIC_RESTART_COUNT numbers the attempts.
    """
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"dhm_fast/attempt_{attempt}", store)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """True on rank 0, and in a single process."""
    return not active() or dist.get_rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def destroy() -> None:
    if active():
        dist.destroy_process_group()


def all_reduce_sum(tensors: Sequence[Tensor]) -> None:
    """Sum every tensor across processes, in place, in one collective (summed in float64: exact for counts)."""
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).double() for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(part.view_as(t))


def reduce_train_meter(meter: TrainMeter) -> TrainMeter:
    """A copy of `meter` holding the sums over every process (the meter itself is left as it is)."""
    out = TrainMeter(meter.num_heads, meter.loss_sum.device)
    out.load_state_dict(copy.deepcopy(meter.state_dict()))
    if not active():
        return out
    h = meter.num_heads
    # Host-side counts go through the same collective as float64 (exact for any realistic count).
    counts = torch.tensor([out.samples, *out.head_samples, *(c for row in out.pair_samples for c in row)],
                          dtype=torch.float64, device=out.loss_sum.device)
    all_reduce_sum([out.loss_sum, out.ce_sum, out.kl_sum, out.correct, counts])
    values = [int(round(c)) for c in counts.tolist()]
    out.samples, out.head_samples = values[0], values[1: 1 + h]
    out.pair_samples = [values[1 + h + i * h: 1 + h + (i + 1) * h] for i in range(h)]
    return out


def broadcast_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics) before evaluating or saving:
    DDP runs with forward_sync_buffers=False, and this replaces its per-forward broadcast."""
    if not active():
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def wrap_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
    """DistributedDataParallel around the (already channels-last / compiled) model; no-op when alone.
    `find_unused_parameters` only when branches can be skipped (docs/distributed.md says why)."""
    if not active():
        return model
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        forward_sync_buffers=False,  # buffers are broadcast once before eval/save instead
        find_unused_parameters=find_unused_parameters,
        gradient_as_bucket_view=True,  # gradients live in the communication buckets: no extra copy
    )


def check_sync_bn(device: torch.device) -> None:
    if device.type != "cuda":
        raise UserError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU implementation); "
                        "drop --sync-bn on the CPU")


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> SyncBatchNorm (statistics over the global batch); CUDA only."""
    check_sync_bn(device)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def gather_objects(obj) -> list:
    """Every process's `obj`, in rank order (a list of one in a single process)."""
    if not active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def is_dist_error(exc: BaseException) -> bool:
    """A failed collective: a dead, hung or unreachable peer (gloo raises a plain RuntimeError)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer",
                            "Timed out waiting", "ProcessGroup", "caused pair closure")
    )
