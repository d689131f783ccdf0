"""End-to-end training on CPU through the real launchers: learning, ZeRO stages, bit-exact rerun after a SIGKILL,
bf16. Signals, locks, non-finite losses and resume checks: tests/test_training_faults.py."""
import json
import os
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, cpu_env, launch_cmd, run_train
from core.checkpoint import list_checkpoints
from core.logging import JSONL_KEYS, read_metrics


def _assert_two_rank_run_learned_and_exported(run, steps: int):
    """The uninterrupted two-rank run of `steps` steps (log every 5, checkpoint every 10) learned, checkpointed
    and exported a model its export alone rebuilds."""
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(5, steps + 1, 5))
    assert set(JSONL_KEYS) <= set(records[0])
    first, last = records[0], records[-1]
    assert last["denoise_loss"] < first["denoise_loss"] - 0.1, records  # learns the class-conditional data
    assert last["repa_loss"] < first["repa_loss"] - 0.2, records  # projector aligns with the (random) encoder
    assert all(r["img_per_s"] > 0 and r["lr"] == pytest.approx(1e-3) for r in records)
    assert [s for s, _ in list_checkpoints(run)] == [steps - 10, steps]  # the cadence, run.keep_last=2 of them
    state = json.load(open(run / "checkpoints" / f"step_{steps:08d}" / "state.json"))
    assert state["world_size"] == 2 and state["step"] == steps
    assert os.path.isfile(run / "checkpoints" / f"step_{steps:08d}" / "rng_rank1.json")
    ema = load_file(run / "export" / "ema.safetensors")
    assert "pos_embed" in ema and "projectors.0.0.weight" in ema
    # the export alone rebuilds the model: constructor arguments and latent space are recorded beside it
    meta = json.load(open(run / "export" / "ema.json"))
    assert meta["step"] == steps and meta["model"]["task"] == "class_cond"
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
def test_two_rank_training_learns_and_a_sigkilled_rerun_is_bit_identical(tmp_path, tiny_args, launcher, zero):
    """Two ranks under each launcher and ZeRO stage learn and export; a run SIGKILLed mid-way and rerun with the
    same command ends with the same bits as the uninterrupted one (which is the one that learned)."""
    common = (f"train.ds_config=ds_configs/{zero}.json", "train.max_steps=40", "train.ckpt_every=10",
              "train.log_every=5", "train.deterministic=true", "train.num_workers=1")
    straight = tmp_path / "straight"
    run_train(tiny_args(*common, run_dir=straight), launcher=launcher, ranks=2)
    _assert_two_rank_run_learned_and_exported(straight, 40)

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
    out = run_train(args, launcher=launcher, ranks=2)  # the lock went with the killed process: nothing stale
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
    """bf16 autocast over fp32 weights (the default JSONs) and DeepSpeed's native bf16 both run and save. A batch
    of 8: a bf16 step of the tiny model takes ~10x an fp32 one on a CPU without bf16 units."""
    run = tmp_path / "run"
    run_train(tiny_args(f"train.ds_config=ds_configs/{ds_config}.json", "train.max_steps=20", "train.log_every=10",
                        "train.global_batch=8"))
    records = read_metrics(run)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["denoise_loss"] < records[0]["denoise_loss"]
    ema = load_file(run / "export" / "ema.safetensors")
    assert ema["blocks.0.attn.qkv.weight"].dtype == torch.float32


def test_metrics_of_a_replayed_step_read_once_latest_wins(tmp_path):
    lines = [{"step": 10, "loss": 1.0}, {"step": 20, "loss": 0.9}, {"step": 30, "loss": 0.8},  # killed after 30
             {"step": 30, "loss": 0.7}, {"step": 40, "loss": 0.6}]  # resumed from the step-20 checkpoint
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 5')
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(10, 1.0), (20, 0.9), (30, 0.7), (40, 0.6)]


def test_each_rank_gets_its_gpu_whether_it_sees_all_or_one():
    from core.dist import cuda_index

    assert [cuda_index(r, 8) for r in range(8)] == list(range(8))  # every rank sees the node's GPUs
    assert [cuda_index(r, 1) for r in range(8)] == [0] * 8  # srun --gpus-per-task=1: one bound GPU each
    with pytest.raises(RuntimeError, match="local rank 5 has no GPU of its own: 4 are visible"):
        cuda_index(5, 4)
