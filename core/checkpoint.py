"""Checkpoints of a run directory: written atomically, the last K kept, resumed by rerunning the same command.

The Checkpointer owns when a run saves (every train.ckpt_every steps, at the end, and when Slurm's USR1 or a TERM
arrives on any rank), keeping the last run.keep_last, restoring on start and exporting the EMA at the end, so the
training loop only says "step done". What a checkpoint holds:

    run.dir/checkpoints/step_00001000/   DeepSpeed's model/optimizer files (one per ZeRO rank)
                                         ema.safetensors  (full model, EMA weights, float32)
                                         phema.safetensors (post-hoc EMA on: its power-function profiles)
                                         state.json       (step, config hash, counters, world size)
                                         rng_rank{r}.json (Python, NumPy and torch RNG streams of rank r)
                                         config.yaml      (the resolved config of the run)
    run.dir/checkpoints/latest           the newest tag (DeepSpeed's convention)
    run.dir/checkpoints/universal/step_*  a checkpoint's DeepSpeed state in DeepSpeed's universal format, made when
                                         it is resumed on another number of ranks; removed by the next save
    run.dir/phema/phema-STEP-STD.safetensors   post-hoc EMA snapshots (train.phema_stds), kept for good

A checkpoint is staged in checkpoints/.staging/<tag> and renamed into place only when every rank has written its
part, so a crash during a save leaves the previous checkpoint as the newest complete one; a failed save raises
CheckpointSaveError and removes its part. Old checkpoints are renamed into checkpoints/.trash before deletion, so
every step_* directory is complete by construction.

Trust: DeepSpeed's own files are pickles, so a run directory is trusted input (see the README); our files are
safetensors and JSON.
"""
import argparse
import base64
import dataclasses
import errno
import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from core.config import ConfigError, config_changes, config_hash, save_config
from core.dist import DistContext, any_rank, barrier, sum_over_ranks
from core.ema import PowerEMA, snapshot_every
from core.fileio import atomic_path, write_json_atomic, write_text_atomic

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was written on a signal; rerun (or requeue) to continue

TAG_RE = re.compile(r"^step_(\d{8,})$")
SNAPSHOT_RE = re.compile(r"^phema-(\d{8,})-(\d+\.\d{3})\.safetensors$")
PHEMA_FILE = "phema.safetensors"  # a checkpoint's power-function EMA state


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def ckpt_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """[(step, path)] of the complete checkpoints of a run, oldest first."""
    root = ckpt_root(run_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root) if (m := TAG_RE.match(name))]
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def read_state(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, "state.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------- RNG streams


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """Every global RNG stream of this process, JSON-serialisable."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


# ------------------------------------------------------------------------------------------------------ save/load


class CheckpointSaveError(RuntimeError):
    """A checkpoint that could not be written; the previous complete checkpoints are untouched."""


def save_checkpoint(run_dir: str, engine, ema, state: dict, cfg, rank: int, keep_last: int,
                    phema: PowerEMA | None = None) -> str:
    """Write checkpoint `state["step"]` atomically; every rank must call this. Returns the checkpoint path.
    `phema`: the post-hoc EMA's profiles, saved beside the EMA when it is on.

    A failure while writing (a full disk, a failing writer) raises CheckpointSaveError naming the newest complete
    checkpoint, which is untouched; rank 0 removes the partial one."""
    root = ckpt_root(run_dir)
    staging = os.path.join(root, ".staging")
    tag = tag_for(state["step"])
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of a save that crashed
        os.makedirs(staging)
    barrier()
    part = os.path.join(staging, tag)
    error = None
    try:
        engine.save_checkpoint(staging, tag=tag, save_latest=False)
        write_json_atomic(os.path.join(part, f"rng_rank{rank}.json"), rng_state())
        ema_state = ema.state_dict(engine.module)  # collectives under ZeRO-3: every rank takes part
        phema_state = phema.state_dict() if phema is not None else None
        if rank == 0:
            with atomic_path(os.path.join(part, "ema.safetensors")) as tmp:
                save_file(ema_state, tmp, metadata={"step": str(state["step"])})
            if phema is not None:
                with atomic_path(os.path.join(part, PHEMA_FILE)) as tmp:
                    save_file(phema_state, tmp, metadata={"step": str(state["step"]),
                                                          "sigma_rels": json.dumps(phema.sigma_rels)})
            save_config(cfg, os.path.join(part, "config.yaml"))
            write_json_atomic(os.path.join(part, "state.json"), state)  # written last: marks the part complete
    except Exception as err:
        error = err
    # Every rank learns of a failure (most often rank 0's EMA file on a full disk), so none waits at the barrier
    # below for a rank that gave up: all raise together.
    if any_rank(error is not None, getattr(engine, "device", torch.device("cpu"))):
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        newest = latest_checkpoint(run_dir)
        why = f"{type(error).__name__}: {error}" if error is not None else "another rank could not write its part"
        raise CheckpointSaveError(
            f"checkpoint {tag} of {run_dir} could not be written ({why}); "
            f"the newest complete checkpoint, {newest or '(none yet)'}, is intact"
        ) from error
    barrier()
    final = os.path.join(root, tag)
    if rank == 0:
        trash = os.path.join(root, ".trash")
        shutil.rmtree(trash, ignore_errors=True)
        os.makedirs(trash)
        if os.path.exists(final):  # the same step saved again: move the old copy aside, never delete it first
            os.replace(final, os.path.join(trash, tag))
        os.replace(part, final)
        _fsync_dir(root)
        write_text_atomic(os.path.join(root, "latest"), tag)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(universal_root(run_dir), ignore_errors=True)  # a resume now starts from this checkpoint
        # renamed out of step_* before deletion, so a kill mid-delete leaves no incomplete step_* directory
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            os.replace(old, os.path.join(trash, os.path.basename(old)))
        shutil.rmtree(trash, ignore_errors=True)
    barrier()
    return final


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; a missing, truncated or foreign file is a ValueError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    try:
        return load_file(path)
    except SafetensorError as err:
        raise ValueError(f"{path!r} is not a readable safetensors file (truncated or corrupt?): {err}") from None


def check_state_dict(expected: dict, state: dict, source: str,
                     model: str = "the model built from its record") -> None:
    """Strict match of names and shapes of `state` (loaded from `source`) against `expected` (the state_dict of
    `model`, as named in messages); a ValueError names the first mismatched key and both shapes."""
    for key, ours in expected.items():
        if key not in state:
            raise ValueError(f"{source!r} lacks key {key!r} (model shape {tuple(ours.shape)}), which {model} has: "
                             "another architecture?")
        if tuple(state[key].shape) != tuple(ours.shape):
            raise ValueError(f"{source!r}: key {key!r} has shape {tuple(state[key].shape)} in the file but "
                             f"{tuple(ours.shape)} in {model} (another architecture?)")
    extra = [k for k in state if k not in expected]
    if extra:
        raise ValueError(f"{source!r} has key {extra[0]!r} (shape {tuple(state[extra[0]].shape)}) that {model} "
                         f"lacks ({len(extra)} such keys)")


def check_same_model(ckpt_dir: str, saved: dict | None, model: dict) -> None:
    """ConfigError unless the checkpoint's model record {"task", "kwargs"} is `model`'s. Same-shaped weights can
    mean another model (a preset's head count changed: 768 = 12 x 64 = 24 x 32), so shapes alone do not tell."""
    if saved is None:  # a checkpoint from before models were recorded: nothing to compare
        return
    now = json.loads(json.dumps(model))  # tuples -> lists, as state.json holds them
    if saved.get("task") != now["task"]:
        raise ConfigError(f"{ckpt_dir} holds a {saved.get('task')!r} model; this run builds a {now['task']!r} one")
    old, new = saved.get("kwargs", {}), now["kwargs"]
    diff = [f"{k}: {old.get(k, '(unset)')} in the checkpoint, {new.get(k, '(unset)')} now"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        raise ConfigError(f"{ckpt_dir} holds a model built with other arguments ({'; '.join(diff)}), so its weights "
                          "would be read as another model's; resume it with the code/preset that made it, or start "
                          "a new run.dir")


def load_checkpoint(ckpt_dir: str, engine, ema, rank: int, world_size: int, phema: PowerEMA | None = None,
                    universal: str | None = None) -> dict:
    """Restore model, optimizer, EMA, the post-hoc EMA's profiles (`phema`, when on) and (same world size) this
    rank's RNG streams; returns state.json. `universal`: the checkpoint's DeepSpeed state converted for another
    number of ranks (to_universal), loaded instead of its own ZeRO files by an engine built to load it."""
    state = read_state(ckpt_dir)
    root, tag = os.path.split(universal or ckpt_dir)
    load_path, _ = engine.load_checkpoint(root, tag=tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}")
    ema.load_state_dict(load_weights(os.path.join(ckpt_dir, "ema.safetensors")))
    if phema is not None:  # find_resume has checked that the checkpoint holds these profiles
        phema.load_state_dict(load_weights(os.path.join(ckpt_dir, PHEMA_FILE)))
    rng_file = os.path.join(ckpt_dir, f"rng_rank{rank}.json")
    if state.get("world_size") == world_size and os.path.isfile(rng_file):
        with open(rng_file) as f:
            set_rng_state(json.load(f))
    return state


# ------------------------------------------------------------------------------------------- post-hoc EMA snapshots


def phema_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "phema")


def snapshot_path(run_dir: str, step: int, sigma_rel: float) -> str:
    return os.path.join(phema_dir(run_dir), f"phema-{step:08d}-{sigma_rel:.3f}.safetensors")


def list_snapshots(run_dir: str) -> list[tuple[int, float, str]]:
    """[(step, sigma_rel, path)] of a run's post-hoc EMA snapshots, by step then sigma_rel; step and sigma_rel
    are read from each file's record (the name rounds sigma_rel to 3 decimals)."""
    root = phema_dir(run_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        if SNAPSHOT_RE.match(name):
            path = os.path.join(root, name)
            try:
                with safe_open(path, "pt") as f:
                    meta = f.metadata()
            except SafetensorError as err:
                raise ValueError(f"{path!r} is not a readable safetensors file (truncated or corrupt?): {err}") from None
            found.append((int(meta["step"]), float(meta["sigma_rel"]), path))
    return sorted(found)


def save_snapshots(run_dir: str, module, phema: PowerEMA, step: int, ctx: DistContext) -> None:
    """Write each profile of `phema` at `step` to run.dir/phema (full model state, float32) on rank 0, atomically;
    every rank calls it (under ZeRO-3 the profiles' partitions and frozen parameters are gathered). A failed write
    raises on every rank."""
    error, extras = None, phema.extras(module)
    for i, (sigma_rel, gamma) in enumerate(zip(phema.sigma_rels, phema.gammas)):
        snapshot = phema.snapshot(extras, i)  # a collective: every rank, even after rank 0 failed to write
        if ctx.is_main and error is None:
            try:
                os.makedirs(phema_dir(run_dir), exist_ok=True)
                with atomic_path(snapshot_path(run_dir, step, sigma_rel)) as tmp:
                    save_file(snapshot, tmp,
                              metadata={"step": str(step), "sigma_rel": repr(sigma_rel), "gamma": repr(gamma)})
            except Exception as err:
                error = err
    if any_rank(error is not None, ctx.device):
        why = f"{type(error).__name__}: {error}" if error is not None else "rank 0 could not write it"
        raise CheckpointSaveError(f"post-hoc EMA snapshot of step {step} in {phema_dir(run_dir)} could not be "
                                  f"written ({why}); the checkpoints are intact") from error


def check_resume_config(cfg, checkpoint: str) -> None:
    """ConfigError unless `cfg` may resume `checkpoint`: the same trajectory settings (bookkeeping keys and options
    added since, at their defaults, aside), or run.allow_config_change=true."""
    if read_state(checkpoint).get("config_hash") == config_hash(cfg) or cfg.run.allow_config_change:
        return
    try:
        with open(os.path.join(checkpoint, "config.yaml")) as f:
            changes = config_changes(cfg, yaml.safe_load(f) or {})
    except (OSError, yaml.YAMLError):
        changes = [f"(its config.yaml is unreadable; config hash {config_hash(cfg)} differs)"]
    if changes:
        raise ConfigError(
            f"{cfg.run.dir} holds a checkpoint of a run with a different config ({'; '.join(changes[:6])}"
            f"{'; ...' if len(changes) > 6 else ''}; see {checkpoint}/config.yaml). Use another run.dir, or set "
            "run.allow_config_change=true to resume anyway"
        )


def saved_sigma_rels(ckpt_dir: str) -> list[float] | None:
    """The sigma_rels of a checkpoint's post-hoc EMA profiles, None when it was off."""
    path = os.path.join(ckpt_dir, PHEMA_FILE)
    if not os.path.isfile(path):
        return None
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["sigma_rels"])


def check_resume_phema(checkpoint: str, sigma_rels: list[float]) -> None:
    """ConfigError unless `checkpoint` holds the post-hoc EMA profiles `sigma_rels` (train.phema_stds): a power
    EMA averages from step 0, so one cannot start, or change its widths, in the middle of a run."""
    if not sigma_rels:
        return
    saved = saved_sigma_rels(checkpoint)
    if saved != list(sigma_rels):
        had = "post-hoc EMA off" if saved is None else f"train.phema_stds={saved}"
        raise ConfigError(
            f"{checkpoint} was written with {had}, and this run has train.phema_stds={list(sigma_rels)}: a "
            "power-function EMA averages from step 0, so it cannot start or change width mid-run. Resume with the "
            "checkpoint's train.phema_stds, or start a new run.dir"
        )


def reshards(checkpoint: str, world_size: int) -> bool:
    """Whether `checkpoint` was written by another number of ranks than `world_size`: DeepSpeed's ZeRO files hold
    one optimiser partition per rank, so it resumes through DeepSpeed's universal format (to_universal)."""
    saved = read_state(checkpoint).get("world_size")
    return saved is not None and saved != world_size


def universal_root(run_dir: str) -> str:
    return os.path.join(ckpt_root(run_dir), "universal")


def universal_path(ckpt_dir: str) -> str:
    """Where to_universal puts the universal form of checkpoint `ckpt_dir` (run.dir/checkpoints/step_*)."""
    root, tag = os.path.split(os.path.abspath(ckpt_dir))
    return os.path.join(root, "universal", tag)


def to_universal(ckpt_dir: str) -> str:
    """The DeepSpeed state of `ckpt_dir` in DeepSpeed's universal format (whole fp32 weights and Adam moments per
    parameter, deepspeed.checkpoint.ds_to_universal), converted once into checkpoints/universal/<tag>; returns its
    path. Run on one rank; a failed conversion leaves nothing behind and raises, naming the converter's error."""
    out = universal_path(ckpt_dir)
    if os.path.isdir(out):
        return out
    partial = os.path.join(os.path.dirname(out), f".partial-{os.path.basename(out)}")
    shutil.rmtree(partial, ignore_errors=True)
    workers = max(1, min(8, (os.cpu_count() or 1) // 2))
    # A child process: the converter forks worker pools, which a process holding CUDA and NCCL state must not do.
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", ckpt_dir,
           "--output_folder", partial, "--inject_missing_state", "--num_extract_workers", str(workers),
           "--num_merge_workers", str(max(1, workers // 2))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise RuntimeError(f"converting {ckpt_dir} to DeepSpeed's universal format failed (exit {proc.returncode}); "
                           f"the checkpoint is untouched:\n{proc.stdout[-1500:]}{proc.stderr[-2500:]}")
    os.replace(partial, out)
    return out


def find_resume(cfg) -> str | None:
    """The checkpoint this run resumes from (the newest of run.dir), None for a new run; ConfigError if the config
    does not fit it (found before any setup). Any number of ranks may resume it (reshards)."""
    checkpoint = latest_checkpoint(cfg.run.dir)
    if checkpoint is not None:
        check_resume_config(cfg, checkpoint)
        check_resume_phema(checkpoint, cfg.train.phema_stds)
    return checkpoint


# ----------------------------------------------------------------------------------------------------- the run


@dataclass
class RunState:
    """What state.json holds: the position of the run (step and counters) and the identity of what it trains
    (config hash, world size, the model's record {"task", "kwargs"}, the latent space, the data's identity)."""

    config_hash: str
    world_size: int
    model: dict
    latent: dict
    data: dict
    step: int = 0
    skipped_steps: int = 0  # non-finite steps skipped (train.skip_nonfinite)
    corrupt_samples: int = 0  # unreadable samples the loader passed over, all ranks
    pending_corrupt: int = field(default=0, repr=False)  # this rank's, not yet summed over the ranks; not saved

    def record(self) -> dict:
        """The JSON of state.json (counters summed: call sum_counters on every rank first)."""
        out = dataclasses.asdict(self)
        del out["pending_corrupt"]
        return out

    def resumed(self, saved: dict) -> "RunState":
        """This state at the position of a saved state.json: its step and counters; identity stays current."""
        return dataclasses.replace(self, step=saved["step"], skipped_steps=saved.get("skipped_steps", 0),
                                   corrupt_samples=saved.get("corrupt_samples", 0))

    def sum_counters(self, device: torch.device) -> None:
        """Add every rank's pending corrupt-sample count to the total (a collective: every rank calls it)."""
        self.corrupt_samples += sum_over_ranks(self.pending_corrupt, device)
        self.pending_corrupt = 0


class PreemptionSignals:
    """Records SIGUSR1 (Slurm's warning before the time limit), SIGTERM (preemption) and SIGINT (Ctrl-C); the
    Checkpointer saves and asks the loop to stop after the step in progress. Installed first, so a signal during
    start-up cannot kill the job un-requeued. A second Ctrl-C stops at once (KeyboardInterrupt), without a save."""

    def __init__(self):
        self.received: int | None = None
        self.interrupts = 0
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt
            tqdm.write("Ctrl-C: the checkpoint is written after this step, then the run stops (Ctrl-C again to stop "
                       "at once, without it)")
        self.received = signum


class RunDirBusy(ConfigError):
    """Another live process trains in this run.dir."""


class RunDirLock:
    """An exclusive lock on run.dir (POSIX lockf on run.dir/run.lock, NFS included), taken by rank 0 for the run's
    life: a second training on the same run.dir is refused at start, naming the live one. The OS drops the lock
    when its process ends, however it ends (a crash, kill -9), so no stale lock blocks a requeued job."""

    def __init__(self, run_dir: str):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "run.lock")
        self.file = open(self.path, "a+")
        try:
            fcntl.lockf(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):  # a file system without locks (ENOLCK): go on unguarded
                tqdm.write(f"warning: cannot lock {self.path} ({err.strerror}): make sure no other training uses "
                           f"{run_dir}")
                return
            self.file.seek(0)
            holder = self.file.read().strip() or "(unknown)"
            self.file.close()
            raise RunDirBusy(f"run.dir {run_dir} is in use by another training ({holder}): wait for it to end or stop "
                             "it, or use another run.dir") from err
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.file.flush()

    def release(self) -> None:
        self.file.close()  # closing drops the lock


class Checkpointer:
    """A run's checkpoints: restore on start, save after a step when due, export the EMA at the end.

    Every rank calls every method (saves are collective). `every`: train.ckpt_every; `keep_last`: run.keep_last;
    `phema_every`: the steps between post-hoc EMA snapshots (train.phema_every, core.ema.snapshot_every)."""

    def __init__(self, cfg, ctx: DistContext, signals: PreemptionSignals):
        self.cfg, self.ctx, self.signals = cfg, ctx, signals
        self.run_dir, self.every, self.keep_last = cfg.run.dir, cfg.train.ckpt_every, cfg.run.keep_last
        self.phema_every = snapshot_every(cfg.train.phema_every, cfg.train.global_batch)
        self.signal_every = cfg.train.signal_every
        self.lock: RunDirLock | None = None

    def claim(self) -> str | None:
        """Take run.dir for this run (rank 0 holds its RunDirLock; every rank raises RunDirBusy when another
        training holds it) and return the checkpoint to resume from, None for a new run (find_resume)."""
        error = None
        if self.ctx.is_main:
            try:
                self.lock = RunDirLock(self.run_dir)
            except RunDirBusy as err:
                error = err
        if any_rank(error is not None, self.ctx.device):
            raise error or RunDirBusy(f"run.dir {self.run_dir} is in use by another training (rank 0 says which)")
        return find_resume(self.cfg)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def restore(self, checkpoint: str, engine, ema, state: RunState, phema: PowerEMA | None = None) -> RunState:
        """Load `checkpoint` into the engine, the EMA and the post-hoc EMA (and this rank's RNG streams); `state`
        at its position. A checkpoint of another number of ranks is converted to DeepSpeed's universal format
        first (on rank 0), which the engine must have been built to load (build_ds_config(load_universal=True))."""
        universal = None
        if reshards(checkpoint, self.ctx.world_size):
            saved_ranks, error = read_state(checkpoint)["world_size"], None
            if self.ctx.is_main:
                tqdm.write(f"{checkpoint} was written by {saved_ranks} rank(s), this run has {self.ctx.world_size}: "
                           "converting its DeepSpeed state to the universal format")
                if self.cfg.disp.coeff > 0:
                    tqdm.write("warning: disp.coeff > 0: the dispersive loss contrasts the samples of a rank's "
                               "micro-batch, so on another number of ranks the run does not continue the same "
                               "trajectory (every other term does, up to float reduction order)")
                try:
                    t0 = time.perf_counter()
                    universal = to_universal(checkpoint)
                    tqdm.write(f"universal checkpoint {universal} written in {time.perf_counter() - t0:.1f} s")
                except RuntimeError as err:
                    error = err
            if any_rank(error is not None, self.ctx.device):
                raise error or RuntimeError(f"rank 0 could not convert {checkpoint} to the universal format")
            universal = universal_path(checkpoint)  # rank 0 has made it
        saved = load_checkpoint(checkpoint, engine, ema, self.ctx.rank, self.ctx.world_size, phema, universal)
        if self.ctx.is_main:
            tqdm.write(f"resumed from {checkpoint} at step {saved['step']}")
        return state.resumed(saved)

    def save(self, engine, ema, state: RunState, phema: PowerEMA | None = None) -> str:
        state.sum_counters(self.ctx.device)
        return save_checkpoint(self.run_dir, engine, ema, state.record(), self.cfg, self.ctx.rank, self.keep_last,
                               phema)

    def signalled(self, step: int) -> bool:
        """Whether a signal arrived on any rank, asked every train.signal_every steps (an all-reduce the host waits
        for) and on one rank every step (its own flag, free)."""
        if self.ctx.world_size > 1 and step % self.signal_every:
            return False
        return any_rank(self.signals.received is not None, self.ctx.device)

    def step_done(self, engine, ema, state: RunState, done: bool, phema: PowerEMA | None = None,
                  before_save=None) -> tuple[float, bool]:
        """After an optimiser step: write the post-hoc EMA snapshots on their cadence and at the end (`phema`, when
        on), then save if the cadence, the end of training or a signal on any rank asks for it; `before_save()` runs
        first whenever something is written (the trainer's check for non-finite losses). Returns (seconds spent
        saving, whether the run stops now to be resumed: a signal arrived)."""
        preempted = self.signalled(state.step)
        snapshot = phema is not None and (state.step % self.phema_every == 0 or done)
        if before_save is not None and (snapshot or state.step % self.every == 0 or done or preempted):
            before_save()
        seconds = 0.0
        if snapshot:
            t0 = time.perf_counter()  # before the checkpoint: a resume from it replays no step of a lost snapshot
            save_snapshots(self.run_dir, engine.module, phema, state.step, self.ctx)
            seconds += time.perf_counter() - t0
        if state.step % self.every == 0 or done or preempted:
            t0 = time.perf_counter()
            path = self.save(engine, ema, state, phema)
            seconds += time.perf_counter() - t0
            if self.ctx.is_main:
                tqdm.write(f"checkpoint {path} written in {time.perf_counter() - t0:.2f} s")
        stop = preempted and not done
        if stop and self.ctx.is_main:
            name = signal.Signals(self.signals.received).name if self.signals.received else "a signal on another rank"
            tqdm.write(f"{name}: checkpoint at step {state.step} written; rerun the same command to resume from it")
        return seconds, stop

    def export(self, state: RunState) -> None:
        """The EMA weights of the newest checkpoint to run.dir/export/ema.safetensors (+ .json), on rank 0."""
        if self.ctx.is_main:
            out = export_ema(self.run_dir, os.path.join(self.run_dir, "export", "ema.safetensors"))
            tqdm.write(f"training done at step {state.step}; EMA weights exported to {out}")


# ---------------------------------------------------------------------------------------------------------- export


def export_ema(run_dir: str, out_path: str, ckpt_dir: str | None = None) -> str:
    """Copy the EMA weights of a run's newest (or given) checkpoint to `out_path` (safetensors) and write
    `out_path` with .json: step, the model's task and constructor arguments, the latent space (autoencoder,
    scale), the training data's identity (kind, resolution, text encoder) and the resolved config, so eval can
    rebuild the model without the training data. Returns out_path."""
    ckpt_dir = ckpt_dir or latest_checkpoint(run_dir)
    if ckpt_dir is None:
        raise FileNotFoundError(f"run directory {run_dir!r} has no complete checkpoint to export")
    record = export_record(ckpt_dir)
    write_export(load_weights(os.path.join(ckpt_dir, "ema.safetensors")), record, out_path,
                 {"step": str(record["step"]), "source": os.path.abspath(ckpt_dir)})
    return out_path


def export_record(ckpt_dir: str) -> dict:
    """The .json record of an export of checkpoint `ckpt_dir`: step, model, latent space, data, config."""
    with open(os.path.join(ckpt_dir, "config.yaml")) as f:
        config = yaml.safe_load(f)
    state = read_state(ckpt_dir)
    return {"step": state["step"], "model": state["model"], "latent": state["latent"], "data": state.get("data", {}),
            "config": config}


def write_export(weights: dict[str, torch.Tensor], record: dict, out_path: str, metadata: dict[str, str]) -> None:
    """`weights` to `out_path` (safetensors, with `metadata`) and `record` to `out_path` with .json, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with atomic_path(out_path) as tmp:
        save_file(weights, tmp, metadata=metadata)
    write_json_atomic(os.path.splitext(out_path)[0] + ".json", record)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Export a run's EMA weights to one safetensors file for eval.")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output .safetensors path (a .json with config and step is written beside)")
    p.add_argument("--checkpoint", default=None, help="a step_* directory (default: the newest)")
    args = p.parse_args(argv)
    print(export_ema(args.run_dir, args.out, args.checkpoint))


if __name__ == "__main__":
    main()
