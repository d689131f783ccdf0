"""REG (arXiv 2507.01467): the class token in the SiT, its noising and loss, the step, joint sampling with its own
guidance, the import of REG checkpoints, the config checks and the FLOP count."""
import argparse
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from class_cond.import_repa import check_keys, export_repa, infer_sit_kwargs
from class_cond.models import build_sit
from class_cond.task import ClassCondConfig
from conftest import assert_resumed_run_is_identical, copy_as_killed_after, meta_state_dict, run_train
from core.config import ConfigError, load_config
from core.dist import DistContext
from core.latents import sample_latents
from core.layers import get_2d_sincos_pos_embed
from core.logging import read_metrics
from core.repa import repa_loss
from core.trainer import micro_loss, plan_run
from core.transport import Transport
from eval.generate import Generator, JointTokenModel, sample_generator
from eval.guidance import GuidedVelocity
from test_variants import CONFIGS, _batch, _run

TINY_REG = os.path.join(CONFIGS, "debug", "class_cond_tiny_reg.yaml")
KEYS_FILE = os.path.join(os.path.dirname(__file__), "data", "reg_sit_xl2_keys.txt")  # official REG SiT-XL/2
KWARGS = {"depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 2, "input_size": 4, "in_channels": 12,
          "num_classes": 3, "repa_depth": 1, "encoder_dims": [8], "projector_dim": 16, "qk_norm": False,
          "learn_sigma": False, "reg_dim": 8}
LATENT = {"autoencoder": "pixel-s2d2", "scale_factor": 1.0, "shift": 0.0, "shape": [12, 4, 4]}


def _model(seed=0, **kw):
    """A tiny REG SiT with every weight random (the zero-initialised heads too), in eval mode."""
    torch.manual_seed(seed)
    model = build_sit({**KWARGS, **kw})
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    return model.eval()


def _inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 12, 4, 4, generator=g), torch.rand(n, generator=g), torch.randint(0, 3, (n,), generator=g),
            torch.randn(n, 8, generator=g))


# ------------------------------------------------------------------------------------------------ model


def test_reg_model_has_the_official_key_layout():
    """Our SiT-XL/2 with a 768-wide class token has the official REG SiT-XL/2's state-dict names and shapes
    (tests/data/reg_sit_xl2_keys.txt), and the import infers that architecture from them."""
    state = meta_state_dict(KEYS_FILE)
    kwargs = infer_sit_kwargs(state, {"model": "SiT-XL/2", "encoder_depth": 8})
    assert {k: kwargs[k] for k in ("hidden_size", "depth", "num_heads", "input_size", "encoder_dims", "reg_dim")} == {
        "hidden_size": 1152, "depth": 28, "num_heads": 16, "input_size": 32, "encoder_dims": [768], "reg_dim": 768}
    with torch.device("meta"):
        model = build_sit(kwargs)
    check_keys(model, state)
    assert list(model.state_dict()) == list(state)  # the same order as well


def test_class_token_is_token_zero_with_a_zero_position_and_zero_initialised_head():
    torch.manual_seed(0)
    model = build_sit(KWARGS)
    pos = model.pos_embed[0]
    assert pos.shape == (1 + 4, 32) and pos[0].abs().max() == 0
    torch.testing.assert_close(pos[1:], get_2d_sincos_pos_embed(32, 2).float())  # the image rows of plain SiT
    x, t, y, cls = _inputs()
    out, zs, extras = model(x, t, y, cls=cls)
    assert out.shape == x.shape and extras["cls"].shape == (3, 8) and extras["cls"].abs().max() == 0  # zero head
    assert zs[0].shape == (3, 1 + 4, 8)  # the projector covers the class token's position too
    assert (model.wg_norm.eps, model.cls_projectors2.in_features) == (1e-6, 8)


def test_the_class_token_takes_part_in_attention_and_gets_its_own_velocity():
    model = _model()
    x, t, y, cls = _inputs()
    out, zs, extras = model(x, t, y, cls=cls)
    out2, zs2, extras2 = model(x, t, y, cls=cls.roll(1, 0))
    assert (out - out2).abs().amax(dim=(1, 2, 3)).min() > 0  # every image's velocity depends on its token
    assert (extras["cls"] - extras2["cls"]).abs().amax(dim=1).min() > 0
    # the token's head reads token 0 after the final layer's modulated norm: the zs of the image tokens do not
    # change when the head's weights do
    with torch.no_grad():
        model.final_layer.linear_cls.weight.add_(1.0)
    out3, zs3, extras3 = model(x, t, y, cls=cls)
    torch.testing.assert_close(out3, out, rtol=0, atol=0)
    assert not torch.equal(extras3["cls"], extras["cls"])


def test_reg_model_refuses_a_missing_or_misshapen_token_and_plain_sit_refuses_one():
    model = _model()
    x, t, y, cls = _inputs()
    with pytest.raises(ValueError, match=r"takes the noised class token cls of shape \(3, 8\), got None"):
        model(x, t, y)
    with pytest.raises(ValueError, match=r"got \(3, 7\)"):
        model(x, t, y, cls=cls[:, :7])
    plain = build_sit({k: v for k, v in KWARGS.items() if k != "reg_dim"})
    with pytest.raises(ValueError, match="this model has none"):
        plain(x, t, y, cls=cls)


# --------------------------------------------------------------------------------------- loss and step


class Recorder(nn.Module):
    """Returns fixed velocities and keeps what it was fed."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y, cls=None):
        self.seen = (x, t, cls)
        return x * 0 + 0.5 + self.w, [], {"cls": cls * 0 - 0.25 + self.w}


def test_token_is_noised_on_the_same_path_and_time_with_its_own_noise_drawn_after_the_latents():
    x0, _, y, cls = _inputs(n=5)
    model = Recorder()
    mse, zs, tapped = Transport().loss(model, x0, {"y": y}, torch.Generator().manual_seed(7), cls=cls)
    g = torch.Generator().manual_seed(7)  # the documented order of draws: t, the latents' noise, the token's
    t = Transport().sample_t(5, g, torch.device("cpu"))
    eps = torch.randn(x0.shape, generator=g)
    eps_cls = torch.randn(cls.shape, generator=g)
    x_t, t_in, cls_t = model.seen
    torch.testing.assert_close(t_in, t, rtol=0, atol=0)
    torch.testing.assert_close(x_t, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps)
    torch.testing.assert_close(cls_t, (1 - t[:, None]) * cls + t[:, None] * eps_cls)
    # linear path: the velocity target is eps - x0; the losses are per-sample means over all dimensions
    torch.testing.assert_close(tapped["cls_loss"], (-0.25 - (eps_cls - cls)).pow(2).mean(1))
    torch.testing.assert_close(mse, (0.5 - (eps - x0)).pow(2).flatten(1).mean(1))


def test_reg_step_aligns_the_class_token_position_and_weights_its_loss():
    run, cfg = _run(TINY_REG)
    batch = _batch(run)
    loss, parts = micro_loss(run, batch, torch.Generator().manual_seed(3), step=0)
    assert set(parts) == {"denoise_loss", "repa_loss", "cls_loss"} and run.encoders[0].calls == 1
    torch.testing.assert_close(loss, parts["denoise_loss"] + 0.5 * parts["repa_loss"] + 0.03 * parts["cls_loss"])
    # the same draws by hand: the encoder's class token noised by the objective, REPA's target [cls, patches]
    g = torch.Generator().manual_seed(3)
    x0 = sample_latents(batch["moments"], g, run.plan.norm)
    drop = torch.rand(4, generator=g) < cfg.train.cond_dropout
    cond = run.plan.task.condition(batch, drop, torch.device("cpu"))
    tokens, _, cls = run.encoders[0].inner.targets(batch["image"], (), with_cls=True)
    torch.testing.assert_close(cls, run.encoders[0].inner.model(
        pixel_values=run.encoders[0].inner.preprocess(batch["image"])).pooler_output)  # DINOv2's x_norm_clstoken
    denoise, zs, tapped = Transport().loss(run.engine, x0, cond, g, cls=cls)
    torch.testing.assert_close(parts["denoise_loss"], denoise.mean())
    torch.testing.assert_close(parts["cls_loss"], tapped["cls_loss"].mean())
    torch.testing.assert_close(parts["repa_loss"], repa_loss(zs, [torch.cat([cls[:, None], tokens], 1)]))


@pytest.mark.parametrize("spec", ["dinov3-tiny", "mae-tiny", "mocov3-tiny"])
def test_reg_takes_the_class_token_of_other_encoders_that_have_one(spec):
    run, _ = _run(TINY_REG, f"repa.encoders=[{spec}]")
    assert run.plan.model_kwargs["reg_dim"] == 32
    loss, parts = micro_loss(run, _batch(run), torch.Generator().manual_seed(3), step=0)
    _, _, cls = run.encoders[0].inner.targets(_batch(run)["image"], (), with_cls=True)
    assert cls.shape == (4, 32) and torch.isfinite(loss) and parts["cls_loss"] > 0


@pytest.mark.parametrize("overrides,message", [
    (["repa.coeff=0"], "reg.coeff > 0 needs repa.coeff > 0"),
    (["repa.encoders=[clip-tiny]"], "reg.coeff > 0 takes one encoder with a class token"),
    (["repa.encoders=[ijepa-tiny]"], "reg.coeff > 0 takes one encoder with a class token"),
    (["repa.encoders=[dinov2-tiny,dinov2-tiny]"], "reg.coeff > 0 takes one encoder with a class token"),
    (["objective.kind=ddpm"], "reg.coeff > 0 needs objective.kind=transport"),
    (["repa.projector=conv"], "reg.coeff > 0 with repa.projector='conv' is not supported"),
    (["repa.target_norm=spatial_zscore"], "the class token is not a patch token"),
    (["repa.stop_step=10"], "the model takes the encoder's class token at every step"),
    (["reg.coeff=-1"], "reg.coeff must be >= 0"),
])
def test_reg_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(ClassCondConfig, TINY_REG, overrides, check_data=False)


def test_text_to_image_refuses_reg():
    from t2i.task import T2IConfig

    with pytest.raises(ConfigError, match="the text-to-image MMDiT has none"):
        load_config(T2IConfig, os.path.join(CONFIGS, "debug", "t2i_tiny.yaml"), ["reg.coeff=0.03"], check_data=False)


def test_stored_features_cannot_feed_reg(tmp_path):
    from core.task import DataInfo
    from core.trainer import data_needs

    cfg = load_config(ClassCondConfig, TINY_REG, check_data=False)
    info = DataInfo(str(tmp_path), {"kind": "class_cond", "num_samples": 1, "images": False,
                                    "features": [{"name": "dinov2-tiny"}]})
    with pytest.raises(ConfigError, match="REG's class token.*has none: prepare it with --store-images"):
        data_needs(cfg, info, grid=8)


def test_paper_preset_is_regs_recipe():
    from core.task import load_task_config

    _, cfg = load_task_config(os.path.join(CONFIGS, "class_cond", "sit_xl2_reg_in256.yaml"), check_data=False)
    assert (cfg.model.preset, cfg.repa.coeff, cfg.repa.depth, cfg.repa.encoders, cfg.reg.coeff) == (
        "XL/2", 0.5, 8, ["dinov2-b"], 0.03)
    assert (cfg.train.global_batch, cfg.train.lr) == (256, 1e-4)


def test_reg_flops_at_xl_are_one_more_token_its_embedding_and_head():
    """The model FLOPs REG adds to REPA at SiT-XL/2: a 257th token through every linear layer and attention
    (multiply-add = 2), its embedding (768 -> 1152), its head (1152 -> 768) and its projector row; < 0.5% in
    all, REG's own figure."""
    from core import bench
    from core.task import load_task_config

    def flops(name):
        cls, cfg = load_task_config(os.path.join(CONFIGS, "class_cond", name), check_data=False)
        plan = plan_run(cfg, cls(cfg, cls.random_data(cfg, 256)), DistContext(0, 1, 0, torch.device("cpu")))
        return bench.count_flops(plan, encoders=[], step=0)

    repa, reg = flops("sit_xl2_repa_in256.yaml"), flops("sit_xl2_reg_in256.yaml")
    d, n = 1152, 256
    per_block = 2 * 12 * d * d + 2 * 2 * d * ((n + 1) ** 2 - n ** 2)  # qkv, proj, MLP (4d); q k^T and attn v
    projector = 2 * (d * 2048 + 2048 * 2048 + 2048 * 768)
    extra = 28 * per_block + 2 * 768 * d + 2 * d * 768 + projector
    assert reg["model_fwd"] - repa["model_fwd"] == pytest.approx(extra, rel=1e-9)
    assert 0 < reg["model_fwd"] / repa["model_fwd"] - 1 < 0.005


# ----------------------------------------------------------------------------------------------- sampling


def _export(path, seed=0):
    model = _model(seed)
    save_file(model.state_dict(), str(path))
    meta = {"step": 3, "model": {"task": "class_cond", "kwargs": KWARGS}, "latent": LATENT, "config": {}}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def test_guidance_of_the_token_has_its_own_scale_and_is_on_only_where_the_image_is_guided():
    class Linear(nn.Module):  # v = x + 10 y: guided = v_uncond + w (v_cond - v_uncond) = x + 10 (null + w (y - null))
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, x, t, y):
            return x + 10 * y[:, None].to(x.dtype)

    x = torch.randn(2, 6, dtype=torch.float64)
    cond, null = {"y": torch.tensor([1, 2])}, {"y": torch.tensor([0])}
    t = torch.tensor([0.5, 0.9])  # inside, outside [0, 0.85]
    for tail_scale, token_w in ((2.3, 2.3), (0.0, 1.0), (1.0, 1.0)):
        v = GuidedVelocity(Linear(), cond, null, 4.0, (0.0, 0.85), tail=2, tail_scale=tail_scale)(x, t)
        y = torch.tensor([1.0, 2.0], dtype=torch.float64)
        expected = x + 10 * y[:, None]  # conditional
        expected[0, :4] = x[0, :4] + 10 * 4.0 * y[0]  # the image part, inside the interval
        expected[0, 4:] = x[0, 4:] + 10 * token_w * y[0]  # the token: its own scale, conditional at 0
        torch.testing.assert_close(v, expected)


def test_ode_integrates_the_token_jointly_from_noise_drawn_after_the_latents(tmp_path):
    export = _export(tmp_path / "ema.safetensors")
    gen = Generator.load(str(export), sampler="ode", steps=3, cfg=1.0, seed=4)
    assert gen.settings["cls_cfg"] == 1.5  # REG's default
    got = gen.latents([0, 1])
    model = _model()  # the same weights, the loop by hand: Euler on (latents, token) together
    y = gen.conditioner.cond([0, 1], "cpu")["y"]
    xs, toks = [], []
    for i in (0, 1):
        g = sample_generator(4, i)
        xs.append(torch.randn(12, 4, 4, generator=g))
        toks.append(torch.randn(8, generator=g))
    x, tok = torch.stack(xs).double(), torch.stack(toks).double()
    ts = torch.linspace(1, 0, 4, dtype=torch.float64)
    with torch.no_grad():
        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            out, _, extras = model(x.float(), t_cur.float().expand(2), y, cls=tok.float())
            x, tok = x + (t_next - t_cur) * out.double(), tok + (t_next - t_cur) * extras["cls"].double()
    torch.testing.assert_close(got, x.float(), rtol=1e-6, atol=1e-6)


def test_sde_samples_a_reg_model_per_sample_and_guides_the_token(tmp_path):
    export = _export(tmp_path / "ema.safetensors")
    settings = dict(sampler="sde", steps=4, cfg=2.3, guidance_interval=(0.0, 0.85), seed=1)
    a = Generator.load(str(export), cls_cfg=2.3, **settings).latents([0, 1, 2])
    b = Generator.load(str(export), cls_cfg=2.3, **settings).latents([2])
    torch.testing.assert_close(a[2:], b)  # a sample does not depend on its batch
    c = Generator.load(str(export), cls_cfg=0.0, **settings).latents([0, 1, 2])
    assert not torch.equal(a, c)  # the token's guidance reaches the image
    images = Generator.load(str(export), cls_cfg=2.3, **settings).images([0])
    assert images.shape == (1, 3, 8, 8) and images.dtype == torch.uint8


def test_cls_cfg_is_refused_for_a_model_without_a_token(tmp_path):
    from test_eval_generate import write_export

    plain = write_export(tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="this model has none"):
        Generator.load(str(plain), sampler="ode", steps=2, cls_cfg=2.0)
    assert Generator.load(str(plain), sampler="ode", steps=2).settings["cls_cfg"] is None


def test_joint_state_round_trips_and_refuses_another_layout():
    joint = JointTokenModel(_model(), (12, 4, 4), 8)
    x, _, _, cls = _inputs()
    back = joint.unpack(joint.pack(x, cls))
    assert torch.equal(back[0], x) and torch.equal(back[1], cls)
    with pytest.raises(ValueError, match=r"expected \(B, 200\)"):
        joint.unpack(torch.zeros(3, 199))


def test_representation_metrics_refuse_a_reg_model(tmp_path):
    from eval.representation import probe_objective

    meta = json.loads(_export(tmp_path / "ema.safetensors").with_suffix(".json").read_text())
    with pytest.raises(ValueError, match="is a REG model"):
        probe_objective(meta)


# ------------------------------------------------------------------------------------------------- import


def test_reg_checkpoint_imports_and_samples(tmp_path):
    """A checkpoint in REG's layout (REPA's {'model', 'ema', 'args', 'steps'} with the class-token weights)
    exports with reg_dim recorded, loads strictly and samples with the token."""
    ema = _model(seed=2, **{"input_size": 8, "in_channels": 4, "num_heads": 4})
    args = argparse.Namespace(model="SiT-S/2", encoder_depth=1, enc_type="dinov2-vit-b", cls=0.03)
    torch.save({"model": ema.state_dict(), "ema": ema.state_dict(), "args": args, "steps": 40}, tmp_path / "reg.pt")
    out = export_repa(str(tmp_path / "reg.pt"), str(tmp_path / "reg.safetensors"), num_heads=4)
    meta = json.loads((tmp_path / "reg.json").read_text())
    assert meta["model"]["kwargs"]["reg_dim"] == 8 and meta["model"]["kwargs"]["input_size"] == 8
    state = load_file(out)
    assert all(torch.equal(state[k], v) for k, v in ema.state_dict().items())
    gen = Generator.load(out, sampler="sde", steps=3, cfg=1.5, vae="pixel-s2d2")
    assert gen.latents([0]).shape == (1, 4, 8, 8)


# ------------------------------------------------------------------------------------ end to end (processes)


def test_reg_resume_is_bit_identical(tmp_path):
    common = ("train.ckpt_every=4", "train.log_every=2", "train.deterministic=true", "train.num_workers=0",
              "data.synthetic_samples=64", "train.tensorboard=false")
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(["--config", TINY_REG, f"run.dir={straight}", "train.max_steps=8", *common])
    copy_as_killed_after(straight, split, 4)
    out = run_train(["--config", TINY_REG, f"run.dir={split}", "train.max_steps=8", *common])
    assert "resuming from" in out.stdout + out.stderr and "at step 4" in out.stdout + out.stderr
    assert_resumed_run_is_identical(straight, split, 8, ("loss", "cls_loss", "repa_loss"))
    assert all(r["cls_loss"] > 0 for r in read_metrics(straight))
