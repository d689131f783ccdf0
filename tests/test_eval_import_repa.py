"""Import of official REPA checkpoints: architecture inference, strict keys, outputs, export for generation."""
import argparse
import json
import os

import pytest
import torch
from torch import nn

from class_cond.models import build_sit
from conftest import meta_state_dict
from class_cond.import_repa import check_keys, infer_sit_kwargs, load_repa_checkpoint, main
from eval.loading import load_eval_model, objective_config, resolve_weights

KEYS_FILE = os.path.join(os.path.dirname(__file__), "data", "repa_sit_xl2_keys.txt")  # official SiT-XL/2 (see header)
SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=6, num_classes=5,
             repa_depth=1, encoder_dims=(16,), projector_dim=32)


def _official_checkpoint(path, extra_args=None, **kw):
    """A checkpoint in the reference layout: {'model', 'ema', 'args' (Namespace), 'steps'}, random weights."""
    torch.manual_seed(0)
    ema = build_sit({**SMALL, **kw})
    for p in ema.parameters():
        nn.init.normal_(p, std=0.05)
    model_sd = {k: v + 1.0 for k, v in ema.state_dict().items()}
    args = argparse.Namespace(model="SiT-S/2", encoder_depth=1, enc_type="dinov2-vit-b", num_classes=5,
                              **(extra_args or {}))
    torch.save({"model": model_sd, "ema": ema.state_dict(), "opt": {}, "args": args, "steps": 1234}, path)
    return ema


def test_official_checkpoint_converts_and_matches_direct_loading(tmp_path):
    ema = _official_checkpoint(tmp_path / "ckpt.pt")
    # args.model says S/2 (6 heads) but the shapes say hidden 48, not 384: the head count must be given
    with pytest.raises(ValueError, match="num_heads"):
        load_repa_checkpoint(str(tmp_path / "ckpt.pt"))
    model = load_repa_checkpoint(str(tmp_path / "ckpt.pt"), num_heads=6)
    assert not model.training and model.repa_steps == 1234
    assert model.sit_kwargs["repa_depth"] == 1 and model.sit_kwargs["num_classes"] == 5
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0, 4, 5])  # 5 = null
    with torch.no_grad():
        v, zs = model(x, t, y)
        v_ref, zs_ref = ema.eval()(x, t, y)
    assert torch.equal(v, v_ref) and len(zs) == 1 and torch.equal(zs[0], zs_ref[0])
    raw = load_repa_checkpoint(str(tmp_path / "ckpt.pt"), use_ema=False, num_heads=6)
    assert torch.allclose(raw.x_embedder.proj.bias, ema.x_embedder.proj.bias + 1.0)


def test_cli_export_is_usable_by_generation(tmp_path):
    ema = _official_checkpoint(tmp_path / "ckpt.pt", learn_sigma=True)
    main([str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "out.safetensors"), "--num-heads", "6"])
    meta = json.loads((tmp_path / "out.json").read_text())
    assert meta["step"] == 1234 and meta["model"]["task"] == "class_cond"
    assert meta["model"]["kwargs"]["learn_sigma"] is True and meta["config"]["args"]["model"] == "SiT-S/2"
    assert meta["latent"] == {"autoencoder": "stabilityai/sd-vae-ft-ema", "scale_factor": 0.18215, "shift": 0.0,
                              "shape": [4, 8, 8]}
    model, loaded_meta = load_eval_model(str(tmp_path / "out.safetensors"))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.9]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(model(x, t, y)[0], ema.eval()(x, t, y)[0])


def test_strict_key_check_names_the_first_mismatch(tmp_path):
    model = build_sit(SMALL)
    sd = dict(model.state_dict())
    bad = dict(sd, **{"blocks.1.mlp.fc1.weight": torch.zeros(7, 48)})
    with pytest.raises(ValueError, match=r"key 'blocks.1.mlp.fc1.weight' has shape \(7, 48\) in the file but \(192, 48\) in our model"):
        check_keys(model, bad)
    with pytest.raises(ValueError, match="lacks key 'final_layer.linear.bias'"):
        check_keys(model, {k: v for k, v in sd.items() if k != "final_layer.linear.bias"})
    with pytest.raises(ValueError, match="has key 'extra.weight'"):
        check_keys(model, dict(sd, **{"extra.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="unknown model override"):
        infer_sit_kwargs(sd, {}, num_head=3)


def test_reference_sit_xl2_key_list_maps_onto_our_model():
    """The official SiT-XL/2+REPA state-dict keys (tests/data/repa_sit_xl2_keys.txt) infer XL/2 and matches our state dict, on the meta device."""
    state = meta_state_dict(KEYS_FILE)
    kwargs = infer_sit_kwargs(state, {"model": "SiT-XL/2", "encoder_depth": 8})
    assert {k: kwargs[k] for k in ("hidden_size", "depth", "num_heads", "patch_size", "input_size", "num_classes",
                                   "encoder_dims", "projector_dim", "learn_sigma", "repa_depth")} == {
        "hidden_size": 1152, "depth": 28, "num_heads": 16, "patch_size": 2, "input_size": 32, "num_classes": 1000,
        "encoder_dims": [768], "projector_dim": 2048, "learn_sigma": False, "repa_depth": 8}
    with torch.device("meta"):
        model = build_sit(kwargs)
    check_keys(model, state)


def test_export_records_the_checkpoints_path_type_and_weighting(tmp_path):
    """The SDE's score depends on the path: a cosine-path REPA checkpoint must be recorded as such."""
    _official_checkpoint(tmp_path / "cos.pt", {"path_type": "cosine", "weighting": "lognormal"})
    main([str(tmp_path / "cos.pt"), "--out", str(tmp_path / "cos.safetensors"), "--num-heads", "6"])
    cfg = objective_config(resolve_weights(str(tmp_path / "cos.safetensors"))[1])
    assert (cfg.kind, cfg.path, cfg.time_sampling) == ("transport", "cosine", "lognormal")
    _official_checkpoint(tmp_path / "lin.pt")  # no path_type in args: the reference's default, linear
    main([str(tmp_path / "lin.pt"), "--out", str(tmp_path / "lin.safetensors"), "--num-heads", "6"])
    cfg = objective_config(resolve_weights(str(tmp_path / "lin.safetensors"))[1])
    assert (cfg.path, cfg.time_sampling) == ("linear", "uniform")
    _official_checkpoint(tmp_path / "bad.pt", {"path_type": "sine"})
    with pytest.raises(SystemExit, match="path_type='sine'; supported: linear, cosine"):
        main([str(tmp_path / "bad.pt"), "--out", str(tmp_path / "bad.safetensors"), "--num-heads", "6"])
