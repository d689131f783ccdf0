"""DiT + REPA (improved-DDPM objective) through the one trainer: two CPU ranks learn, resume is bit-exact."""
import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import load_file

from conftest import REPO, run_train
from core.checkpoint import list_checkpoints
from core.logging import read_metrics

DIT_TINY = os.path.join(REPO, "configs", "debug", "dit_tiny.yaml")


def dit_args(run_dir, *overrides):
    return ["--config", DIT_TINY, f"run.dir={run_dir}", "train.num_workers=0", "data.synthetic_samples=256",
            "train.tensorboard=false", *overrides]


def test_two_rank_dit_repa_training_learns_and_generates(tmp_path):
    run = tmp_path / "run"
    run_train(dit_args(run, "train.max_steps=40", "train.log_every=10", "train.ckpt_every=40"),
              launcher="deepspeed", ranks=2)
    records = read_metrics(run)
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    first, last = records[0], records[-1]
    assert last["denoise_loss"] < first["denoise_loss"] - 0.3, records  # eps-MSE + VLB of the tiny DiT
    assert last["repa_loss"] < first["repa_loss"] - 0.2, records
    meta = json.load(open(run / "export" / "ema.json"))
    assert meta["config"]["objective"]["kind"] == "ddpm" and meta["model"]["kwargs"]["learn_sigma"] is True
    ema = load_file(run / "export" / "ema.safetensors")
    assert ema["final_layer.linear.weight"].shape[0] == 2 * 2 * 24  # patch 2 x 2, 2 x 12 channels
    assert "projectors.0.0.weight" in ema
    from eval.generate import main as generate_main

    generate_main(["--run", str(run), "--steps", "10", "--num-samples", "2", "--out", str(tmp_path / "samples")])
    settings = json.load(open(tmp_path / "samples" / "generation.json"))
    assert settings["sampler"] == "ddpm" and settings["step"] == 40
    assert np.load(tmp_path / "samples" / "samples.npz")["arr_0"].shape == (2, 32, 32, 3)


def test_dit_resume_is_bit_identical(tmp_path):
    common = ("train.max_steps=6", "train.ckpt_every=3", "train.log_every=1", "train.deterministic=true",
              "train.global_batch=8")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(dit_args(straight, *common))
    # the run directory as a run preempted after its step-3 checkpoint would have left it
    shutil.copytree(straight, resumed)
    for later in ("checkpoints/step_00000006", "export"):
        shutil.rmtree(resumed / later)
    records = read_metrics(resumed)
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= 3))
    out = run_train(dit_args(resumed, *common))
    assert "at step 3" in out.stdout + out.stderr
    la = {r["step"]: r["loss"] for r in read_metrics(straight)}
    lb = {r["step"]: r["loss"] for r in read_metrics(resumed)}
    assert sorted(lb) == list(range(1, 7)) and all(la[s] == lb[s] for s in range(4, 7)), (la, lb)
    ema_a = load_file(straight / "checkpoints" / "step_00000006" / "ema.safetensors")
    ema_b = load_file(resumed / "checkpoints" / "step_00000006" / "ema.safetensors")
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert [s for s, _ in list_checkpoints(resumed)] == [3, 6]
