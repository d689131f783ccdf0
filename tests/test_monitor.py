"""Watching a run while it trains (eval/monitor.py): grids, evaluations and validation losses at their steps, the
same whether or not the run was resumed, and the training itself untouched; W&B offline; the run report."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, copy_as_killed_after, run_train
from core.logging import read_metrics

MONITOR = ("monitor.sample_every=3", "monitor.sample_count=6", "monitor.sample_steps=3", "monitor.eval_every=6",
           "monitor.eval_samples=12", "monitor.eval_steps=2", "monitor.eval_features=proxy", "monitor.val_every=3",
           "monitor.val_samples=12")


def records(run) -> list[dict]:
    with open(run / "eval.jsonl") as f:
        return [json.loads(line) for line in f]


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_grids_and_records_at_their_steps_and_the_training_untouched(tmp_path, tiny_args):
    on, off = tmp_path / "on", tmp_path / "off"
    common = ("train.max_steps=6", "train.log_every=3", "train.deterministic=true")
    run_train(tiny_args(*common, *MONITOR, "train.tensorboard=true", "monitor.wandb=true",
                        "monitor.wandb_mode=offline", run_dir=on))
    run_train(tiny_args(*common, run_dir=off))
    assert [r["loss"] for r in read_metrics(on)] == [r["loss"] for r in read_metrics(off)]  # bit for bit
    assert sorted(os.listdir(on / "samples")) == ["step_00000003.png", "step_00000006.png"]
    grid = pixels(on / "samples" / "step_00000006.png")
    assert grid.shape[1] == 6 * 160 and grid.std() > 10  # six captioned cells: "class 0", ... with images
    assert [(r["step"], r["kind"]) for r in records(on)] == [(3, "val"), (6, "val"), (6, "eval")]
    val, ev = records(on)[0], records(on)[2]
    assert val["num_samples"] == 12 and val["held_out"] is False and {"val_loss@0.1", "val_loss@0.9"} <= set(val)
    assert val["val_loss"] == pytest.approx(np.mean([val[f"val_loss@{t}"] for t in (0.1, 0.3, 0.5, 0.7, 0.9)]))
    # the tiny run's REPA encoder is a random-init DINOv2 and the FID features a proxy: labelled so
    assert ev["is_proxy"] is True and {"proxy_fid", "proxy_fd_dinov2"} <= set(ev) and "fid" not in ev
    assert ev["num_samples"] == 12 and ev["proxy_fid"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(on / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [3, 6] and events.Scalars("eval/proxy_fid")
    (offline,) = [d for d in os.listdir(on / "wandb") if d.startswith("offline-run-")]
    run_id = (on / "wandb_id").read_text()
    assert offline.endswith(run_id) and os.listdir(on / "wandb" / offline / "files")
    from eval.report import main as report_main  # the run report reads what the monitor wrote

    assert report_main([str(on)]) == 0
    html = (on / "report" / "index.html").read_text()
    assert "PROXY" in html and "step_00000006.png" in html and "validation.png" in html


def test_a_resumed_run_draws_the_same_grid_and_keeps_its_wandb_run(tmp_path, tiny_args):
    common = ("train.log_every=3", "train.ckpt_every=3", "train.deterministic=true", "monitor.sample_every=3",
              "monitor.sample_count=4", "monitor.sample_steps=3", "monitor.val_every=3", "monitor.val_samples=8",
              "monitor.wandb=true", "monitor.wandb_mode=offline")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(tiny_args("train.max_steps=6", *common, run_dir=straight))
    copy_as_killed_after(straight, resumed, 3)  # killed after the step-3 save: grid 6 and later records redone
    (resumed / "samples" / "step_00000006.png").unlink()
    run_id = (resumed / "wandb_id").read_text()
    run_train(tiny_args("train.max_steps=6", *common, run_dir=resumed))
    assert (resumed / "wandb_id").read_text() == run_id  # one W&B run for the whole run
    for step in (3, 6):
        name = f"step_{step:08d}.png"
        assert np.array_equal(pixels(straight / "samples" / name), pixels(resumed / "samples" / name)), step
    assert records(straight) == records(resumed)  # the validation losses too: same weights, fixed noise


def test_settings_that_cannot_work_are_refused_before_the_model(tmp_path):
    """The monitor is built from the plan, before the model: its settings fail there, named (core.train prints
    them as config errors, exit 2)."""
    from class_cond.task import ClassCondConfig, ClassCondTask
    from conftest import TINY
    from core.config import ConfigError, load_config
    from core.dist import DistContext
    from core.trainer import plan_run
    from eval.monitor import TrainingMonitor

    def monitor(*overrides):
        cfg = load_config(ClassCondConfig, TINY, [f"run.dir={tmp_path}", *overrides])
        plan = plan_run(cfg, ClassCondTask(cfg, ClassCondTask.random_data(cfg, 32)),
                        DistContext(0, 1, 0, torch.device("cpu")))
        return TrainingMonitor(plan)

    refs = tmp_path / "refs"
    refs.mkdir()
    with pytest.raises(ConfigError, match="monitor.eval_ref: .*none' does not exist"):
        monitor("monitor.eval_every=1", f"monitor.eval_ref={tmp_path / 'none'}")
    with pytest.raises(ConfigError, match="monitor.eval_ref: .*refs' holds no images"):
        monitor("monitor.eval_every=1", f"monitor.eval_ref={refs}")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(refs / "0.png")
    with pytest.raises(ConfigError, match="monitor.clip_score scores images against captions"):
        monitor("monitor.eval_every=1", f"monitor.eval_ref={refs}", "monitor.clip_score=tiny")
    with pytest.raises(ConfigError, match="monitor.fd_encoder: unknown encoder 'dinov9'"):
        monitor("monitor.eval_every=1", f"monitor.eval_ref={refs}", "monitor.fd_encoder=dinov9")
    with pytest.raises(ConfigError, match=r"monitor.val_times must be times in \(0, 1\]"):
        monitor("monitor.val_times=[0.0]")
    assert monitor("monitor.eval_every=1", f"monitor.eval_ref={refs}").fd_spec == "dinov2-tiny"  # the run's


def test_text_to_image_evaluation_uses_the_val_captions_and_scores_them_with_clip(tmp_path):
    run = tmp_path / "run"
    t2i = os.path.join(REPO, "configs", "debug", "t2i_tiny.yaml")
    run_train(["--config", t2i, f"run.dir={run}", "data.synthetic_samples=64", "train.num_workers=0",
               "train.tensorboard=false", "train.max_steps=2", "monitor.eval_every=2", "monitor.eval_samples=8",
               "monitor.eval_steps=2", "monitor.eval_features=proxy", "monitor.clip_score=tiny",
               "monitor.sample_every=2", "monitor.sample_count=4", "monitor.sample_steps=2"], script="t2i/train.py")
    (ev,) = records(run)
    assert {"proxy_fid", "proxy_fd_dinov2", "proxy_clip_score"} <= set(ev) and 0 <= ev["proxy_clip_score"] <= 100
    assert "clip tiny" in ev["features"]
    grid = pixels(run / "samples" / "step_00000002.png")
    assert grid.shape[0] > 2 * 32 + 11  # a row of images with the first training captions written under them


def test_the_validation_loss_is_the_objectives_own(tmp_path):
    """At a fixed t and noise the monitor's denoising loss is the training objective's velocity MSE."""
    from class_cond.models import build_model
    from core.transport import Transport
    from eval.monitor import denoising_loss

    torch.manual_seed(0)
    model = build_model("tiny", input_size=8, num_classes=4, encoder_dims=(), repa_depth=2).eval()
    x0, eps, y = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 4])
    t = torch.full((3,), 0.3)
    x_t, target = Transport("linear").interpolate(x0, eps, t)
    with torch.no_grad():
        want = (model(x_t, t, y)[0] - target).pow(2).flatten(1).mean(1)
        got = denoising_loss(Transport("linear"), model, x0, eps, 0.3, {"y": y})
    assert torch.allclose(got, want)


