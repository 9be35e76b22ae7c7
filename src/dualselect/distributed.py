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

With train.shard_base the frozen base model's weights are sharded over the processes as well (FSDP2; shard_base
below): the LoRA parameters stay replicated and all of the above is unchanged; every all-gather of weights is agreed
among the processes first, as they run different numbers of passes between two collectives (Lockstep).
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
    "ACCELERATE_USE_FSDP": (("", "false"), "Accelerate's FSDP would shard the LoRA parameters too and reduce their "
                                           "gradients itself, which per-sample selection cannot use (its gradients "
                                           "are gathered and summed by the methods): set train.shard_base=true to "
                                           "shard just the frozen base model's weights (FSDP2; the adapter stays "
                                           "replicated)"),
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


# -- train.shard_base: the frozen base model's weights sharded over the processes (FSDP2) ----------------------------
#
# Each decoder layer, then the whole transformers model (its embeddings, final norm and head), is wrapped with
# PyTorch's FSDP2 `fully_shard`, the trainable (LoRA) parameters passed as `ignored_params`: they stay ordinary
# replicated tensors, their gradients are the methods' to gather and sum as without sharding, and the optimizer
# never sees FSDP. Only the frozen weights are sharded: each process keeps about 1/W of them, and FSDP all-gathers a
# module's weights before its forward and again before its backward (reshard_after_forward), freeing them after
# each. The weights are frozen, so there is no gradient reduce-scatter.
#
# An all-gather is a collective: every process must issue the same ones in the same order. But between two of the
# methods' collectives the processes run different numbers of forward and backward passes (uneven or empty shares,
# one pass per sample in the loop engine, length groups and chunks of their own samples, a refresh's own
# references). So each all-gather is agreed first (Lockstep): before FSDP would unshard a module (a forward pre-hook,
# and a hook on the gradients of its outputs for the backward), the process announces the module's number; every
# round the lowest number announced is all-gathered by every process, kept by those that asked for it and dropped
# again by the others, which only lend their shard (a process at one of the communicator's collectives announces
# that, and lends its shards until every process is there). A module a lending process holds unsharded just then (the
# model mid-forward, the first layer until the end of a backward) is all-gathered again and kept: the values are the
# same, as the weights never change. Every FSDP all-gather goes through _AgreedAllGather, which refuses one that was
# not agreed (a hang or the wrong layer's weights otherwise), and FSDP's backward prefetching is switched off (its
# all-gathers would not be announced).

ONE_PROCESS_SHARDING = ("train.shard_base=true shards the base model's weights over several processes and this run "
                        "has one: start it with `accelerate launch --multi_gpu --num_processes N` (N >= 2), or set "
                        "train.shard_base=false")

_ANNOUNCE_GROUP = None  # a gloo process group for the Lockstep's announcements (CPU ints, also next to NCCL)


class Lockstep:
    """Agrees every all-gather of the FSDP modules `modules` (the same list, in the same order, in every process)
    among the processes (see above). `probes[i]`: (module, name) of a frozen parameter that modules[i] shards,
    registered as a DTensor while sharded and as a plain tensor while unsharded (FSDP2's documented behaviour)."""

    AT_COLLECTIVE = -1

    def __init__(self, modules: list, probes: list, world_size: int, group):
        self.modules, self.probes, self.world_size, self._group = modules, probes, world_size, group
        self.gathering = False  # True during an agreed all-gather (_AgreedAllGather checks it)

    def sharded(self, index: int) -> bool:
        from torch.distributed.tensor import DTensor

        owner, name = self.probes[index]
        return isinstance(getattr(owner, name), DTensor)

    def before_unshard(self, index: int) -> None:
        """FSDP may unshard modules[index] next: if it is sharded, all-gather it now, with every process."""
        if self.sharded(index):
            self._request(index)

    def at_collective(self) -> None:
        """Lend this process's shards until every process has reached the collective that follows."""
        self._request(self.AT_COLLECTIVE)

    def _request(self, want: int) -> None:
        import torch.distributed as dist

        mine = torch.tensor([want], dtype=torch.int64)
        while True:
            every = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(every, mine, group=self._group)
            asked = [int(w) for w in every if int(w) != self.AT_COLLECTIVE]
            if not asked:
                return
            first = min(asked)
            self._all_gather(first, keep=first == want)
            if first == want:
                return

    def _all_gather(self, index: int, keep: bool) -> None:
        module = self.modules[index]
        held = not self.sharded(index)
        if held:  # this process holds it unsharded: free it, so that unshard() all-gathers it again
            module.reshard()
        self.gathering = True
        try:
            module.unshard()
        finally:
            self.gathering = False
        if not (keep or held):
            module.reshard()


class _AgreedAllGather:
    """FSDP's all-gather (FSDPModule.set_custom_all_gather) that refuses one the Lockstep did not agree on."""

    def __init__(self, lockstep: Lockstep):
        self.lockstep = lockstep

    def allocate(self, size, *, dtype, device) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        import torch.distributed as dist

        if not self.lockstep.gathering:
            raise RuntimeError("train.shard_base: FSDP started an all-gather that the processes did not agree on (a "
                               "bug in distributed.Lockstep; the processes would pair it with a different one)")
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        return gather(output_tensor, input_tensor, group=group, async_op=async_op)


class ShardedProcesses:
    """The communicator of a run with train.shard_base: AccelerateProcesses' collectives, each after the Lockstep
    has let every process reach it (lending shards meanwhile). `facts`: run_info.json's shard_base entry."""

    def __init__(self, comm: AccelerateProcesses, lockstep: Lockstep, facts: dict):
        self._comm, self.lockstep, self.facts = comm, lockstep, facts
        self.cpu, self.device, self.backend = comm.cpu, comm.device, comm.backend
        self.world_size, self.rank, self.is_main = comm.world_size, comm.rank, comm.is_main

    def share(self, n: int) -> tuple[int, int]:
        return self._comm.share(n)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        self.lockstep.at_collective()
        return self._comm.gather(t)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        self.lockstep.at_collective()
        return self._comm.sum(t)

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        self.lockstep.at_collective()
        return self._comm.broadcast(t)

    def barrier(self) -> None:
        self.lockstep.at_collective()
        self._comm.barrier()


def _frozen_param(module, outside=()) -> tuple | None:
    """(owning module, name) of the first frozen parameter of `module` that is not in one of the modules `outside`."""
    skip = {id(m) for m in outside}
    todo = [module]
    while todo:
        m = todo.pop(0)
        for name, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                return m, name
        todo += [c for c in m.children() if id(c) not in skip]
    return None


def _tensors(output) -> list[torch.Tensor]:
    """The tensors in a module's output (a tensor, or tuples, lists and dicts such as a ModelOutput of them)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for x in output for t in _tensors(x)]
    return []


def shard_base(model, comm) -> ShardedProcesses:
    """train.shard_base: shard the frozen weights of `model` (a PEFT model, LoRA added) over the processes of `comm`
    with FSDP2 (see above); call it before the optimizer is built. Returns the communicator the run must use."""
    global _ANNOUNCE_GROUP
    if comm.world_size == 1:
        raise DualSelectError(ONE_PROCESS_SHARDING)
    import inspect

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        FSDPModule = fully_shard = None
    if (fully_shard is None or "ignored_params" not in inspect.signature(fully_shard).parameters
            or not hasattr(FSDPModule, "set_custom_all_gather")):
        raise DualSelectError(f"train.shard_base needs PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard) with "
                              f"ignored_params and FSDPModule.set_custom_all_gather, which torch {torch.__version__} "
                              "lacks: upgrade torch, or set train.shard_base=false")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kinds = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in kinds]
    if not layers:
        raise DualSelectError(f"train.shard_base: {type(base).__name__} names no decoder layer class "
                              "(_no_split_modules) to shard by: set train.shard_base=false")
    trainable = {p for p in model.parameters() if p.requires_grad}
    units = [*layers, base]  # each layer, then the model: its own weights are those outside the layers
    probes = [_frozen_param(m) for m in layers] + [_frozen_param(base, outside=layers)]
    mesh = init_device_mesh(comm.device.type, (comm.world_size,))
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True, ignored_params=trainable)
    if _ANNOUNCE_GROUP is None:
        _ANNOUNCE_GROUP = dist.new_group(backend="gloo")
    sharded = [(m, probe) for m, probe in zip(units, probes) if probe is not None]  # a module with frozen weights
    lockstep = Lockstep([m for m, _ in sharded], [probe for _, probe in sharded], comm.world_size, _ANNOUNCE_GROUP)
    for index, module in enumerate(lockstep.modules):
        module.set_custom_all_gather(_AgreedAllGather(lockstep))
        module.set_modules_to_backward_prefetch([module])  # prefetch only itself, i.e. nothing (no unagreed ones)
        module.register_forward_pre_hook(lambda m, args, i=index: lockstep.before_unshard(i), prepend=True)
        module.register_forward_hook(lambda m, args, out, i=index: _before_backward(lockstep, i, out), prepend=True)

    frozen = [p for p in model.parameters() if not p.requires_grad]
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in frozen)
    every = comm.gather(torch.tensor([[local]], dtype=torch.int64, device=comm.device)).reshape(-1).tolist()
    facts = {"sharded": True, "fsdp_modules": len(lockstep.modules), "base_params": sum(p.numel() for p in frozen),
             "base_params_local": every,  # the frozen parameters each process holds (by process rank)
             "how": "FSDP2 fully_shard of each decoder layer and the model, LoRA parameters ignored (replicated); "
                    "every all-gather agreed among the processes first (distributed.Lockstep)"}
    return ShardedProcesses(comm, lockstep, facts)


def _before_backward(lockstep: Lockstep, index: int, output) -> None:
    """A forward hook run before FSDP's own: hooks the gradients of the module's outputs, ahead of FSDP's pre-backward
    hooks on them (tensor hooks run in the order they were registered)."""
    for t in _tensors(output):
        if t.requires_grad:
            t.register_hook(lambda grad: lockstep.before_unshard(index))
