"""Process-group setup for the three launch forms: `deepspeed`, `torchrun`, and a plain `python -m`."""
import os
import socket
from dataclasses import dataclass

import torch


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _share_cpu_threads() -> None:
    """Give each CPU rank half its share of the cores, the rest for data-loader workers (OMP_NUM_THREADS wins).

    Oversubscribed cores make OpenMP's spinning threads ~50x slower per op (measured on 2 cores with a second busy
    process: tiny SiT forward 360 ms with 2 threads, 6.6 ms with 1; the tiny run 25 vs 850 img/s).
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world // 2))


def cuda_index(local_rank: int, visible: int) -> int:
    """This rank's GPU among the `visible` ones: its local rank when each rank sees the node's GPUs, 0 when the
    scheduler bound one GPU to each task (srun --gpus-per-task=1 / --gpu-bind); RuntimeError otherwise."""
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise RuntimeError(f"local rank {local_rank} has no GPU of its own: {visible} are visible to it (one per rank "
                       "on the node, or exactly one bound to each task, is expected)")


def setup_distributed() -> DistContext:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU) and pick this rank's device.

    A plain single process gets the environment a launcher would set (rank 0 of 1 on a free local port), so the
    same code path runs everywhere.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    # DeepSpeed's import probes the accelerator and logs it: only processes that set up training import it
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accel = get_accelerator()
    if accel.device_name() == "cuda":
        index = cuda_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device(accel.device_name())
        _share_cpu_threads()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(verbose=False)
    return DistContext(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _distributed() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (one scalar all-reduce; none on one rank)."""
    if not _distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def min_over_ranks(t: torch.Tensor) -> int:
    """The smallest value of the one-element integer tensor `t` over the ranks, read on the host."""
    if _distributed():
        t = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return int(t.item())


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t.tolist()


def sum_over_ranks(value: int, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return int(t.item())
