"""Shared test helpers: run the real training entry points as subprocesses on CPU."""
import os
import subprocess
import sys

import pytest

import core  # noqa: F401  (core/compat.py's torchvision fix: some tests import open_clip, timm or clean-fid directly)

# `make test` runs two pytest workers (xdist): each process then takes one thread, or the workers' OpenMP threads
# oversubscribe the cores and spin (an op ~50x slower, core/dist.py)
PARALLEL = "PYTEST_XDIST_WORKER" in os.environ
if PARALLEL:
    import torch

    torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TINY = os.path.join(REPO, "configs", "debug", "class_cond_tiny.yaml")


def cpu_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if PARALLEL:
        env.setdefault("OMP_NUM_THREADS", "1")
    # The venv's ninja first: a second (system) ninja records build commands differently, and processes sharing
    # the torch-extensions cache would rebuild DeepSpeed's op each time they alternate (30-80 s each).
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions"))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def assert_images_close(a, b) -> None:
    """uint8 images of the same seeds drawn in other batch layouts (batch size, process count, thread count): the
    float math differs by round-off only (~1e-6), which can move a value across a rounding step. A wrong seed or
    index changes nearly every pixel, so at most one step per value and 1% of the values differing still fail it."""
    import numpy as np

    d = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
    assert d.shape and d.max() <= 1 and (d > 0).mean() <= 0.01, (d.max(), (d > 0).mean())


def launch_cmd(launcher: str, script: str, ranks: int) -> list[str]:
    """The command prefix of one of the three launch forms the README documents."""
    if launcher == "python":
        module = os.path.relpath(script, REPO)[:-3].replace(os.sep, ".")
        return [sys.executable, "-m", module]
    if launcher == "deepspeed":
        return [os.path.join(BIN, "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), script]
    if launcher == "torchrun":
        return [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(free_port()),
                script]
    raise ValueError(launcher)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(args: list[str], launcher: str = "python", ranks: int = 1, script: str = "class_cond/train.py",
              timeout: int = 300, check: bool = True, **popen) -> subprocess.CompletedProcess:
    cmd = launch_cmd(launcher, os.path.join(REPO, script), ranks) + args
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=timeout, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def meta_state_dict(path: str) -> dict:
    """{key: empty meta tensor of the listed shape} of a key list in tests/data (`key<TAB>shape` lines, # comments)."""
    import re

    import torch

    state = {}
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.rstrip("\n").split("\t")
        state[key] = torch.empty(tuple(int(s) for s in re.findall(r"\d+", shape)), device="meta")
    return state


def assert_resumed_run_is_identical(straight, split, step: int, keys: tuple) -> None:
    """The EMA weights at `step` and the logged `keys` of every step are bit-identical in the two run dirs."""
    import torch
    from safetensors.torch import load_file

    from core.logging import read_metrics

    a = load_file(os.path.join(straight, "checkpoints", f"step_{step:08d}", "ema.safetensors"))
    b = load_file(os.path.join(split, "checkpoints", f"step_{step:08d}", "ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = {r["step"]: r for r in read_metrics(straight)}
    lb = {r["step"]: r for r in read_metrics(split)}
    assert la.keys() == lb.keys() and all(la[s][k] == lb[s][k] for s in la for k in keys)


def copy_as_killed_after(run, copy, step: int) -> None:
    """`copy`: run directory `run` as a kill right after its step-`step` save would have left it (its later
    checkpoints and its export removed; what it logged after that step stays, for the resume to replay), so the
    same command rerun there resumes from `step` and must end with `run`'s bits: one launch fewer than training
    the interrupted half on its own."""
    import shutil

    shutil.copytree(run, copy)
    for name in os.listdir(os.path.join(copy, "checkpoints")):
        if name.startswith("step_") and int(name[5:]) > step:
            shutil.rmtree(os.path.join(copy, "checkpoints", name))
    shutil.rmtree(os.path.join(copy, "export"), ignore_errors=True)


@pytest.fixture
def tiny_args(tmp_path):
    """Arguments for a short tiny run in a temporary run directory (shared generated data)."""
    def make(*overrides: str, run_dir=None) -> list[str]:
        return ["--config", TINY, f"run.dir={run_dir or tmp_path / 'run'}", "train.num_workers=0",
                "data.synthetic_samples=256", "train.tensorboard=false", *overrides]
    return make
