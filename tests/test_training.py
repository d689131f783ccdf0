"""End-to-end training on CPU through the real launchers: learning, ZeRO stages, resume, signals, faults."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, cpu_env, launch_cmd, run_train
from core.checkpoint import list_checkpoints
from core.logging import JSONL_KEYS, read_metrics


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir)]


@pytest.mark.parametrize("launcher,zero", [("deepspeed", "zero2_fp32"), ("torchrun", "zero3_fp32")])
def test_two_rank_training_learns(tmp_path, tiny_args, launcher, zero):
    run = tmp_path / "run"
    run_train(tiny_args(f"train.ds_config=ds_configs/{zero}.json", "train.max_steps=60", "train.log_every=10",
                        "train.ckpt_every=30"), launcher=launcher, ranks=2)
    records = read_metrics(run)
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    assert set(JSONL_KEYS) <= set(records[0])
    first, last = records[0], records[-1]
    assert last["denoise_loss"] < first["denoise_loss"] - 0.1, records  # learns the class-conditional data
    assert last["repa_loss"] < first["repa_loss"] - 0.2, records  # projector aligns with the (random) encoder
    assert all(r["img_per_s"] > 0 and r["lr"] == pytest.approx(1e-3) for r in records)
    assert [s for s, _ in list_checkpoints(run)] == [30, 60]
    state = json.load(open(run / "checkpoints" / "step_00000060" / "state.json"))
    assert state["world_size"] == 2 and state["step"] == 60
    assert os.path.isfile(run / "checkpoints" / "step_00000060" / "rng_rank1.json")
    ema = load_file(run / "export" / "ema.safetensors")
    assert "pos_embed" in ema and "projectors.0.0.weight" in ema
    # the export alone rebuilds the model: constructor arguments and latent space are recorded beside it
    meta = json.load(open(run / "export" / "ema.json"))
    assert meta["step"] == 60 and meta["model"]["task"] == "class_cond"
    assert meta["latent"]["autoencoder"] == "pixel-s2d2" and meta["config"]["model"]["preset"] == "tiny"
    from class_cond.models import build_sit

    model = build_sit(meta["model"]["kwargs"])
    model.load_state_dict(ema, strict=True)
    assert model.y_embedder.embedding_table.num_embeddings == 4 + 1 and model.input_size == 16


def _kill_tree(proc):
    """SIGKILL a launcher and every process under it (torchrun starts its workers in sessions of their own)."""
    import psutil

    procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=30)


def _model_weights(ckpt_dir):
    """Every rank's saved model/optimizer tensors (ZeRO-3 keeps each rank's partition in its own file)."""
    out = {}
    for f in sorted(os.listdir(ckpt_dir)):
        if f.endswith(".pt"):
            state = torch.load(os.path.join(ckpt_dir, f), map_location="cpu", weights_only=False)
            out.update({f"{f}:{k}": v for k, v in _tensors(state).items()})
    return out


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k2: v2 for k, v in obj.items() for k2, v2 in _tensors(v, f"{prefix}.{k}").items()}
    if isinstance(obj, (list, tuple)):
        return {k2: v2 for i, v in enumerate(obj) for k2, v2 in _tensors(v, f"{prefix}.{i}").items()}
    return {}


@pytest.mark.parametrize("launcher,zero", [("torchrun", "zero2_fp32"), ("deepspeed", "zero3_fp32")])
def test_sigkill_and_rerun_is_bit_identical(tmp_path, tiny_args, launcher, zero):
    """A run SIGKILLed mid-way and rerun with the same command ends with the same bits as an uninterrupted one."""
    common = (f"train.ds_config=ds_configs/{zero}.json", "train.max_steps=40", "train.ckpt_every=10",
              "train.log_every=5", "train.deterministic=true", "train.num_workers=1")
    straight = tmp_path / "straight"
    run_train(tiny_args(*common, run_dir=straight), launcher=launcher, ranks=2)

    killed = tmp_path / "killed"
    args = tiny_args(*common, run_dir=killed)
    cmd = launch_cmd(launcher, os.path.join(REPO, "class_cond/train.py"), 2) + args
    proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while not any(s >= 20 for s, _ in list_checkpoints(killed)):
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    _kill_tree(proc)
    stopped_at = max(s for s, _ in list_checkpoints(killed))
    assert 20 <= stopped_at < 40
    out = run_train(args, launcher=launcher, ranks=2)
    assert f"at step {stopped_at}" in out.stdout + out.stderr

    a, b = straight / "checkpoints" / "step_00000040", killed / "checkpoints" / "step_00000040"
    wa, wb = _model_weights(a), _model_weights(b)
    assert len(wa) > 10 and wa.keys() == wb.keys()  # model, optimizer moments and fp32 partitions of all ranks
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    ema_a, ema_b = load_file(a / "ema.safetensors"), load_file(b / "ema.safetensors")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # the resumed run logged the same losses as the uninterrupted one from where it picked up
    la = {r["step"]: r["loss"] for r in read_metrics(straight)}
    lb = {r["step"]: r["loss"] for r in read_metrics(killed)}
    assert all(la[s] == lb[s] for s in la if s > stopped_at)


@pytest.mark.parametrize("ds_config", ["zero1", "zero3_dsbf16"])
def test_bf16_precisions_train(tmp_path, tiny_args, ds_config):
    """bf16 autocast over fp32 weights (the default JSONs) and DeepSpeed's native bf16 both run and save."""
    run = tmp_path / "run"
    run_train(tiny_args(f"train.ds_config=ds_configs/{ds_config}.json", "train.max_steps=20", "train.log_every=10"))
    records = read_metrics(run)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["denoise_loss"] < records[0]["denoise_loss"]
    ema = load_file(run / "export" / "ema.safetensors")
    assert ema["blocks.0.attn.qkv.weight"].dtype == torch.float32


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
def test_a_signal_checkpoints_and_exits_for_requeue(tmp_path, tiny_args, sig):
    """Slurm's USR1 and a Ctrl-C (SIGINT) alike: a checkpoint after the step in progress, exit 75, no traceback."""
    run = tmp_path / "run"
    proc = _start_long_run(run, tiny_args)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-2000:]
    (step, path), = list_checkpoints(run)
    assert step > 0 and f"checkpoint at step {step} written; rerun the same command to resume from it" in out
    assert "Traceback" not in out
    # rerunning the same command resumes from that step
    done = run_train(tiny_args(f"train.max_steps={step + 3}", "train.ckpt_every=100000", "train.log_every=1",
                               run_dir=run))
    assert f"resumed from {path} at step {step}" in done.stdout + done.stderr
    assert max(s for s, _ in list_checkpoints(run)) == step + 3


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, tiny_args):
    run = tmp_path / "run"
    run_train(tiny_args("train.max_steps=4", "train.ckpt_every=2", run_dir=run))
    # lr so large the weights blow up: the loss turns non-finite within a few steps
    proc = run_train(tiny_args("train.max_steps=60", "train.lr=1e30", "run.allow_config_change=true",
                               "train.ckpt_every=1000", run_dir=run), check=False)
    assert proc.returncode == 1
    assert "non-finite loss at step" in proc.stderr and "step_00000004" in proc.stderr
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]


def test_nan_loss_skipped_and_counted(tmp_path, tiny_args):
    run = tmp_path / "run"
    run_train(tiny_args("train.max_steps=12", "train.lr=1e30", "train.skip_nonfinite=true", "train.log_every=12",
                        run_dir=run))
    (record,) = read_metrics(run)
    assert record["step"] == 12 and record["skipped_steps"] > 0


def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path, tiny_args):
    run = tmp_path / "run"
    proc = _start_long_run(run, tiny_args)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    assert "interrupted: stopped at once without a checkpoint" in out and "Traceback" not in out


def test_a_second_training_on_the_same_run_dir_is_refused_naming_the_first(tmp_path, tiny_args):
    run = tmp_path / "run"
    first = _start_long_run(run, tiny_args)
    try:
        second = run_train(tiny_args("train.max_steps=2", run_dir=run), check=False)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another training (host {socket.gethostname()}, pid {first.pid}, since" in second.stderr
        assert first.poll() is None  # the first goes on, its files untouched by the second
    finally:
        first.kill()  # SIGKILL: the lock goes with the process, nothing stale is left
        first.communicate(timeout=60)
    run_train(tiny_args("train.max_steps=2", "run.allow_config_change=true", run_dir=run))


def test_a_resumed_run_drops_what_was_logged_past_its_checkpoint(tmp_path, tiny_args):
    """Steps logged after the newest checkpoint (a kill between logging and saving) are replayed on resume: the
    metrics file and TensorBoard read as one run, each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    args = ("train.ckpt_every=3", "train.log_every=1", "train.tensorboard=true")
    run_train(tiny_args("train.max_steps=6", *args, run_dir=run))
    shutil.rmtree(run / "checkpoints" / "step_00000006")  # as if killed after logging step 6, before its save
    run_train(tiny_args("train.max_steps=8", *args, run_dir=run))
    with open(run / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 9))
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))


def test_metrics_of_a_replayed_step_read_once_latest_wins(tmp_path):
    lines = [{"step": 10, "loss": 1.0}, {"step": 20, "loss": 0.9}, {"step": 30, "loss": 0.8},  # killed after 30
             {"step": 30, "loss": 0.7}, {"step": 40, "loss": 0.6}]  # resumed from the step-20 checkpoint
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 5')
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(10, 1.0), (20, 0.9), (30, 0.7), (40, 0.6)]


def _two_steps_then_edit_state(run, tiny_args, edit) -> dict:
    """Train 2 steps into `run`, then change its checkpoint's state.json with `edit(state)` in place; returns the
    state as training wrote it."""
    run_train(tiny_args("train.max_steps=2", run_dir=run))
    (_, ckpt_dir), = list_checkpoints(run)
    state_file = os.path.join(ckpt_dir, "state.json")
    with open(state_file) as f:
        written = f.read()
    state = json.loads(written)
    edit(state)
    with open(state_file, "w") as f:
        json.dump(state, f)
    return json.loads(written)


def test_resume_refuses_a_model_built_with_other_arguments(tmp_path, tiny_args):
    """Same config, same weight shapes, other model (as when a preset's head count changes): refused, named."""
    run = tmp_path / "run"
    trained = _two_steps_then_edit_state(run, tiny_args, lambda s: s["model"]["kwargs"].update(
        num_heads=2 * s["model"]["kwargs"]["num_heads"]))
    heads = trained["model"]["kwargs"]["num_heads"]
    proc = run_train(tiny_args("train.max_steps=4", run_dir=run), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"num_heads: {heads * 2} in the checkpoint, {heads} now" in proc.stderr
    assert max(s for s, _ in list_checkpoints(run)) == 2  # nothing trained or written


def test_config_change_refused_on_resume(tmp_path, tiny_args):
    run = tmp_path / "run"
    run_train(tiny_args("train.max_steps=2", run_dir=run))
    proc = run_train(tiny_args("train.max_steps=4", "train.lr=5e-4", run_dir=run), check=False)
    assert proc.returncode == 2 and "different config" in proc.stderr and "allow_config_change" in proc.stderr
    assert "train.lr: 0.001 -> 0.0005" in proc.stderr  # the change is named
    # bookkeeping keys (more steps) do not count as a change
    run_train(tiny_args("train.max_steps=4", run_dir=run))
    assert max(s for s, _ in list_checkpoints(run)) == 4


def test_each_rank_gets_its_gpu_whether_it_sees_all_or_one():
    from core.dist import cuda_index

    assert [cuda_index(r, 8) for r in range(8)] == list(range(8))  # every rank sees the node's GPUs
    assert [cuda_index(r, 1) for r in range(8)] == [0] * 8  # srun --gpus-per-task=1: one bound GPU each
    with pytest.raises(RuntimeError, match="local rank 5 has no GPU of its own: 4 are visible"):
        cuda_index(5, 4)
