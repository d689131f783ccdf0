"""eval.export_diffusers: tiny random-init SiT / DiT / MMDiT written as diffusers models, loaded back by diffusers,
give our models' outputs (float32, max abs difference < 1e-5; measured ~5e-7) and sample as our ODE sampler."""
import json
import os

import numpy as np
import pytest
import torch
from diffusers import (DDPMScheduler, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler,
                       SD3Transformer2DModel)
from safetensors.torch import save_file
from torch import nn

import eval.export_diffusers as export_diffusers
from core.diffusion import GaussianDiffusion, beta_schedule
from core.task import get_task
from eval.export_diffusers import ExportError, export, match_reference
from eval.samplers import ode_sample

SIT = {"depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 2, "input_size": 4, "in_channels": 12,
       "num_classes": 3, "repa_depth": 1, "encoder_dims": [8], "projector_dim": 16, "qk_norm": False,
       "learn_sigma": False}
MMDIT = {"depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 2, "input_size": 4, "in_channels": 12,
         "text_dim": 16, "repa_depth": 1, "encoder_dims": [8], "projector_dim": 16}
LATENT = {"autoencoder": "sd-vae-ft-ema", "scale_factor": 0.18215, "shift": 0.0, "shape": [12, 4, 4]}
TOL = 1e-5


def write_run(folder, kwargs, task="class_cond", objective=None, seed=0):
    """A random-init tiny model (non-zero adaLN and heads, so every weight matters) as ema.safetensors + .json."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = get_task(task).build_model(kwargs)
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    save_file(model.state_dict(), str(folder / "ema.safetensors"))
    meta = {"step": 7, "model": {"task": task, "kwargs": kwargs}, "latent": LATENT,
            "config": {"objective": objective or {}}}
    (folder / "ema.json").write_text(json.dumps(meta))
    return model.eval(), str(folder / "ema.safetensors")


def exported(tmp_path, kwargs, **run):
    model, source = write_run(tmp_path / "run", kwargs, **run)
    out = tmp_path / "diffusers"
    export(source, str(out))
    return model, out


@pytest.mark.parametrize("qk_norm", [False, True])
def test_sit_equals_ditransformer2d_on_the_flow_matching_timestep_scale(tmp_path, qk_norm):
    ours, out = exported(tmp_path, {**SIT, "qk_norm": qk_norm})
    theirs = DiTTransformer2DModel.from_pretrained(out / "transformer").eval()
    x, t = torch.randn(4, 12, 4, 4), torch.tensor([0.0, 0.3, 0.7, 1.0])
    y = torch.tensor([0, 1, 2, 3])  # 3 = the null class in both tables
    with torch.no_grad():
        want = ours(x, t, y)[0]
        stock = theirs(x, timestep=t * 1000, class_labels=y).sample
        got = match_reference(theirs, str(out))(x, timestep=t * 1000, class_labels=y).sample
    assert (got - want).abs().max() < TOL
    assert (stock - want).abs().max() > 1e-2  # diffusers' own time features (and no q/k norm) are another model


def test_dit_with_learned_sigma_equals_on_step_indices(tmp_path):
    ours, out = exported(tmp_path, {**SIT, "learn_sigma": True}, objective={"kind": "ddpm"})
    theirs = DiTTransformer2DModel.from_pretrained(out / "transformer").eval()
    assert theirs.config.out_channels == 24
    x, s, y = torch.randn(4, 12, 4, 4), torch.tensor([0.0, 10.0, 500.0, 999.0]), torch.tensor([3, 0, 1, 2])
    with torch.no_grad():
        want = ours(x, s, y)[0]
        stock = theirs(x, timestep=s, class_labels=y).sample
        got = match_reference(theirs, str(out))(x, timestep=s, class_labels=y).sample
    assert (got - want).abs().max() < TOL
    assert (stock - want).abs().max() > 1e-2  # downscale_freq_shift=1: frequencies 10000^(-k/127), not ^(-k/128)


def test_flow_matching_scheduler_loop_equals_our_euler_sampler(tmp_path):
    ours, out = exported(tmp_path, SIT)
    record = json.loads((out / "repa_export.json").read_text())
    assert record["latent"] == LATENT and record["null_condition"] == {"class_labels": 3}
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.shift == 1.0 and not scheduler.config.use_dynamic_shifting
    transformer = match_reference(DiTTransformer2DModel.from_pretrained(out / "transformer"), str(out)).eval()
    noise, y, steps = torch.randn(3, 12, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 2, 3]), 4
    with torch.no_grad():
        want = ode_sample(lambda x, t: ours(x.float(), t.float().expand(len(x)), y)[0], noise, steps)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])  # our grid: linspace(1, 0, N + 1)
        x = noise
        for t in scheduler.timesteps:
            v = transformer(x, timestep=t.expand(len(x)), class_labels=y).sample
            x = scheduler.step(v, t, x).prev_sample
    assert torch.allclose(scheduler.sigmas, torch.linspace(1, 0, steps + 1))
    assert (want - x).abs().max() < TOL and want.abs().max() > 0.1


def test_ddpm_scheduler_has_our_betas_and_learned_range_step(tmp_path):
    ours, out = exported(tmp_path, {**SIT, "learn_sigma": True}, objective={"kind": "ddpm"})
    scheduler = DDPMScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.variance_type == "learned_range" and scheduler.config.prediction_type == "epsilon"
    assert not scheduler.config.clip_sample and scheduler.config.num_train_timesteps == 1000
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000))
    assert torch.allclose(scheduler.betas.double(), diffusion.betas, atol=0, rtol=2e-7)  # theirs: float32
    transformer = match_reference(DiTTransformer2DModel.from_pretrained(out / "transformer"), str(out)).eval()
    x, y, s = torch.randn(2, 12, 4, 4), torch.tensor([1, 3]), 500
    with torch.no_grad():
        pred = transformer(x, timestep=torch.tensor([s, s]), class_labels=y).sample
        got = scheduler.step(pred, s, x, generator=torch.Generator().manual_seed(2)).prev_sample
        mean, log_var, _ = diffusion.p_mean_variance(ours(x, torch.tensor([500.0, 500.0]), y)[0].double(), x.double(),
                                                     torch.tensor([s, s]))
    want = mean + (0.5 * log_var).exp() * torch.randn(2, 12, 4, 4, generator=torch.Generator().manual_seed(2))
    assert (got.double() - want).abs().max() < TOL


def test_cosine_betas_map_to_squaredcos(tmp_path):
    _, out = exported(tmp_path, {**SIT, "learn_sigma": True}, objective={"kind": "ddpm", "beta_schedule": "cosine"})
    scheduler = DDPMScheduler.from_pretrained(out / "scheduler")
    assert torch.allclose(scheduler.betas.double(), beta_schedule("cosine", 1000), atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", [{"qk_norm": True, "pooled_text": True}, {"pre_only_last": False}])
def test_mmdit_equals_sd3transformer2d(tmp_path, variant):
    ours, out = exported(tmp_path, {**MMDIT, **variant}, task="t2i")
    theirs = match_reference(SD3Transformer2DModel.from_pretrained(out / "transformer"), str(out)).eval()
    assert FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler").config.shift == 1.0
    x, ctx, t = torch.randn(3, 12, 4, 4), torch.randn(3, 5, 16), torch.tensor([0.0, 0.4, 1.0])
    with torch.no_grad():
        want = ours(x, t, ctx)[0]
        got = theirs(x, encoder_hidden_states=ctx, pooled_projections=ctx.mean(1), timestep=t * 1000).sample
    assert (got - want).abs().max() < TOL and want.abs().max() > 0.1


def _nothing_left(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_reg_model_is_refused_and_nothing_is_written(tmp_path):
    _, source = write_run(tmp_path / "run", {**SIT, "reg_dim": 8})
    with pytest.raises(ExportError, match=r"REG model \(reg_dim=8\).*cannot be exported"):
        export(source, str(tmp_path / "out"))
    assert _nothing_left(tmp_path)


def test_unknown_task_missing_run_and_existing_out_are_clear_errors(tmp_path, capsys):
    _, source = write_run(tmp_path / "run", SIT)
    os.replace(source.replace(".safetensors", ".json"), tmp_path / "good.json")
    meta = json.loads((tmp_path / "good.json").read_text())
    meta["model"]["task"] = "video"
    (tmp_path / "run" / "ema.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown task 'video'; registered tasks: class_cond, t2i"):
        export(source, str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        export(str(tmp_path / "run"), str(tmp_path / "out"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="'.*taken' exists"):
        export(source, str(tmp_path / "taken"))
    with pytest.raises(SystemExit) as exit_:
        export_diffusers.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "is neither a directory nor a .safetensors file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.json", "run", "taken"]


def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    _, source = write_run(tmp_path / "run", SIT)

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(export_diffusers, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export(source, str(tmp_path / "out"))
    assert _nothing_left(tmp_path)


def test_cli_writes_the_layout(tmp_path, capsys):
    _, source = write_run(tmp_path / "run", SIT)
    export_diffusers.main([source, "--out", str(tmp_path / "out")])
    assert "wrote DiTTransformer2DModel (step 7)" in capsys.readouterr().out
    files = sorted(os.path.relpath(os.path.join(r, f), tmp_path / "out") for r, _, fs in os.walk(tmp_path / "out")
                   for f in fs)
    assert files == ["repa_export.json", "scheduler/scheduler_config.json", "transformer/config.json",
                     "transformer/diffusion_pytorch_model.safetensors"]


def test_lightningdit_switches_are_refused_and_nothing_is_written(tmp_path):
    _, source = write_run(tmp_path / "run", {**SIT, "norm": "rmsnorm", "rope": True})
    with pytest.raises(ExportError, match=r"LightningDiT's norm=rmsnorm, rope=True cannot be exported"):
        export(source, str(tmp_path / "out"))
    assert _nothing_left(tmp_path)
