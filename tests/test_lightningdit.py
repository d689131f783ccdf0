"""LightningDiT's recipe as switches (arXiv 2501.01423; hustvl/LightningDiT): RMSNorm, SwiGLU, EVA-02's 2-D RoPE,
the velocity-direction loss, the sampling time shift; patch-1 SiT; and the whole recipe trained on two ranks on
the latents of a tiny f16 AutoencoderKL normalised per channel, resumed bit-exactly, sampled and evaluated."""
import json
import math

import pytest
import torch

from class_cond.models import SIT_PRESETS, build_model
from conftest import REPO, assert_resumed_run_is_identical, copy_as_killed_after, run_train
from core.checkpoint import list_checkpoints
from core.config import ConfigError, load_config
from core.layers import RMSNorm, SwiGLU, apply_rope, rope_2d_tables
from core.logging import read_metrics
from core.transport import Transport
from eval.samplers import ode_sample, shift_times
from test_latent_norm import image_tree, prepare, tiny_vae

TINY = f"{REPO}/configs/debug/class_cond_tiny_lightningdit.yaml"


def test_rmsnorm_and_swiglu_are_lightningdit_s():
    torch.manual_seed(0)
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 8)
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=1e-6)
    xb = x.bfloat16()  # normalised in float32, cast back, then scaled (models/rmsnorm.py)
    assert torch.equal(norm(xb), (x_n := (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True)
                                                                    + 1e-6)).bfloat16()) * norm.weight)
    assert x_n.dtype == torch.bfloat16

    mlp = SwiGLU(1152, 4 * 1152)  # SiT-XL's width: hidden int(2/3 * 4608) = 3072, the GELU MLP's cost
    assert mlp.w12.weight.shape == (2 * 3072, 1152) and mlp.w3.weight.shape == (1152, 3072)
    small = SwiGLU(6, 24)
    y = torch.randn(4, 6)
    a, b = (y @ small.w12.weight.T + small.w12.bias).split(16, dim=-1)
    torch.testing.assert_close(small(y), (a * torch.sigmoid(a) * b) @ small.w3.weight.T + small.w3.bias)


def test_rope_rotates_pairs_by_row_then_column_as_eva02():
    head_dim, grid = 16, 3
    cos, sin = rope_2d_tables(head_dim, grid)
    assert cos.shape == sin.shape == (grid * grid, head_dim)
    q = torch.randn(2, 1, grid * grid, head_dim)
    out = apply_rope(q, (cos, sin))
    # independently: each interleaved pair a complex number, turned by position * 1/10000^(2k/(head_dim/2));
    # the first half of head_dim by the token's row, the second half by its column
    freqs = 1.0 / 10000 ** (torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2))
    for n in range(grid * grid):
        row, col = divmod(n, grid)
        for half, pos in ((0, row), (1, col)):
            seg = q[..., n, half * head_dim // 2:(half + 1) * head_dim // 2]
            z = torch.view_as_complex(seg.reshape(*seg.shape[:-1], -1, 2).contiguous())
            turned = torch.view_as_real(z * torch.polar(torch.ones_like(freqs), pos * freqs)).flatten(-2)
            torch.testing.assert_close(out[..., n, half * head_dim // 2:(half + 1) * head_dim // 2], turned,
                                       rtol=1e-5, atol=1e-6)
    # so a query-key product depends on the offset only: tokens (0,0)-(1,1) and (1,1)-(2,2) agree
    k = q.clone()
    qv, kv = torch.randn(head_dim), torch.randn(head_dim)
    q[..., :, :], k[..., :, :] = qv, kv
    rq, rk = apply_rope(q, (cos, sin)), apply_rope(k, (cos, sin))
    torch.testing.assert_close((rq[0, 0, 0] * rk[0, 0, 4]).sum(), (rq[0, 0, 4] * rk[0, 0, 8]).sum())


def test_sit_switches_patch_one_and_their_parameter_names():
    kw = dict(input_size=8, in_channels=16, num_classes=4, encoder_dims=(32,), repa_depth=2, projector_dim=32)
    assert SIT_PRESETS["XL/1"] == {**SIT_PRESETS["XL/2"], "patch_size": 1}
    plain = build_model("tiny/1", **kw)
    recipe = build_model("tiny/1", norm="rmsnorm", mlp="swiglu", rope=True, qk_norm=True, **kw)
    names = set(dict(recipe.named_parameters()))
    assert {"blocks.0.norm1.weight", "blocks.0.norm2.weight", "blocks.0.attn.q_norm.weight", "blocks.0.mlp.w12.weight",
            "blocks.0.mlp.w3.bias", "final_layer.norm_final.weight"} <= names  # LightningDiT's names
    assert not any("rope" in k for k in recipe.state_dict())  # rebuilt from the arguments, not stored
    assert set(dict(plain.named_parameters())) == set(dict(build_model("tiny", **kw).named_parameters()))
    x, t, y = torch.randn(2, 16, 8, 8), torch.rand(2), torch.tensor([0, 3])
    torch.manual_seed(1)
    for p in recipe.parameters():  # away from adaLN-Zero's init, so every switch is on the output's path
        p.data.normal_(0, 0.05)
    out, zs = recipe(x, t, y)
    assert out.shape == x.shape and zs[0].shape == (2, 64, 32)
    recipe.grad_checkpointing = True
    torch.testing.assert_close(recipe(x, t, y)[0], out)
    recipe.grad_checkpointing = False
    for attr in ("rope",):  # off, the output changes: the switch is in use
        setattr(recipe, attr, False)
        assert not torch.allclose(recipe(x, t, y)[0], out)
        setattr(recipe, attr, True)
    with pytest.raises(ValueError, match="REG's class token"):
        build_model("tiny/1", rope=True, reg_dim=32, **kw)
    with pytest.raises(ValueError, match="norm 'batchnorm' is not one of layernorm, rmsnorm"):
        build_model("tiny/1", norm="batchnorm", **kw)


def test_direction_loss_is_one_minus_cosine_over_channels_averaged_over_positions():
    torch.manual_seed(0)
    pred = torch.randn(3, 4, 2, 2)

    def model(x_t, t, **cond):
        return pred, []

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 2, 2)
    mse, _, extra = Transport(direction_loss=1.0).loss(model, x0, {}, g)
    g = torch.Generator().manual_seed(0)
    torch.rand(3, generator=g)  # t, drawn before the noise
    eps = torch.randn(x0.shape, generator=g)
    v = eps - x0
    cos = (pred * v).sum(1) / (pred.norm(dim=1) * v.norm(dim=1))  # (B, H, W)
    torch.testing.assert_close(extra["direction_loss"], (1 - cos).mean(dim=(1, 2)))
    torch.testing.assert_close(mse, (pred - v).pow(2).mean(dim=(1, 2, 3)))
    assert Transport(direction_loss=1.0).weights == {"direction_loss": 1.0} and Transport().weights == {}
    assert len(Transport().loss(model, x0, {}, torch.Generator().manual_seed(0))) == 2


def test_time_shift_is_lightningdit_s_on_its_reversed_time():
    s, n = 0.3, 9
    theirs = torch.linspace(0, 1, n, dtype=torch.float64)  # its time: 0 noise, 1 data
    theirs = s * theirs / (1 + (s - 1) * theirs)  # transport/integrators.py compute_tm
    ours = shift_times(torch.linspace(1, 0, n, dtype=torch.float64), s)
    torch.testing.assert_close(ours, 1 - theirs, rtol=0, atol=1e-15)
    assert ours[0] == 1 and ours[-1] == 0 and bool((ours.diff() < 0).all())
    assert (ours.diff().abs()[0] < ours.diff().abs()[-1])  # s < 1: small steps near the noise
    assert torch.equal(shift_times(ours, 1.0), ours)
    # the ODE integrates on that grid: v = 2t is exact for Euler only as the sum over the grid's own steps
    x1 = torch.zeros(2, 1)
    got = ode_sample(lambda x, t: 2 * t.view(-1, 1).to(x.dtype).expand_as(x), x1, n - 1, time_shift=s)
    expected = sum((ours[i + 1] - ours[i]) * 2 * ours[i] for i in range(n - 1))
    torch.testing.assert_close(got, torch.full_like(x1, float(expected)))
    with pytest.raises(ValueError, match="time shift must be > 0"):
        shift_times(ours, 0.0)


def test_recipe_config_checks_name_the_key(tmp_path):
    from class_cond.task import ClassCondConfig

    def load(*overrides):
        return load_config(ClassCondConfig, TINY, list(overrides))

    cfg = load()
    assert (cfg.model.norm, cfg.model.mlp, cfg.model.rope, cfg.objective.direction_loss, cfg.train.beta2,
            cfg.data.latent_norm) == ("rmsnorm", "swiglu", True, 1.0, 0.95, "channel")
    for overrides, message in [(("model.norm=batch",), "model.norm: 'batch' is not one of"),
                               (("model.mlp=relu",), "model.mlp: 'relu' is not one of"),
                               (("data.latent_norm=bn",), "data.latent_norm: 'bn' is not one of"),
                               (("data.latent_multiplier=0",), "data.latent_multiplier must be > 0"),
                               (("objective.direction_loss=-1",), "objective.direction_loss must be >= 0"),
                               (("objective.kind=ddpm", "objective.time_sampling=uniform"),
                                "objective.direction_loss=1.0 applies to objective.kind=transport only"),
                               (("reg.coeff=0.03",), "model.rope=true .* REG's class token")]:
        with pytest.raises(ConfigError, match=message):
            load(*overrides)
    assert load_config(__import__("eval.generate", fromlist=["SamplingPreset"]).SamplingPreset,
                       f"{REPO}/configs/eval/in256_lightningdit_ode250.yaml").time_shift == 0.3
    big = load_config(ClassCondConfig, f"{REPO}/configs/class_cond/lightningdit_xl1_vavae_in256.yaml", [],
                      check_data=False)
    assert big.model.preset == "XL/1" and big.train.grad_clip == 0 and big.repa.coeff == 0


def test_whole_recipe_on_f16_channel_normalised_latents_two_ranks_resume_sample_evaluate(tmp_path):
    """Prepare a set with a tiny 16-channel f16 AutoencoderKL; train the tiny recipe on it on two ranks (it
    learns); the same command after the newest checkpoint is dropped resumes to the same bits; the run samples
    with the ODE (time shift, guidance interval) and the SDE, decodes through the VAE, and evaluates."""
    vae = tiny_vae(tmp_path / "vae", 16, 5, sharp=True)
    data = tmp_path / "data"
    prepare(image_tree(tmp_path / "src", per_class=8), data, vae, "--store-images")
    run = tmp_path / "run"
    args = ["--config", TINY, f"run.dir={run}", "data.kind=shards", f"data.path={data}", "train.max_steps=80",
            "train.ckpt_every=40", "train.log_every=10", "train.global_batch=8", "train.deterministic=true",
            "train.num_workers=0", "train.tensorboard=false"]
    run_train(args, launcher="torchrun", ranks=2)
    records = read_metrics(run)
    first, last = records[0], records[-1]
    assert last["denoise_loss"] < first["denoise_loss"] - 0.1, records
    assert last["direction_loss"] < first["direction_loss"], records
    meta = json.load(open(run / "export" / "ema.json"))
    assert meta["model"]["kwargs"]["patch_size"] == 1 and meta["model"]["kwargs"]["input_size"] == 4
    assert meta["latent"]["norm"] == "channel" and len(meta["latent"]["channel_stats"]["std"]) == 16

    split = tmp_path / "split"
    copy_as_killed_after(run, split, 40)
    out = run_train([a.replace(str(run), str(split)) for a in args], launcher="torchrun", ranks=2)
    assert "at step 40" in out.stdout + out.stderr and [s for s, _ in list_checkpoints(split)] == [40, 80]
    assert_resumed_run_is_identical(run, split, 80, ("loss", "denoise_loss", "repa_loss", "direction_loss"))

    from eval.evaluate import main as evaluate
    from eval.generate import Generator

    ode = Generator.load(str(run), sampler="ode", steps=4, cfg=3.0, guidance_interval=(0.0, 0.875), time_shift=0.3)
    sde = Generator.load(str(run), sampler="sde", steps=4, cfg=3.0)
    for g in (ode, sde):
        images = g.images([0, 1, 2])
        assert images.shape == (3, 3, 64, 64) and images.dtype == torch.uint8
    assert ode.settings["time_shift"] == 0.3 and sde.settings["time_shift"] is None
    with pytest.raises(ValueError, match="--time-shift applies to the ODE sampler"):
        Generator.load(str(run), sampler="sde", steps=4, time_shift=0.3)
    metrics = evaluate(["--run", str(run), "--sampler", "ode", "--steps", "3", "--time-shift", "0.3", "--cfg", "2",
                        "--num-samples", "8", "--batch-size", "8", "--ref", str(data), "--features", "proxy"])
    assert metrics["is_proxy"] and math.isfinite(metrics["proxy_fid"])
    assert (run / "eval" / "ode3_cfg2_0-1_n8_seed0_shift0.3" / "generation.json").is_file()
