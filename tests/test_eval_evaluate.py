"""eval.evaluate: generate then score, proxy features against a prepared dataset's images."""
import json

import pytest

from class_cond.data import make_synthetic_class_cond
from eval.evaluate import main
from test_eval_generate import write_export


def test_generate_then_proxy_fid_into_metrics_json(tmp_path, capsys):
    export = write_export(tmp_path / "ema.safetensors")  # 12x4x4 pixel-s2d2 latents -> 8 px images
    make_synthetic_class_cond(str(tmp_path / "data"), 32, 3, 8, seed=0, factor=2)
    metrics = main(["--run", str(export), "--sampler", "ode", "--steps", "3", "--cfg", "1.5", "--num-samples", "12",
                    "--batch-size", "6", "--ref", str(tmp_path / "data"), "--features", "proxy"])
    out = tmp_path / "ema_eval" / "ode3_cfg1.5_0-1_n12_seed0"
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["is_proxy"] and "fid" not in metrics and metrics["proxy_fid"] > 0
    assert metrics["num_samples"] == 12 and metrics["num_reference"] == 32 and metrics["checkpoint_step"] == 7
    assert metrics["generation"]["cfg"] == 1.5 and metrics["generation"]["sampler"] == "ode"
    assert "PROXY FID (random-init features, not comparable to published FID)" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a reference without mu/sigma is a clear error, exit code 2
        (tmp_path / "bad.npz").write_bytes(b"not an npz")
        main(["--run", str(export), "--sampler", "ode", "--steps", "3", "--num-samples", "2", "--ref",
              str(tmp_path / "bad.npz"), "--features", "proxy", "--out", str(tmp_path / "o")])


def test_default_output_folder_names_the_precision():
    import argparse

    from eval.evaluate import default_out

    args = argparse.Namespace(run="/w/ema.safetensors", sampler="sde", steps=250, heun=False, cfg=1.8,
                              guidance_interval=(0.0, 0.7), num_samples=50000, seed=0, precision="fp32",
                              cls_cfg=None, time_shift=1.0)
    assert default_out(args) == "/w/ema_eval/sde250_cfg1.8_0-0.7_n50000_seed0"  # fp32 names as before
    args.precision = "bf16"
    assert default_out(args) == "/w/ema_eval/sde250_cfg1.8_0-0.7_n50000_seed0_bf16"
    args.cls_cfg = 2.3  # a REG model's token guidance
    assert default_out(args) == "/w/ema_eval/sde250_cfg1.8_0-0.7_n50000_seed0_bf16_clscfg2.3"
    args.time_shift = 0.3  # LightningDiT's ODE grid
    assert default_out(args) == "/w/ema_eval/sde250_cfg1.8_0-0.7_n50000_seed0_bf16_clscfg2.3_shift0.3"
