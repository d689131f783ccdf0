"""Under ZeRO-3 each rank averages only its partition of every parameter (core.ema): on two gloo ranks with
parameters partitioned as DeepSpeed does (flattened, split in equal parts, the last one zero-padded), the gathered
EMA and post-hoc EMA profiles equal, bit for bit, the same averages kept over the whole parameters, and loading
whole tensors back gives each rank its partition."""
import subprocess
import sys

from conftest import REPO, cpu_env, free_port

_SCRIPT = r'''
import os, sys
import torch
import torch.distributed as dist
from core.ema import EMA, PowerEMA, update_averages

def partition(p, rank, world):
    """DeepSpeed's ZeRO-3 layout (partition_parameters._partition_param) on a plain parameter."""
    n = p.numel()
    aligned = -(-n // world) * world
    part = torch.zeros(aligned // world)
    flat = p.detach().reshape(-1)[rank * part.numel():(rank + 1) * part.numel()]
    part[:flat.numel()] = flat
    p.ds_tensor, p.ds_numel, p.ds_numel_aligned, p.ds_shape, p.ds_id = part, n, aligned, p.shape, id(p)

def main(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    sharded, whole = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)  # 15 weights: partitions of 8, one padded
    whole.load_state_dict(sharded.state_dict())
    for p in sharded.parameters():
        partition(p, rank, 2)
    ema_s, ema_w = EMA(sharded, 0.9), EMA(whole, 0.9)
    assert ema_s.shadow["weight"].shape == (8,) and ema_w.shadow["weight"].shape == (3, 5)
    pow_s, pow_w = PowerEMA(ema_s, [0.05, 0.1]), PowerEMA(ema_w, [0.05, 0.1])
    g = torch.Generator().manual_seed(1)
    for t in range(1, 6):  # the same "optimiser step" on both copies, then the averages
        with torch.no_grad():
            for ps, pw in zip(sharded.parameters(), whole.parameters()):
                pw.add_(torch.randn(pw.shape, generator=g))
                ps.copy_(pw)
                partition(ps, rank, 2)
        update_averages(sharded, ema_s, pow_s, t)
        update_averages(whole, ema_w, pow_w, t)
    a, b = ema_s.state_dict(sharded), ema_w.state_dict(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "EMA"
    pa, pb = pow_s.state_dict(), pow_w.state_dict()
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa), "post-hoc EMA"
    assert all(torch.equal(pow_s.snapshot({}, i)[k], pow_w.snapshot({}, i)[k]) for i in (0, 1) for k in ("weight",))
    fresh = EMA(sharded, 0.9)
    fresh.load_state_dict(b)  # whole tensors in, this rank's partition kept
    assert torch.equal(fresh.shadow["weight"], ema_s.shadow["weight"]) and fresh.state_dict(sharded).keys() == a.keys()
    try:
        fresh.load_state_dict({**b, "weight": torch.zeros(5, 3)})
    except ValueError as err:
        assert "checkpoint shape (5, 3) != (3, 5)" in str(err), err
    else:
        raise AssertionError("a transposed weight was loaded")
    print(f"rank {rank}: ok", flush=True)

if __name__ == "__main__":
    torch.multiprocessing.start_processes(main, args=(sys.argv[1],), nprocs=2, start_method="fork")
'''


def test_partitioned_averages_equal_the_whole_ones(tmp_path):
    script = tmp_path / "ema.py"
    script.write_text(_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(free_port())], cwd=REPO, env=cpu_env(PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: ok" in proc.stdout and "rank 1: ok" in proc.stdout, proc.stdout
