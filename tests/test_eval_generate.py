"""Generation end to end on a tiny SiT export: PNGs, ADM .npz, resume, sharding, task registry, errors."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from conftest import REPO, assert_images_close, cpu_env, free_port
from class_cond.models import build_sit
from eval.generate import main as generate_main
from eval.generate import sample_generator, shard
from eval.loading import load_eval_model
from core.task import get_task

KWARGS = {"depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 2, "input_size": 4, "in_channels": 12,
          "num_classes": 3, "repa_depth": 1, "encoder_dims": [8], "projector_dim": 16, "qk_norm": False,
          "learn_sigma": False}
LATENT = {"autoencoder": "pixel-s2d2", "scale_factor": 1.0, "shift": 0.0, "shape": [12, 4, 4]}


def write_export(path, task="class_cond", seed=0):
    """A random-init tiny SiT (non-zero output) in the export layout: ema.safetensors + ema.json."""
    torch.manual_seed(seed)
    model = build_sit(KWARGS)
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    save_file(model.state_dict(), str(path))
    meta = {"step": 7, "model": {"task": task, "kwargs": KWARGS}, "latent": LATENT, "config": {}}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


@pytest.fixture
def export(tmp_path):
    return write_export(tmp_path / "ema.safetensors")


def _gen(export, out, *extra):
    generate_main(["--run", str(export), "--sampler", "sde", "--steps", "6", "--cfg", "2.0", "--guidance-interval",
                   "0", "0.7", "--num-samples", "7", "--batch-size", "3", "--seed", "5", "--out", str(out), *extra])


def test_generate_writes_pngs_npz_and_settings(export, tmp_path):
    out = tmp_path / "samples"
    _gen(export, out)
    pngs = sorted(os.listdir(out / "images"))
    assert pngs == [f"{i:06d}.png" for i in range(7)]
    npz = np.load(out / "samples.npz", allow_pickle=False)
    assert npz["arr_0"].shape == (7, 8, 8, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [0, 1, 2, 0, 1, 2, 0]  # class-balanced: i % num_classes
    assert np.array_equal(npz["arr_0"][4], np.asarray(Image.open(out / "images" / "000004.png")))
    assert npz["arr_0"].std() > 5  # real images, not a constant
    settings = json.loads((out / "generation.json").read_text())
    assert settings["step"] == 7 and settings["sampler"] == "sde" and settings["nfe"] == 6
    assert settings["guidance_interval"] == [0.0, 0.7] and settings["num_samples"] == 7


def test_resume_regenerates_only_missing_and_batching_does_not_matter(export, tmp_path, capsys):
    out = tmp_path / "samples"
    _gen(export, out)
    first = np.load(out / "samples.npz")["arr_0"]
    os.remove(out / "images" / "000005.png")
    mtime = os.path.getmtime(out / "images" / "000001.png")
    _gen(export, out, "--batch-size", "2")  # resume with another batch size: the same image 5 comes back
    assert os.path.getmtime(out / "images" / "000001.png") == mtime
    again = np.load(out / "samples.npz")["arr_0"]
    assert np.array_equal(np.delete(again, 5, 0), np.delete(first, 5, 0))  # the PNGs left alone: same bytes
    assert_images_close(again[5], first[5])  # image 5 redrawn alone, first in batch [3, 4, 5]: round-off only
    other = tmp_path / "other_seed"
    _gen(export, other, "--seed", "6")
    assert not np.array_equal(np.load(other / "samples.npz")["arr_0"], first)
    with pytest.raises(SystemExit) as exc:  # one line, exit 2: a user's error, not a traceback
        _gen(export, out, "--cfg", "3.0")
    assert exc.value.code == 2 and "holds samples made with other settings (cfg" in capsys.readouterr().err


def test_ode_sampler_and_no_guidance(export, tmp_path):
    generate_main(["--run", str(export), "--sampler", "ode", "--steps", "4", "--heun", "--num-samples", "3",
                   "--batch-size", "3", "--out", str(tmp_path / "ode")])
    settings = json.loads((tmp_path / "ode" / "generation.json").read_text())
    assert settings["nfe"] == 7 and settings["heun"] is True
    assert np.load(tmp_path / "ode" / "samples.npz")["arr_0"].shape == (3, 8, 8, 3)


def test_loading_from_a_run_directory_checkpoint(export, tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000007"
    ckpt.mkdir(parents=True)
    os.replace(export, ckpt / "ema.safetensors")
    (ckpt / "state.json").write_text(json.dumps({"step": 7, "model": {"task": "class_cond", "kwargs": KWARGS},
                                                 "latent": LATENT}))
    model, meta = load_eval_model(str(tmp_path / "run"))
    assert meta["step"] == 7 and not model.training and model.y_embedder.num_classes == 3


def test_unknown_task_and_missing_records_are_clear_errors(tmp_path):
    bad = write_export(tmp_path / "bad.safetensors", task="video")
    with pytest.raises(ValueError, match="unknown task 'video'.*registered tasks: class_cond, t2i"):
        load_eval_model(str(bad))
    old = write_export(tmp_path / "old.safetensors")
    old.with_suffix(".json").write_text(json.dumps({"step": 1, "config": {}}))
    with pytest.raises(ValueError, match="no 'model' entry"):
        load_eval_model(str(old))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_eval_model(str(tmp_path))
    assert get_task("class_cond").name == "class_cond"


def test_seeds_and_shards():
    assert [len(shard(10, r, 3)) for r in range(3)] == [4, 3, 3]
    assert [i for r in range(3) for i in shard(10, r, 3)] == list(range(10))
    a = torch.randn(3, generator=sample_generator(0, 1))
    assert torch.equal(a, torch.randn(3, generator=sample_generator(0, 1)))
    assert not torch.equal(a, torch.randn(3, generator=sample_generator(0, 2)))
    assert not torch.equal(a, torch.randn(3, generator=sample_generator(1, 1)))


def test_two_processes_under_accelerate_match_one(export, tmp_path):
    """`accelerate launch` with two CPU ranks: each rank its slice; images identical to a single process."""
    _gen(export, tmp_path / "one")
    cmd = [sys.executable, "-m", "eval.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), "-m", "eval.generate", "--run", str(export), "--sampler", "sde", "--steps", "6",
           "--cfg", "2.0", "--guidance-interval", "0", "0.7", "--num-samples", "7", "--batch-size", "3", "--seed",
           "5", "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: 4 images" in proc.stdout and "rank 1: 3 images" in proc.stdout
    two, one = np.load(tmp_path / "two" / "samples.npz"), np.load(tmp_path / "one" / "samples.npz")
    # one process: batches [0-2], [3-5], [6]; two: [0-2], [3] and [4-6], one thread each: round-off only
    assert_images_close(two["arr_0"], one["arr_0"])
    assert np.array_equal(two["arr_1"], one["arr_1"])


def test_a_rerun_with_another_precision_is_refused(export, tmp_path, capsys):
    out = tmp_path / "samples"
    _gen(export, out)
    assert json.loads((out / "generation.json").read_text())["precision"] == "fp32"
    with pytest.raises(SystemExit):
        _gen(export, out, "--precision", "bf16")
    assert "other settings (precision: ['fp32'] there, ['bf16'] now)" in capsys.readouterr().err


@pytest.mark.parametrize("option,value,message", [
    ("--cfg", "-1", "--cfg must be >= 0, got -1.0"),
    ("--cfg", "nan", "--cfg must be >= 0, got nan"),
    ("--t-last", "0", r"--t-last must be in \(0, 1\), got 0.0"),
    ("--t-last", "1.5", r"--t-last must be in \(0, 1\), got 1.5"),
    ("--steps", "1", "--steps must be >= 2 for the SDE sampler"),
])
def test_bad_values_are_refused_before_anything_is_written(export, tmp_path, capsys, option, value, message):
    out = tmp_path / "samples"
    with pytest.raises(SystemExit) as exc:
        _gen(export, out, option, value)
    assert exc.value.code == 2 and not out.exists()
    assert re.search(message, capsys.readouterr().err)


def test_sde_follows_the_recorded_transport_path(export, tmp_path):
    """The same weights recorded with objective.path=cosine: SDE images change (the score follows the path), ODE
    images do not (it integrates the velocity only)."""
    cosine = tmp_path / "cos" / "ema.safetensors"
    cosine.parent.mkdir()
    shutil.copy(export, cosine)
    meta = json.loads(export.with_suffix(".json").read_text())
    meta["config"] = {"objective": {"kind": "transport", "path": "cosine"}}
    cosine.with_suffix(".json").write_text(json.dumps(meta))
    arrays, paths = {}, {}
    for name, run in (("lin", export), ("cos", cosine)):
        for sampler in ("sde", "ode"):
            out = tmp_path / f"{name}_{sampler}"
            generate_main(["--run", str(run), "--sampler", sampler, "--steps", "6", "--num-samples", "3",
                           "--batch-size", "3", "--out", str(out)])
            arrays[name, sampler] = np.load(out / "samples.npz")["arr_0"].astype(int)
            paths[name, sampler] = json.loads((out / "generation.json").read_text()).get("path")
    assert np.array_equal(arrays["lin", "ode"], arrays["cos", "ode"])
    assert np.abs(arrays["lin", "sde"] - arrays["cos", "sde"]).max() > 10
    assert paths == {("lin", "sde"): "linear", ("lin", "ode"): "linear", ("cos", "sde"): "cosine",
                     ("cos", "ode"): "cosine"}


def test_folders_of_the_version_before_the_sampler_fixes_are_not_continued(tmp_path):
    """A record without "path" was written before the cosine-path SDE score and Heun's guidance decision were
    fixed: continuing it with settings those fixes change would mix two samplers' images; other settings continue."""
    from eval.generate import check_settings

    base = {"source": "s", "step": 1, "sampler": "sde", "steps": 4, "heun": False, "cfg": 1.5,
            "guidance_interval": [0.0, 0.7], "t_last": 0.04, "seed": 0, "seeding": "x", "num_samples": 8,
            "autoencoder": "a", "cond_file": None, "precision": "fp32", "conditions": None}
    heun = {**base, "sampler": "ode", "heun": True}
    cases = [(base, "cosine", "the SDE's score on the cosine path"), (heun, "linear", "Heun's corrector"),
             (base, "linear", None), ({**heun, "guidance_interval": [0.0, 1.0]}, "linear", None),
             ({**base, "path": "cosine"}, "cosine", None)]  # a current record carries "path"
    for n, (old, path, message) in enumerate(cases):
        out = tmp_path / str(n)
        out.mkdir()
        (out / "generation.json").write_text(json.dumps(old))
        new = {**old, "path": path}
        if message:
            with pytest.raises(ValueError, match=f"earlier version whose sampler differs .*{re.escape(message)}"):
                check_settings(str(out), new)
        else:
            check_settings(str(out), new)
            assert json.loads((out / "generation.json").read_text())["path"] == path


def test_paper_sampling_presets_load_and_become_the_defaults(export, tmp_path, capsys):
    """configs/eval/*.yaml are valid SamplingPresets; --preset sets the defaults and a given option overrides."""
    from core.config import load_config
    from eval.generate import SamplingPreset

    presets = {p: load_config(SamplingPreset, os.path.join(REPO, "configs", "eval", p))
               for p in os.listdir(os.path.join(REPO, "configs", "eval"))}
    best = presets["in256_sde250_cfg1.8.yaml"]  # the paper's FID 1.42 setting (Table 4)
    assert (best.sampler, best.steps, best.cfg, best.guidance_interval, best.num_samples) == \
        ("sde", 250, 1.8, [0.0, 0.7], 50000)
    assert presets["coco256_sde250.yaml"].cfg == 2.0 and presets["coco256_ode50.yaml"].steps == 50
    preset = tmp_path / "p.yaml"
    preset.write_text("sampler: ode\nsteps: 3\ncfg: 1.5\nguidance_interval: [0.1, 0.6]\nnum_samples: 2\n")
    generate_main(["--run", str(export), "--preset", str(preset), "--out", str(tmp_path / "a")])
    s = json.loads((tmp_path / "a" / "generation.json").read_text())
    assert (s["sampler"], s["steps"], s["cfg"], s["guidance_interval"], s["num_samples"]) == \
        ("ode", 3, 1.5, [0.1, 0.6], 2)
    generate_main(["--run", str(export), "--preset", str(preset), "--steps", "2", "--out", str(tmp_path / "b")])
    assert json.loads((tmp_path / "b" / "generation.json").read_text())["steps"] == 2  # the option wins
    preset.write_text("stepz: 3\n")
    with pytest.raises(SystemExit):
        generate_main(["--run", str(export), "--preset", str(preset), "--out", str(tmp_path / "c")])
    assert "--preset: unknown config key 'stepz' (did you mean 'steps'?)" in capsys.readouterr().err


def test_progress_moves_at_every_model_evaluation_within_a_batch(export):
    """A 250-step SDE batch used to show 0 images until its end; the bar now advances at every evaluation."""
    from eval.generate import Generator

    gen = Generator.load(str(export), sampler="sde", steps=6, cfg=2.0, guidance_interval=(0.0, 0.7), seed=5)
    ticks = []
    images = gen.images([0, 1, 2], progress=ticks.append)
    assert len(ticks) == 6 and sum(ticks) == pytest.approx(3) and images.shape[0] == 3  # NFE 6, 3 images
    ode = Generator.load(str(export), sampler="ode", steps=4, heun=True)
    ticks.clear()
    ode.images([0], progress=ticks.append)
    assert len(ticks) == 7 and sum(ticks) == pytest.approx(1)  # Heun: 2N - 1 evaluations
