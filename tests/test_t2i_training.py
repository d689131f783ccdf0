"""Text-to-image training through the shared trainer, on shapes captions prepared by the real data_prep.coco."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, copy_as_killed_after, run_train
from core.checkpoint import list_checkpoints
from core.logging import read_metrics

T2I_TINY = os.path.join(REPO, "configs", "debug", "t2i_tiny.yaml")


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    """The tiny config's generated dataset, made once by what its data.kind=synthetic runs (t2i.data's generator,
    through data_prep.coco), with the config's settings, and shared by the tests here as a prepared dataset."""
    from core.config import load_config
    from t2i.data import make_synthetic_t2i
    from t2i.task import T2IConfig

    d = load_config(T2IConfig, T2I_TINY, ["data.synthetic_samples=128"]).data
    root = tmp_path_factory.mktemp("shapes") / "data"
    make_synthetic_t2i(str(root), d.synthetic_samples, d.synthetic_resolution, d.synthetic_text_encoder,
                       d.synthetic_autoencoder, seed=0, text_tokens=d.synthetic_text_tokens)
    return root


def t2i_args(run_dir, data, *overrides):
    return ["--config", T2I_TINY, f"run.dir={run_dir}", "data.kind=shards", f"data.path={data / 'train'}",
            "train.num_workers=0", "train.tensorboard=false", *overrides]


def test_generated_set_went_through_data_prep(shapes_data):
    train = json.load(open(shapes_data / "train" / "manifest.json"))
    val = json.load(open(shapes_data / "val" / "manifest.json"))
    assert train["kind"] == "t2i" and train["num_samples"] == 128 and train["text_encoder"] == "clip-tiny"
    assert train["input_counts"]["captions"] == 5 * 128  # five paraphrases per image, COCO-style
    assert val["num_samples"] == 16 and val["fid_stats"]["is_proxy"] is True
    assert os.path.isfile(shapes_data / "val" / val["fid_captions"])


def test_two_rank_t2i_training_learns(tmp_path, shapes_data):
    run = tmp_path / "run"
    run_train(t2i_args(run, shapes_data, "train.max_steps=60", "train.log_every=20", "train.ckpt_every=30"),
              launcher="deepspeed", ranks=2, script="t2i/train.py")
    records = read_metrics(run)
    assert [r["step"] for r in records] == [20, 40, 60]
    assert records[-1]["denoise_loss"] < records[0]["denoise_loss"] - 0.1, records
    assert records[-1]["repa_loss"] < records[0]["repa_loss"], records
    meta = json.load(open(run / "export" / "ema.json"))
    assert meta["model"]["task"] == "t2i" and meta["data"]["text_encoder"] == "clip-tiny"
    assert meta["model"]["kwargs"]["text_dim"] == 32 and [s for s, _ in list_checkpoints(run)] == [30, 60]


def test_resume_replays_caption_choice(tmp_path, shapes_data):
    """6 steps + resume to 12 equals 12 straight steps bit for bit: the caption each draw used is replayed."""
    common = ("train.ds_config=ds_configs/zero2_fp32.json", "train.deterministic=true", "train.ckpt_every=6",
              "train.max_steps=12", "train.log_every=3")
    run_train(t2i_args(tmp_path / "straight", shapes_data, *common), script="t2i/train.py")
    copy_as_killed_after(tmp_path / "straight", tmp_path / "resumed", 6)
    out = run_train(t2i_args(tmp_path / "resumed", shapes_data, *common), script="t2i/train.py")
    assert "at step 6" in out.stdout + out.stderr
    a = load_file(tmp_path / "straight" / "export" / "ema.safetensors")
    b = load_file(tmp_path / "resumed" / "export" / "ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight")}
    lb = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "resumed")}
    assert la == lb


def test_t2i_sample_cli_writes_a_captioned_grid(tmp_path, shapes_data):
    run = tmp_path / "run"
    run_train(t2i_args(run, shapes_data, "train.max_steps=2"), script="t2i/train.py")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle above a blue square\n\na green square above a yellow triangle\n")
    out = run_train(["--run", str(run), "--prompt-file", str(prompts), "--sampler", "sde", "--steps", "4",
                     "--cfg", "2", "--out", str(tmp_path / "grid.png")], script="t2i/sample.py")
    assert "2 samples (sde, 4 steps, cfg 2.0)" in out.stdout
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size[0] >= 2 * 64
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    bad = run_train(["--run", str(run), "--prompt-file", str(empty), "--out", str(tmp_path / "x.png")],
                    script="t2i/sample.py", check=False)
    assert bad.returncode == 2 and "no prompts" in bad.stderr


@pytest.mark.parametrize("ds_config", ["zero2", "zero3_dsbf16"])
def test_mmdit_bf16_and_activation_checkpointing_under_zero(tmp_path, shapes_data, ds_config):
    """bf16 (autocast / DeepSpeed native) with activation checkpointing trains the MMDiT under ZeRO-2 and -3."""
    run = tmp_path / "run"
    run_train(t2i_args(run, shapes_data, f"train.ds_config=ds_configs/{ds_config}.json", "model.grad_checkpointing=true",
                       "train.max_steps=4", "train.log_every=2"), script="t2i/train.py")
    records = read_metrics(run)
    assert [r["step"] for r in records] == [2, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
