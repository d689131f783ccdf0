"""Training's faults and stops on CPU: preemption signals and Ctrl-C, the run-directory lock, non-finite losses,
what a resume refuses and what it replays. Launchers, learning, SIGKILL and precision: tests/test_training.py."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import REPO, cpu_env, launch_cmd, run_train
from core.checkpoint import list_checkpoints
from core.logging import read_metrics


def _start_long_run(run, tiny_args):
    """A training that would run for hours, started as `python -m`; returns once it logged its first step."""
    args = tiny_args("train.max_steps=100000", "train.ckpt_every=100000", "train.log_every=1", run_dir=run)
    cmd = launch_cmd("python", os.path.join(REPO, "class_cond/train.py"), 1) + args
    proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists():  # the first logged step: the signal handlers are installed
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT])
def test_a_second_training_is_refused_and_a_signal_checkpoints_and_exits_for_requeue(tmp_path, tiny_args, sig):
    """While a run trains, a second training on its run directory is refused, naming the first, which goes on.
    Then Slurm's USR1 and a Ctrl-C (SIGINT) alike: a checkpoint after the step in progress, exit 75, no traceback;
    rerunning the same command resumes from it."""
    run = tmp_path / "run"
    first = _start_long_run(run, tiny_args)
    try:
        second = run_train(tiny_args("train.max_steps=2", run_dir=run), check=False)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another training (host {socket.gethostname()}, pid {first.pid}, since" in second.stderr
        assert first.poll() is None  # the first goes on, its files untouched by the second
        first.send_signal(sig)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate(timeout=60)
    assert first.returncode == 75, out[-2000:]
    (step, path), = list_checkpoints(run)
    assert step > 0 and f"checkpoint at step {step} written; rerun the same command to resume from it" in out
    assert "Traceback" not in out
    # rerunning the same command resumes from that step
    done = run_train(tiny_args(f"train.max_steps={step + 3}", "train.ckpt_every=100000", "train.log_every=1",
                               run_dir=run))
    assert f"resumed from {path} at step {step}" in done.stdout + done.stderr
    assert max(s for s, _ in list_checkpoints(run)) == step + 3


def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path, tiny_args):
    run = tmp_path / "run"
    proc = _start_long_run(run, tiny_args)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    assert "interrupted: stopped at once without a checkpoint" in out and "Traceback" not in out


def _edit_newest_state(run, edit) -> tuple[str, str]:
    """Change the newest checkpoint's state.json with `edit(state)` in place; returns its path and its text as
    training wrote it."""
    state_file = os.path.join(list_checkpoints(run)[-1][1], "state.json")
    with open(state_file) as f:
        written = f.read()
    state = json.loads(written)
    edit(state)
    with open(state_file, "w") as f:
        json.dump(state, f)
    return state_file, written


def test_one_run_dir_resumed_through_replay_refusals_and_non_finite_losses(tmp_path, tiny_args):
    """One run directory, rerun as a user would after each event (each rerun a resume of the one before):
    1. steps logged after the newest checkpoint (a kill between logging and saving) are replayed on resume: the
       metrics file and TensorBoard read as one run, each step once;
    2. a changed config is refused, the change named; more steps are bookkeeping, not a change;
    3. the same config and weight shapes of another model (as when a preset's head count changes): refused, named;
    4. a loss turning non-finite stops the run (exit 1), naming the newest checkpoint, which stays the newest;
    5. with train.skip_nonfinite=true such steps are skipped and counted instead."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"

    def train(*overrides, check=True):
        return run_train(tiny_args("train.ckpt_every=3", "train.log_every=1", "train.tensorboard=true", *overrides,
                                   run_dir=run), check=check)

    # 1. replay
    train("train.max_steps=6")
    shutil.rmtree(run / "checkpoints" / "step_00000006")  # as if killed after logging step 6, before its save
    train("train.max_steps=8")
    with open(run / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 9))
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))

    # 2. a config change is refused; more steps are not one
    proc = train("train.max_steps=10", "train.lr=5e-4", check=False)
    assert proc.returncode == 2 and "different config" in proc.stderr and "allow_config_change" in proc.stderr
    assert "train.lr: 0.001 -> 0.0005" in proc.stderr  # the change is named
    assert max(s for s, _ in list_checkpoints(run)) == 8  # nothing trained or written
    train("train.max_steps=10")
    assert [s for s, _ in list_checkpoints(run)] == [9, 10]

    # 3. another model with the same config and weight shapes
    state_file, written = _edit_newest_state(run, lambda s: s["model"]["kwargs"].update(
        num_heads=2 * s["model"]["kwargs"]["num_heads"]))
    heads = json.loads(written)["model"]["kwargs"]["num_heads"]
    proc = train("train.max_steps=12", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"num_heads: {heads * 2} in the checkpoint, {heads} now" in proc.stderr
    assert [s for s, _ in list_checkpoints(run)] == [9, 10]  # nothing trained or written
    with open(state_file, "w") as f:  # the checkpoint as training wrote it, for the steps below
        f.write(written)

    # 4. lr so large the weights blow up: the loss turns non-finite within a few steps
    proc = train("train.max_steps=60", "train.lr=1e30", "run.allow_config_change=true", "train.ckpt_every=1000",
                 "train.log_every=20", check=False)
    assert proc.returncode == 1
    assert "non-finite loss at step" in proc.stderr and "step_00000010" in proc.stderr
    assert [s for s, _ in list_checkpoints(run)] == [9, 10]

    # 5. skipped and counted
    train("train.max_steps=16", "train.lr=1e30", "train.skip_nonfinite=true", "run.allow_config_change=true")
    record = read_metrics(run)[-1]
    assert record["step"] == 16 and record["skipped_steps"] > 0
