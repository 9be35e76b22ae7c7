"""Several training processes (data parallel, DDP-style) through Hugging Face Accelerate: the one place that
knows about process groups.

A communicator says how many processes there are and which one this is, and moves per-sample values and
flat gradient vectors between them. `SingleProcess` is the ordinary run (identities; accelerate is never
imported). `AccelerateProcesses` is used when a launcher (`accelerate launch`, `torchrun`) started more than
one process: Accelerate's PartialState sets up the process group (gloo on CPUs, NCCL on GPUs, one GPU per
process) and the collectives are plain torch.distributed calls on it.

How a step is shared: every process loads the same data and plans the same steps (seeded). Of a step's
global batch of n samples, process r takes one contiguous block of the batch, in batch order: the first
n % W processes take n // W + 1 samples, the others n // W (W processes; a process may get none). So
concatenating the blocks of processes 0..W-1 gives the batch back in order, and `gather` returns per-sample
values in global batch order. Each process computes its samples' losses and gradients; the methods sum-reduce
their shares into the update of the whole batch, so every process applies the same update and the
parameters stay identical (train.py checks this at the end of a run). DualSelect's reference refresh shares its
candidate list the same way (methods/dualselect.py, _shared_refresh).
"""

from __future__ import annotations

import os

import torch

from .errors import DualSelectError


def share(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of process `rank`'s block of a batch of n samples (see the module docstring)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class SingleProcess:
    """The ordinary run: one process holds the whole batch; every operation is the identity."""

    world_size = 1
    rank = 0
    is_main = True

    def share(self, n: int) -> tuple[int, int]:
        return 0, n

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass


# Launcher settings that this training loop would otherwise ignore: refused, with what to do instead.
_REFUSED_ENV = {
    "ACCELERATE_MIXED_PRECISION": (("", "no"), "set model.precision instead (accelerate's mixed precision is not used)"),
    "ACCELERATE_DYNAMO_BACKEND": (("", "no"), "torch.compile through accelerate is not supported"),
    "ACCELERATE_USE_FSDP": (("", "false"), "only DDP-style data parallelism is supported (no FSDP)"),
    "ACCELERATE_USE_DEEPSPEED": (("", "false"), "only DDP-style data parallelism is supported (no DeepSpeed)"),
    "ACCELERATE_USE_MEGATRON_LM": (("", "false"), "only DDP-style data parallelism is supported (no Megatron-LM)"),
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": (("", "1"), "no gradient accumulation: the batch is train.batch_size"),
}


class AccelerateProcesses:
    """Several processes started by `accelerate launch` (or torchrun); the process group is Accelerate's."""

    def __init__(self, cpu: bool):
        for key, (allowed, fix) in _REFUSED_ENV.items():
            value = os.environ.get(key, "").strip().lower()
            if value not in allowed:
                raise DualSelectError(f"the launcher set {key}={os.environ[key]}: {fix}")
        try:
            from accelerate import PartialState
        except ImportError:
            raise DualSelectError("this is one of several processes (WORLD_SIZE > 1) but accelerate is not installed: "
                                  "pip install 'dualselect[multigpu]'") from None
        import torch.distributed as dist

        self._dist = dist
        state = PartialState(cpu=cpu)
        if not dist.is_initialized():
            raise DualSelectError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but accelerate set up no process "
                                  f"group (device {state.device}): start the processes with `accelerate launch "
                                  "--multi_gpu --num_processes N` (also on CPUs) or torchrun")
        self.cpu = cpu
        self.device = state.device
        self.world_size = state.num_processes
        self.rank = state.process_index
        self.is_main = self.rank == 0
        self.backend = dist.get_backend()

    def share(self, n: int) -> tuple[int, int]:
        return share(n, self.world_size, self.rank)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's `t` (same dtype and trailing shape, any number of rows), concatenated in rank order."""
        t = t.detach().contiguous()
        rows = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        all_rows = [torch.zeros_like(rows) for _ in range(self.world_size)]
        self._dist.all_gather(all_rows, rows)
        counts = [int(r) for r in all_rows]
        most = max(counts)
        if most == 0:
            return t
        padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over processes of `t` (a new tensor; the same on every process)."""
        out = t.detach().clone().contiguous()
        self._dist.all_reduce(out, op=self._dist.ReduceOp.SUM)
        return out

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """The main process's `t`, on every process (a new tensor)."""
        out = t.detach().clone().contiguous()
        self._dist.broadcast(out, src=0)
        return out

    def barrier(self) -> None:
        self._dist.barrier()


_PROCESSES: AccelerateProcesses | None = None


def launched_world_size() -> int:
    """The number of processes a launcher started (its WORLD_SIZE; 1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def communicator(cpu: bool) -> SingleProcess | AccelerateProcesses:
    """This process's communicator: SingleProcess unless a launcher started several processes; then the
    process group is set up once per process (`cpu`: gloo on CPUs, else the accelerator's backend)."""
    global _PROCESSES
    if launched_world_size() <= 1:
        return SingleProcess()
    if _PROCESSES is None:
        _PROCESSES = AccelerateProcesses(cpu)
    elif _PROCESSES.cpu != cpu:
        raise DualSelectError("the process group was set up for "
                              f"{'CPU' if _PROCESSES.cpu else 'accelerator'} processes; this run wants the other kind")
    return _PROCESSES


def same_on_all(comm, params) -> bool:
    """Whether the parameters are identical on every process (a cheap checksum of them, compared exactly)."""
    if comm.world_size == 1:
        return True
    flat = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    check = torch.stack([flat.sum(), (flat * flat).sum(), (flat * weights).sum()]).reshape(1, 3)
    every = comm.gather(check)
    return bool((every == every[0]).all())
