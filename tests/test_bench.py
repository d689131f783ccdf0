"""core.bench: the training-step benchmark (timing core.trainer.train_step), its FLOP count and its JSON lines."""
import json
import os
import subprocess
import sys

import pytest
import torch

from class_cond.task import ClassCondConfig, ClassCondTask
from core import bench
from core.config import load_config
from core.dist import DistContext
from core.trainer import plan_run
from core.latents import SD_VAE_SCALE, latent_layout
from t2i.task import T2IConfig, T2ITask
from core.text_encoders import text_shape
from conftest import BIN, REPO, cpu_env, free_port

T2I_TINY = os.path.join(REPO, "configs", "debug", "t2i_tiny.yaml")
CC_TINY = os.path.join(REPO, "configs", "debug", "class_cond_tiny.yaml")
XL = os.path.join(REPO, "configs", "class_cond", "sit_xl2_repa_in256.yaml")


def run_bench(*args, check=True):
    cmd = [sys.executable, "-m", "core.bench", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_bench_class_cond_tiny_prints_and_writes_a_json_line(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = run_bench("--config", CC_TINY, "--steps", "3", "--warmup", "1", "--out", str(out), "--peak-tflops", "0.5",
                     "--label", "tiny", "train.global_batch=8")
    for text in ("images/s per device", "ms per step", "peak memory", "GFLOP per image", "MFU",
                 "multiply-add = 2 FLOPs", "median of 3 after 1 warm-up"):
        assert text in proc.stdout, text
    (r,) = read_lines(out)
    assert r["task"] == "class_cond" and r["preset"] == "tiny" and r["label"] == "tiny"
    assert r["batch_per_device"] == 8 and r["micro_batch"] == 8 and r["accum"] == 1 and r["world_size"] == 1
    assert r["latent_shape"] == [12, 16, 16] and r["encoders"] == ["dinov2-tiny"] and r["precision"] == "fp32"
    assert r["ms_per_step_min"] <= r["ms_per_step_median"] <= r["ms_per_step_max"]
    assert r["img_per_s_per_device"] == pytest.approx(8 / (r["ms_per_step_median"] / 1e3))
    model = (r["gflop_per_img_model_fwd"] + r["gflop_per_img_model_bwd"]) * 1e9
    assert r["mfu"] == pytest.approx(model * r["img_per_s_per_device"] / 0.5e12)
    enc = r["gflop_per_img_encoder_fwd"] * 1e9
    assert enc > 0 and r["mfu_with_encoder"] == pytest.approx((model + enc) * r["img_per_s_per_device"] / 0.5e12)
    assert r["peak_memory_gib"] > 0 and "host RSS" in r["peak_memory_kind"]
    assert r["command"].startswith("python -m core.bench --config")


def test_bench_t2i_with_stored_features_runs_no_encoder(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = run_bench("--config", T2I_TINY, "--steps", "2", "--warmup", "1", "--features", "--out", str(out),
                     "train.global_batch=4", "train.micro_batch=2")
    (r,) = read_lines(out)
    assert r["task"] == "t2i" and r["encoders"] == [] and r["gflop_per_img_encoder_fwd"] == 0
    assert r["data"] == "random + stored features" and r["accum"] == 2 and r["batch_per_device"] == 4
    assert r["mfu"] is None and "pass --peak-tflops" in proc.stdout


def test_bench_loader_step_and_loader_only(tmp_path):
    out = tmp_path / "bench.jsonl"
    common = ["--config", CC_TINY, "--data", "loader", "--steps", "2", "--warmup", "1", "--out", str(out),
              "train.global_batch=8", "data.synthetic_samples=64", "train.num_workers=0"]
    run_bench(*common)
    proc = run_bench(*common, "--loader-only")
    step, loader = read_lines(out)
    assert step["mode"] == "step" and step["data"] == "loader"
    assert loader["mode"] == "loader-only" and loader["samples_per_s"] > 0 and loader["num_workers"] == 0
    assert loader["reader_mapped"] and loader["samples"] == 64 and loader["reader_open_s"] > 0
    assert "loader only" in proc.stdout and "opening the reader" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--loader-only"], "add --data loader"),
    (["--data", "loader", "--features"], "--features makes random features"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bench_refuses_inconsistent_options(args, message):
    proc = run_bench("--config", CC_TINY, *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr


def test_random_encoders_keep_the_tiny_ones(tmp_path):
    from core.encoders import random_weights_spec

    assert random_weights_spec("dinov2-b") == random_weights_spec("dinov2-b@/w/dino") == "dinov2-b@random"
    assert random_weights_spec("dinov2-tiny") == "dinov2-tiny"
    out = tmp_path / "bench.jsonl"
    run_bench("--config", CC_TINY, "--steps", "1", "--warmup", "0", "--random-encoders", "--out", str(out),
              "train.global_batch=4")
    assert read_lines(out)[0]["encoders"] == ["dinov2-tiny"]


def test_bench_config_error_after_loading_is_reported_too():
    proc = run_bench("--config", CC_TINY, "train.global_batch=6", "train.micro_batch=4", check=False)
    assert proc.returncode == 2 and "config error" in proc.stderr and "multiple of the micro-batch" in proc.stderr


def test_bench_config_error_names_the_key():
    proc = run_bench("--config", CC_TINY, "train.lrr=1", check=False)
    assert proc.returncode == 2 and "config error" in proc.stderr and "train.lr" in proc.stderr


def test_bench_loader_mode_still_checks_the_data_path():
    proc = run_bench("--config", XL, "--data", "loader", "data.path=/nonexistent/in256", check=False)
    assert proc.returncode == 2 and "data.path" in proc.stderr


def _sit_xl_plan():
    cfg = load_config(ClassCondConfig, XL, check_data=False)
    task = ClassCondTask(cfg, ClassCondTask.random_data(cfg, 256))
    return plan_run(cfg, task, DistContext(0, 1, 0, torch.device("cpu")))


def test_flop_count_of_sit_xl2_matches_the_analytic_count():
    s = _sit_xl_plan()
    flops = bench.count_flops(s, encoders=[])
    n, d, depth, p, c = 256, 1152, 28, 2, 4  # tokens of a 32x32x4 latent at patch 2
    macs = depth * (12 * d * d * n + 2 * n * n * d + 6 * d * d)  # qkv+proj+MLP, QK^T and AV, adaLN
    macs += n * p * p * c * d + 256 * d + d * d  # patch embedding, timestep MLP
    macs += 2 * d * d + n * d * p * p * 2 * c  # final adaLN and linear (learned sigma: 2C outputs)
    macs += n * (d * 2048 + 2048 * 2048 + 2048 * 768)  # REPA projector at block 8
    assert flops["model_fwd"] == pytest.approx(2 * macs, rel=0.002)
    assert flops["model_fwd"] / 1e9 == pytest.approx(238, rel=0.03)  # DiT/SiT papers: 118.6 G (multiply-adds) for XL/2
    assert flops["model_bwd"] == pytest.approx(2 * flops["model_fwd"], rel=0.02)
    assert flops["encoder_fwd"] == 0


def test_flop_count_ignores_activation_checkpointing():
    s = _sit_xl_plan()
    plain = bench.count_flops(s, encoders=[])
    s.cfg.model.grad_checkpointing = True
    assert bench.count_flops(s, encoders=[]) == plain


def test_random_data_shapes():
    cfg = load_config(ClassCondConfig, XL, check_data=False)
    info = ClassCondTask.random_data(cfg, 512)
    assert info.latent_shape == (4, 64, 64) and info.scale == SD_VAE_SCALE and info.manifest["num_classes"] == 1000
    labels = ClassCondTask(cfg, info).random_condition(5, torch.Generator().manual_seed(0))["label"]
    assert labels.shape == (5,) and int(labels.max()) < 1000
    cfg = load_config(T2IConfig, os.path.join(REPO, "configs", "t2i", "coco256_mmdit_repa.yaml"), check_data=False)
    info = T2ITask.random_data(cfg, 256)
    t2i = T2ITask(cfg, info)
    assert info.latent_shape == (4, 32, 32) and t2i.null_context.shape == (77, 768)
    assert t2i.random_condition(3, torch.Generator())["context"].shape == (3, 77, 768)
    tiny = load_config(T2IConfig, T2I_TINY)
    assert T2ITask.random_data(tiny, 256).latent_shape == (12, 16, 16)  # the generated set's 32 px, not --resolution


def test_latent_layout_and_text_shape():
    assert latent_layout("pixel-s2d4", 64)["shape"] == [48, 16, 16]
    assert latent_layout("stabilityai/sd-vae-ft-ema", 256)["shape"] == [4, 32, 32]
    with pytest.raises(ValueError, match="not divisible"):
        latent_layout("sd-vae", 100)
    assert text_shape("clip-l") == (77, 768) and text_shape("openclip-tiny") == (77, 32)
    with pytest.raises(ValueError, match="known only once it is loaded"):
        text_shape("openclip:ViT-bigG-14")


def test_precision_and_peaks(monkeypatch):
    assert bench.precision({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}) == "bf16"
    assert bench.precision({"bf16": {"enabled": True}}) == "bf16"
    assert bench.precision({"zero_optimization": {"stage": 2}}) == "fp32"
    assert bench.peak_tflops(torch.device("cpu"), "bf16")[0] is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert bench.peak_tflops(torch.device("cuda", 0), "bf16")[0] == 989.4
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert bench.peak_tflops(torch.device("cuda", 0), "bf16")[0] == 756.5
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert "pass --peak-tflops" in bench.peak_tflops(torch.device("cuda", 0), "bf16")[1]


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None if name == "deepspeed" else object())
    with pytest.raises(SystemExit, match="missing Python package\\(s\\) deepspeed"):
        bench._require(["deepspeed", "transformers"])


def test_compiled_blocks_match_eager():
    """train.compile=true: the blocks compiled in place give the eager outputs and the same state dict."""
    from class_cond.models import build_model
    from core.trainer import compile_blocks

    torch.manual_seed(0)
    model = build_model("tiny", input_size=8, num_classes=4, encoder_dims=(16,), projector_dim=32, repa_depth=2)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3])
    out, zs = model(x, t, y)
    keys = list(model.state_dict())
    compile_blocks(model)
    out_c, zs_c = model(x, t, y)
    assert list(model.state_dict()) == keys
    # compiled kernels fuse and reorder float ops: equal up to round-off, not bit for bit
    assert torch.allclose(out_c, out, atol=1e-5) and torch.allclose(zs_c[0], zs[0], atol=1e-5)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in model.blocks)


def test_bench_under_the_deepspeed_launcher_reports_once_per_run(tmp_path):
    """Two ranks reading one generated dataset (made by rank 0 in a scratch directory both ranks share)."""
    out = tmp_path / "bench.jsonl"
    cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
           "core.bench", "--config", CC_TINY, "--steps", "2", "--warmup", "1", "--out", str(out), "--data",
           "loader", "train.global_batch=8", "data.synthetic_samples=64", "train.num_workers=0"]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = read_lines(out)  # rank 0 writes the line
    assert r["world_size"] == 2 and r["batch_per_device"] == 4 and proc.stdout.count("images/s per device") == 1
