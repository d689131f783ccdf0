"""DiT runs through eval: sampler choice from the recorded objective, generation, evaluation, official-DiT import."""
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from class_cond.data import make_synthetic_class_cond
from class_cond.import_repa import check_keys, infer_sit_kwargs, main as import_main
from class_cond.models import build_sit
from conftest import assert_images_close
from core.config import ObjectiveConfig, to_dict
from eval.evaluate import main as evaluate_main
from eval.generate import Generator, pick_sampler
from eval.generate import main as generate_main
from eval.loading import load_eval_model, objective_config
from test_eval_generate import KWARGS, LATENT, write_export

DIT_KWARGS = {**KWARGS, "learn_sigma": True, "encoder_dims": []}


def write_dit_export(path, seed=0):
    """A random-init tiny DiT (2C output channels) in the export layout, its config naming the ddpm objective."""
    torch.manual_seed(seed)
    model = build_sit(DIT_KWARGS)
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    save_file(model.state_dict(), str(path))
    meta = {"step": 3, "model": {"task": "class_cond", "kwargs": DIT_KWARGS}, "latent": LATENT,
            "config": {"objective": to_dict(ObjectiveConfig(kind="ddpm"))}}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path, model


def test_sampler_follows_the_recorded_objective(tmp_path):
    dit, _ = write_dit_export(tmp_path / "dit.safetensors")
    sit = write_export(tmp_path / "sit.safetensors")
    assert pick_sampler("ddpm", None) == "ddpm" and pick_sampler("transport", None) == "sde"
    assert Generator.load(str(dit), steps=10).settings["sampler"] == "ddpm"
    assert Generator.load(str(sit), steps=10).settings["sampler"] == "sde"  # records without an objective: SiT
    assert objective_config(load_eval_model(str(dit))[1]).diffusion_steps == 1000
    with pytest.raises(ValueError, match="sampler 'ode' does not fit this model's objective 'ddpm': use one of ddpm"):
        Generator.load(str(dit), sampler="ode")
    with pytest.raises(ValueError, match="sampler 'ddim' does not fit this model's objective 'transport'"):
        Generator.load(str(sit), sampler="ddim")
    with pytest.raises(ValueError, match="cannot take 2000 sampling steps from a 1000-step diffusion"):
        Generator.load(str(dit), steps=2000)
    with pytest.raises(SystemExit):  # the CLI names the misfit before generating anything
        generate_main(["--run", str(dit), "--sampler", "sde", "--out", str(tmp_path / "x")])


def test_ddpm_and_ddim_generation_with_guidance(tmp_path):
    dit, _ = write_dit_export(tmp_path / "dit.safetensors")
    args = ["--run", str(dit), "--steps", "8", "--cfg", "2.0", "--guidance-interval", "0", "0.7",
            "--num-samples", "5", "--batch-size", "3", "--seed", "1"]
    generate_main(args + ["--out", str(tmp_path / "ddpm")])
    settings = json.loads((tmp_path / "ddpm" / "generation.json").read_text())
    assert settings["sampler"] == "ddpm" and settings["objective"] == "ddpm" and settings["nfe"] == 8
    a = np.load(tmp_path / "ddpm" / "samples.npz")["arr_0"]
    assert a.shape == (5, 8, 8, 3) and a.std() > 5
    generate_main(args + ["--batch-size", "5", "--out", str(tmp_path / "ddpm2")])  # per-sample seeding
    # the same images up to the round-off of another batch size
    assert_images_close(np.load(tmp_path / "ddpm2" / "samples.npz")["arr_0"], a)
    generate_main(args + ["--sampler", "ddim", "--out", str(tmp_path / "ddim")])
    b = np.load(tmp_path / "ddim" / "samples.npz")["arr_0"]
    assert b.shape == a.shape and not np.array_equal(a, b)


def test_evaluate_runs_for_a_dit_export(tmp_path):
    dit, _ = write_dit_export(tmp_path / "ema.safetensors")
    make_synthetic_class_cond(str(tmp_path / "data"), 16, 3, 8, seed=0, factor=2)
    metrics = evaluate_main(["--run", str(dit), "--steps", "4", "--num-samples", "6", "--batch-size", "6",
                             "--ref", str(tmp_path / "data"), "--features", "proxy"])
    assert metrics["generation"]["sampler"] == "ddpm" and metrics["proxy_fid"] > 0
    assert (tmp_path / "ema_eval" / "ddpm4_cfg1_0-1_n6_seed0" / "metrics.json").is_file()


def test_official_dit_checkpoint_imports_and_reproduces_its_outputs(tmp_path):
    """A bare state dict in DiT's layout (DiT-XL-2-256x256.pt is one): same keys as our backbone, 2C outputs."""
    _, dit = write_dit_export(tmp_path / "src.safetensors")
    torch.save(dit.state_dict(), tmp_path / "DiT-tiny.pt")
    import_main([str(tmp_path / "DiT-tiny.pt"), "--objective", "ddpm", "--num-heads", "2",
                 "--out", str(tmp_path / "dit.safetensors")])
    meta = json.loads((tmp_path / "dit.json").read_text())
    assert meta["config"]["objective"]["kind"] == "ddpm" and meta["model"]["kwargs"]["learn_sigma"] is True
    assert meta["model"]["kwargs"]["encoder_dims"] == []
    model, loaded = load_eval_model(str(tmp_path / "dit.safetensors"))
    x, s, y = torch.randn(2, 12, 4, 4), torch.tensor([999, 17]), torch.tensor([1, 3])  # 3 = null
    with torch.no_grad():
        assert torch.equal(model(x, s, y)[0], dit.eval()(x, s, y)[0])  # DiT's input: the step index
    assert pick_sampler(objective_config(loaded).kind, None) == "ddpm"  # generation picks DiT's sampler
    # a SiT without learned sigma cannot be imported as a DiT
    sit = build_sit(KWARGS | {"encoder_dims": []})
    torch.save(sit.state_dict(), tmp_path / "sit.pt")
    with pytest.raises(SystemExit, match="needs learned sigma"):
        import_main([str(tmp_path / "sit.pt"), "--objective", "ddpm", "--num-heads", "2", "--out",
                     str(tmp_path / "bad.safetensors")])
    with pytest.raises(SystemExit, match="not one of our presets"):
        import_main([str(tmp_path / "DiT-tiny.pt"), "--model", "DiT-XXL/2", "--out", str(tmp_path / "b.safetensors")])


def _dit_xl2_official_keys() -> dict:
    """Names and shapes of facebookresearch/DiT's DiT-XL/2 (256 px, learn_sigma, 1000 classes + null), by hand."""
    h, keys = 1152, {"pos_embed": (1, 256, 1152), "x_embedder.proj.weight": (1152, 4, 2, 2),
                     "x_embedder.proj.bias": (1152,), "t_embedder.mlp.0.weight": (1152, 256),
                     "t_embedder.mlp.0.bias": (1152,), "t_embedder.mlp.2.weight": (1152, 1152),
                     "t_embedder.mlp.2.bias": (1152,), "y_embedder.embedding_table.weight": (1001, 1152),
                     "final_layer.linear.weight": (2 * 2 * 8, 1152), "final_layer.linear.bias": (32,),
                     "final_layer.adaLN_modulation.1.weight": (2 * 1152, 1152),
                     "final_layer.adaLN_modulation.1.bias": (2 * 1152,)}
    for n in range(28):
        for name, shape in {"attn.qkv": (3 * h, h), "attn.proj": (h, h), "mlp.fc1": (4 * h, h), "mlp.fc2": (h, 4 * h),
                            "adaLN_modulation.1": (6 * h, h)}.items():
            keys[f"blocks.{n}.{name}.weight"], keys[f"blocks.{n}.{name}.bias"] = shape, (shape[0],)
    return {k: torch.empty(v, device="meta") for k, v in keys.items()}


def test_official_dit_xl2_layout_maps_onto_our_backbone():
    state = _dit_xl2_official_keys()
    kwargs = infer_sit_kwargs(state, {"model": "DiT-XL/2"})
    assert {k: kwargs[k] for k in ("hidden_size", "depth", "num_heads", "input_size", "num_classes", "learn_sigma",
                                   "encoder_dims")} == {
        "hidden_size": 1152, "depth": 28, "num_heads": 16, "input_size": 32, "num_classes": 1000,
        "learn_sigma": True, "encoder_dims": []}
    with torch.device("meta"):
        model = build_sit(kwargs)
    check_keys(model, state)
    assert re.match(r"blocks\.27\.", [k for k in state if k.startswith("blocks.27")][0])
