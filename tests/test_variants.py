"""The REPA family (core/repa.py): each term against its definition, the model taps it needs, the config checks,
and the step that combines them (micro_loss), including HASTE's stop and what it stops paying for."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from class_cond.models import SiT, build_model
from class_cond.task import ClassCondConfig, ClassCondTask
from conftest import REPO, assert_resumed_run_is_identical, copy_as_killed_after, run_train
from core.logging import read_metrics
from core.config import ConfigError, load_config
from core.dist import DistContext
from core.encoders import TargetEncoder, encoder_attention, load_encoder
from core.repa import (
    ConvProjector, EncoderTargets, RepresentationTerms, Taps, attention_distillation_loss, build_projector,
    dispersive_loss, spatial_zscore,
)
from core.trainer import Run, micro_loss, plan_run
from core.transport import Transport
from t2i.mmdit import MMDiT

CONFIGS = os.path.join(REPO, "configs")
TINY = {v: os.path.join(CONFIGS, "debug", f"class_cond_tiny_{v}.yaml") for v in ("irepa", "haste", "disp", "reg")}
PRESETS = ["class_cond/sit_xl2_irepa_in256.yaml", "class_cond/sit_xl2_haste_in256.yaml",
           "class_cond/sit_xl2_disp_in256.yaml", "t2i/coco256_mmdit_haste.yaml"]


# ----------------------------------------------------------------------------------------------- iREPA


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_conv_projector_is_a_convolution_over_the_row_major_grid(kernel):
    """Written out: output token (r, c) = bias + sum over the kernel window of W[:, :, i, j] x[token(r+i-p, c+j-p)],
    zero outside the grid; tokens are row-major (token = r * side + c), as the model's patches."""
    torch.manual_seed(0)
    side, D, Z = 4, 6, 5
    proj = ConvProjector(D, Z, kernel).double()
    x = torch.randn(2, side * side, D, dtype=torch.float64)
    w, b, p = proj.conv.weight, proj.conv.bias, kernel // 2
    expected = b.expand(2, side * side, Z).clone()
    for r in range(side):
        for c in range(side):
            for i in range(kernel):
                for j in range(kernel):
                    rr, cc = r + i - p, c + j - p
                    if 0 <= rr < side and 0 <= cc < side:
                        expected[:, r * side + c] += x[:, rr * side + cc] @ w[:, :, i, j].T
    torch.testing.assert_close(proj(x), expected, rtol=0, atol=1e-12)


def test_conv_projector_refuses_what_would_change_the_grid():
    with pytest.raises(ValueError, match="odd"):
        ConvProjector(8, 4, 2)
    with pytest.raises(ValueError, match="square token grid, got 12 tokens"):
        ConvProjector(8, 4, 3)(torch.zeros(1, 12, 8))
    with pytest.raises(ValueError, match="not one of: mlp, conv"):
        build_projector(8, 16, 4, kind="linear")


def test_conv_projector_in_the_models_keeps_default_init_and_records_its_kernel():
    model = build_model("tiny", input_size=8, in_channels=4, num_classes=3, repa_depth=2, encoder_dims=(32,),
                        projector="conv", projector_kernel=3)
    conv = model.projectors[0].conv
    assert conv.weight.shape == (32, 128, 3, 3)
    bound = 1 / math.sqrt(128 * 9)  # PyTorch's default (kaiming-uniform a=sqrt(5)) bound, not xavier's
    assert conv.weight.abs().max() <= bound and conv.bias.abs().max() > 0
    out, zs = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    assert zs[0].shape == (2, 16, 32)
    mm = MMDiT(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=4, text_dim=16, repa_depth=1,
               encoder_dims=(32,), projector="conv", projector_kernel=1)
    _, zs = mm(torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 5, 16))
    assert isinstance(mm.projectors[0], ConvProjector) and zs[0].shape == (2, 16, 32)


def test_spatial_zscore_matches_its_definition():
    g = np.random.default_rng(0)
    x = g.normal(2.0, 3.0, size=(3, 16, 8))
    alpha = 0.6
    mean, std = x.mean(axis=1, keepdims=True), x.std(axis=1, ddof=1, keepdims=True)  # Bessel's correction
    expected = (x - alpha * mean) / (std + 1e-6)  # eps on the std, not under the root
    got = spatial_zscore(torch.from_numpy(x), alpha)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=0)
    assert spatial_zscore(torch.from_numpy(x), 1.0).mean(dim=1).abs().max() < 1e-12  # alpha 1 centres fully


def test_target_norm_applies_to_the_targets_only():
    cfg = load_config(ClassCondConfig, TINY["irepa"], check_data=False)
    terms = RepresentationTerms(cfg.repa, cfg.disp, model_depth=4)
    torch.manual_seed(0)
    z, target = torch.randn(2, 16, 8), torch.randn(2, 16, 8) * 5 + 3
    _, values = terms.losses(0, [z], {}, EncoderTargets([target], []))
    expected = -F.cosine_similarity(z, spatial_zscore(target, 0.6), dim=-1).mean()
    torch.testing.assert_close(values["repa_loss"], expected)


# ----------------------------------------------------------------------------------------------- HASTE


def _explicit_logits(q, k):
    return torch.einsum("bhnd,bhmd->bhnm", q, k) / math.sqrt(q.shape[-1])


def test_sit_block_attention_logits_are_scaled_q_k_of_the_first_heads():
    torch.manual_seed(0)
    model = SiT(input_size=8, in_channels=4, hidden_size=64, depth=3, num_heads=4, num_classes=3,
                encoder_dims=(16,), repa_depth=2).double()
    for p in model.parameters():  # adaLN-Zero would make every block the identity
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64), torch.tensor([0, 2])
    out, zs, tapped = model(x, t, y, taps=Taps(hidden_depth=1, attn_blocks=(2, 3), attn_heads=3))
    plain_out, plain_zs = model(x, t, y)
    assert torch.equal(out, plain_out) and torch.equal(zs[0], plain_zs[0])  # tapping does not change the forward
    captured = []
    hooks = [b.attn.qkv.register_forward_hook(lambda m, i, o: captured.append(o)) for b in model.blocks]
    model(x, t, y)
    for h in hooks:
        h.remove()
    assert len(tapped["attn"]) == 2 and tapped["hidden"].shape == (2, 16, 64)
    for logits, qkv in zip(tapped["attn"], captured[1:]):
        q, k, _ = qkv.reshape(2, 16, 3, 4, 16).permute(2, 0, 3, 1, 4)
        torch.testing.assert_close(logits, _explicit_logits(q[:, :3], k[:, :3]), rtol=1e-12, atol=1e-12)


def test_mmdit_logits_are_the_image_streams_image_to_image_ones():
    torch.manual_seed(0)
    mm = MMDiT(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=4, text_dim=16, repa_depth=1,
               encoder_dims=(32,)).double()
    for p in mm.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, ctx = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64), torch.randn(
        2, 5, 16, dtype=torch.float64)
    out, _, tapped = mm(x, t, ctx, taps=Taps(attn_blocks=(2,), attn_heads=2))
    torch.testing.assert_close(out, mm(x, t, ctx)[0], rtol=0, atol=0)
    captured = []
    hook = mm.blocks[1].x_block.qkv.register_forward_hook(lambda m, i, o: captured.append(o))
    mm(x, t, ctx)
    hook.remove()
    q, k, _ = captured[0].reshape(2, 16, 3, 4, 16).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(tapped["attn"][0], _explicit_logits(q[:, :2], k[:, :2]), rtol=1e-12, atol=1e-12)


def test_dinov2_attention_logits_match_the_eager_attention():
    """Our logits, with the CLS row and column put back through a manual computation, soft-maxed, are transformers'
    own attention probabilities (eager attention, output_attentions); and the tokens are forward's."""
    enc = load_encoder("dinov2-tiny", 32, grid=4)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    tokens, logits, cls = enc.targets(images, attn_blocks=(1, 2), with_cls=True)
    torch.testing.assert_close(tokens, enc(images), rtol=0, atol=0)
    torch.testing.assert_close(cls, enc.embed(images), rtol=0, atol=0)  # DINOv2's x_norm_clstoken
    assert [a.shape for a in logits] == [(2, 2, 16, 16)] * 2
    x = enc.preprocess(images)
    enc.model.set_attn_implementation("eager")
    out = enc.model(pixel_values=x, output_attentions=True, output_hidden_states=True)
    for block, ours in zip((1, 2), logits):
        layer = enc.model.encoder.layer[block - 1]
        h = layer.norm1(out.hidden_states[block - 1])
        q, k = (m(h).reshape(2, 17, 2, 16).transpose(1, 2) for m in (layer.attention.q_proj, layer.attention.k_proj))
        full = _explicit_logits(q, k)
        torch.testing.assert_close(full.softmax(-1), out.attentions[block - 1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours, full[:, :, 1:, 1:], rtol=1e-5, atol=1e-5)


def test_attention_distillation_is_cross_entropy_over_keys_averaged_over_layers():
    g = np.random.default_rng(0)
    student = [g.normal(size=(2, 4, 6, 6)) for _ in range(2)]
    teacher = [g.normal(size=(2, 3, 6, 6)) for _ in range(2)]

    def softmax(a):
        e = np.exp(a - a.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    expected = np.mean([-(softmax(t) * np.log(softmax(s[:, :3]))).sum(-1).mean() for s, t in zip(student, teacher)])
    got = attention_distillation_loss([torch.from_numpy(s) for s in student], [torch.from_numpy(t) for t in teacher])
    assert got.dtype == torch.float64 and got.item() == pytest.approx(expected, rel=1e-12)
    same = attention_distillation_loss([torch.from_numpy(t) for t in teacher], [torch.from_numpy(t) for t in teacher])
    entropy = np.mean([-(softmax(t) * np.log(softmax(t))).sum(-1).mean() for t in teacher])
    assert same.item() == pytest.approx(entropy, rel=1e-12)  # the minimum: the teacher's own entropy
    with pytest.raises(ValueError, match="at least as many heads"):
        attention_distillation_loss([torch.zeros(2, 2, 6, 6)], [torch.zeros(2, 3, 6, 6)])
    with pytest.raises(ValueError, match="2 model blocks but 1 encoder blocks"):
        attention_distillation_loss([torch.zeros(2, 3, 6, 6)] * 2, [torch.zeros(2, 3, 6, 6)])


def test_encoder_attention_table_matches_the_built_models():
    assert encoder_attention("dinov2-b") == (12, 12) and encoder_attention("dinov2-l") == (24, 16)
    enc = load_encoder("dinov2-tiny", 32)
    assert encoder_attention("dinov2-tiny") == (enc.model.config.num_hidden_layers,
                                                enc.model.config.num_attention_heads)
    with pytest.raises(ValueError, match="takes a DINOv2 encoder"):
        encoder_attention("clip-b")
    clip = load_encoder("clip-tiny", 32)
    with pytest.raises(ValueError, match="cannot give its attention logits"):
        clip.targets(torch.zeros(1, 3, 32, 32), attn_blocks=(1,))


# --------------------------------------------------------------------------------------------- dispersive


def test_dispersive_loss_matches_its_definition():
    """log of the mean over all B x B pairs (the diagonal included) of exp(-||z_i - z_j||^2 / (d tau)), z_i the
    flattened block output of sample i and d its size."""
    g = np.random.default_rng(0)
    h = g.normal(size=(5, 4, 3))
    z = h.reshape(5, -1)
    for tau in (0.5, 1.0):
        sq = ((z[:, None] - z[None]) ** 2).sum(-1) / z.shape[1]
        expected = np.log(np.exp(-sq / tau).mean())
        assert dispersive_loss(torch.from_numpy(h), tau).item() == pytest.approx(expected, rel=1e-12)
    far = torch.eye(6).repeat_interleave(100, dim=1) * 1e3  # pairwise far apart: only the diagonal survives
    assert dispersive_loss(far, 0.5).item() == pytest.approx(-math.log(6))
    assert dispersive_loss(torch.ones(4, 3), 0.5).item() == pytest.approx(0.0)  # collapsed: its maximum
    x = torch.from_numpy(g.normal(size=(4, 6))).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: dispersive_loss(v, 0.5), (x,))
    dup = torch.cat([x[:1], x]).detach().requires_grad_()  # two identical samples: a finite gradient still
    dispersive_loss(dup, 0.5).backward()
    assert torch.isfinite(dup.grad).all()


# ----------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("preset", PRESETS)
def test_paper_presets_load(preset):
    from core.task import load_task_config

    _, cfg = load_task_config(os.path.join(CONFIGS, preset), check_data=False)
    if "irepa" in preset:
        assert (cfg.repa.projector, cfg.repa.projector_kernel, cfg.repa.coeff) == ("conv", 3, 1.0)
        assert (cfg.repa.target_norm, cfg.repa.target_norm_alpha) == ("spatial_zscore", 0.6)
    if "haste" in preset:
        assert (cfg.repa.attn_coeff, cfg.repa.attn_blocks, cfg.repa.attn_encoder_blocks) == (
            0.5, [5, 6, 7, 8], [9, 10, 11, 12])
        assert cfg.repa.stop_step == (250_000 if "sit" in preset else cfg.train.max_steps)
    if "disp" in preset:
        assert (cfg.repa.coeff, cfg.disp.coeff, cfg.disp.tau, cfg.disp.depth) == (0.0, 0.5, 0.5, 7)


@pytest.mark.parametrize("overrides,message", [
    (["repa.projector=linear"], "repa.projector: 'linear' is not one of: mlp, conv"),
    (["repa.projector=conv", "repa.projector_kernel=2"], "repa.projector_kernel must be odd"),
    (["repa.target_norm=zscore"], "repa.target_norm: 'zscore' is not one of: none, spatial_zscore"),
    (["repa.target_norm_alpha=1.5"], "repa.target_norm_alpha must be in [0, 1]"),
    (["repa.stop_step=-1"], "repa.stop_step must be >= 0"),
    (["repa.attn_coeff=0.5", "repa.encoders=[clip-tiny]"], "repa.encoders[0]: encoder 'clip-tiny' cannot give"),
    (["repa.attn_coeff=0.5", "repa.attn_blocks=[1,2]", "repa.attn_encoder_blocks=[1]"], "one to one"),
    (["repa.attn_coeff=0.5", "repa.attn_blocks=[2,1]", "repa.attn_encoder_blocks=[1,2]"], "increasing"),
    (["repa.attn_coeff=0.5", "repa.attn_blocks=[1,5]", "repa.attn_encoder_blocks=[1,2]"],
     "repa.attn_blocks[1]=5 is outside the tiny model's blocks 1..4"),
    (["repa.attn_coeff=0.5", "repa.attn_blocks=[1,2]", "repa.attn_encoder_blocks=[1,3]"],
     "repa.attn_encoder_blocks[1]=3 is outside encoder 'dinov2-tiny''s blocks 1..2"),
    (["repa.coeff=0", "repa.attn_coeff=0.5"], "repa.attn_coeff > 0 needs repa.coeff > 0"),
    (["disp.coeff=0.5", "disp.tau=0"], "disp.tau must be > 0"),
    (["disp.coeff=0.5", "disp.depth=9"], "disp.depth=9 is outside the tiny model's blocks 1..4"),
    (["disp.coeff=-1"], "disp.coeff must be >= 0"),
])
def test_variant_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(ClassCondConfig, os.path.join(CONFIGS, "debug", "class_cond_tiny.yaml"), overrides,
                    check_data=False)
    assert message in str(err.value)


def test_more_encoder_heads_than_model_heads_is_refused():
    with pytest.raises(ConfigError, match="the tiny model has 4 heads, fewer than the 12 of encoder 'dinov2-b'"):
        load_config(ClassCondConfig, os.path.join(CONFIGS, "debug", "class_cond_tiny.yaml"),
                    ["repa.attn_coeff=0.5", "repa.encoders=[dinov2-b]", "repa.attn_blocks=[1]",
                     "repa.attn_encoder_blocks=[12]"], check_data=False)


# ------------------------------------------------------------------------------------------- the step


class CountingEncoder(TargetEncoder):
    """The tiny DINOv2 target encoder, counting its forwards."""

    def __init__(self, inner):
        torch.nn.Module.__init__(self)
        self.inner, self.calls = inner, 0
        self.name = inner.name

    def forward(self, images):
        self.calls += 1
        return self.inner(images)

    def targets(self, images, attn_blocks=(), with_cls=False):
        self.calls += 1
        return self.inner.targets(images, attn_blocks, with_cls)


def _run(config, *overrides):
    """A Run of `config` on its generated set, the plain model as the engine (micro_loss needs nothing else)."""
    cfg = load_config(ClassCondConfig, config, ["train.global_batch=4", *overrides], check_data=False)
    info = ClassCondTask.random_data(cfg, 32)
    plan = plan_run(cfg, ClassCondTask(cfg, info), DistContext(0, 1, 0, torch.device("cpu")))
    torch.manual_seed(0)
    model = ClassCondTask.build_model(plan.model_kwargs)
    encoders = [CountingEncoder(load_encoder(s, info.resolution, grid=plan.grid)) for s in cfg.repa.encoders
                if cfg.repa.coeff > 0]
    return Run(plan, model, None, encoders, Transport()), cfg


def _batch(run, n=4):
    g = torch.Generator().manual_seed(1)
    c, h, w = run.plan.data.latent_shape
    return {"moments": torch.randn(n, 2 * c, h, w, generator=g),
            "image": torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
            "label": torch.randint(0, 4, (n,), generator=g)}


def test_haste_step_is_the_weighted_sum_and_stops_paying_for_the_encoder():
    run, cfg = _run(TINY["haste"], "disp.coeff=0.25")
    batch = _batch(run)
    loss, parts = micro_loss(run, batch, torch.Generator().manual_seed(3), step=99)
    assert set(parts) == {"denoise_loss", "repa_loss", "attn_loss", "disp_loss"} and run.encoders[0].calls == 1
    expected = parts["denoise_loss"] + 0.5 * parts["repa_loss"] + 0.5 * parts["attn_loss"] + 0.25 * parts["disp_loss"]
    torch.testing.assert_close(loss, expected)
    assert parts["attn_loss"] > 0 and -1 <= parts["repa_loss"] <= 1

    loss, parts = micro_loss(run, batch, torch.Generator().manual_seed(3), step=100)  # repa.stop_step: 100
    assert run.encoders[0].calls == 1  # the encoder did not run
    assert parts["repa_loss"] == 0 and parts["attn_loss"] == 0 and parts["disp_loss"] != 0
    torch.testing.assert_close(loss, parts["denoise_loss"] + 0.25 * parts["disp_loss"])
    loss.backward()
    projector = run.engine.projectors[0][0].weight.grad
    assert projector is not None and projector.abs().max() == 0  # in the graph with zero gradient after the stop


def test_attention_distillation_pairs_the_configured_blocks():
    run, cfg = _run(TINY["haste"], "repa.attn_blocks=[2,4]", "repa.attn_encoder_blocks=[2,1]")
    batch = _batch(run)
    _, parts = micro_loss(run, batch, torch.Generator().manual_seed(3), step=0)
    # the same draws by hand: the model's logits of blocks 2 and 4 against the encoder's of blocks 2 and 1
    g = torch.Generator().manual_seed(3)
    from core.latents import sample_latents

    x0 = sample_latents(batch["moments"], g, run.plan.norm)
    drop = torch.rand(4, generator=g) < cfg.train.cond_dropout
    cond = run.plan.task.condition(batch, drop, torch.device("cpu"))
    _, _, tapped = Transport().loss(run.engine, x0, cond, g, Taps(attn_blocks=(2, 4), attn_heads=2))
    _, attn, _ = run.encoders[0].inner.targets(batch["image"], (2, 1))
    torch.testing.assert_close(parts["attn_loss"], attention_distillation_loss(tapped["attn"], attn))


def test_stored_features_cannot_feed_attention_distillation(tmp_path):
    from core.task import DataInfo
    from core.trainer import data_needs

    cfg = load_config(ClassCondConfig, TINY["haste"], check_data=False)
    info = DataInfo(str(tmp_path), {"kind": "class_cond", "num_samples": 1, "images": False,
                                    "features": [{"name": "dinov2-tiny"}]})
    with pytest.raises(ConfigError, match="attention distillation.*has none: prepare it with --store-images"):
        data_needs(cfg, info, grid=8)


def test_plain_repa_runs_the_same_forward_as_before_the_family():
    """With every variant off the step asks the model for nothing more: no taps, the (out, zs) forward."""
    run, cfg = _run(os.path.join(CONFIGS, "debug", "class_cond_tiny.yaml"))
    assert run.plan.terms.taps(0) is None and run.plan.terms.names == ("repa_loss",)
    loss, parts = micro_loss(run, _batch(run), torch.Generator().manual_seed(3), step=0)
    torch.testing.assert_close(loss, parts["denoise_loss"] + 0.5 * parts["repa_loss"], rtol=0, atol=0)


# ------------------------------------------------------------------------------------ end to end (processes)


def _tiny(variant, run_dir, *overrides):
    return ["--config", TINY[variant], f"run.dir={run_dir}", "train.num_workers=0", "data.synthetic_samples=256",
            "train.tensorboard=false", *overrides]


@pytest.mark.parametrize("variant", ["irepa", "haste", "disp", "reg"])
def test_tiny_preset_learns_on_two_ranks(tmp_path, variant):
    run = tmp_path / "run"
    stop = ["repa.stop_step=20"] if variant == "haste" else []
    run_train(_tiny(variant, run, "train.max_steps=40", "train.log_every=10", "train.ckpt_every=40", *stop),
              launcher="torchrun", ranks=2)
    records = read_metrics(run)
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    first, last = records[0], records[-1]
    assert last["denoise_loss"] < first["denoise_loss"] - 0.1, records
    if variant == "irepa":
        assert last["repa_loss"] < first["repa_loss"] - 0.05, records
    # the export samples with the eval commands' generator, iREPA's conv projector and REG's token and all
    from eval.generate import Generator

    for sampler in ("ode", "sde"):
        images = Generator.load(str(run), sampler=sampler, steps=4, cfg=2.0).images([0, 1, 2])
        assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    if variant == "haste":  # aligned up to the stop, denoising only after it
        assert all(r["attn_loss"] > 0 and r["repa_loss"] < 0 for r in records[:2]), records
        assert all(r["attn_loss"] == 0 and r["repa_loss"] == 0 for r in records[2:]), records
        assert all(r["loss"] == r["denoise_loss"] for r in records[2:]), records
    if variant == "disp":
        assert "repa_loss" in first and last["disp_loss"] < first["disp_loss"] + 1e-3, records
    if variant == "reg":  # the class token's velocity is learnt, its position aligned
        assert last["cls_loss"] < first["cls_loss"] - 0.1 and last["repa_loss"] < first["repa_loss"], records


def test_resume_across_the_stop_is_bit_identical(tmp_path):
    """A run with iREPA's projector, HASTE's terms and their stop at step 8, and the dispersive loss, interrupted at
    step 6 and resumed, ends with the bits of the uninterrupted run."""
    common = ("repa.projector=conv", "repa.target_norm=spatial_zscore", "disp.coeff=0.25", "repa.stop_step=8",
              "train.ckpt_every=6", "train.log_every=2", "train.deterministic=true")
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(_tiny("haste", straight, "train.max_steps=12", *common))
    copy_as_killed_after(straight, split, 6)
    out = run_train(_tiny("haste", split, "train.max_steps=12", *common))
    assert "resuming from" in out.stdout + out.stderr and "at step 6" in out.stdout + out.stderr
    assert_resumed_run_is_identical(straight, split, 12, ("loss", "attn_loss", "disp_loss"))
    la = {r["step"]: r for r in read_metrics(straight)}
    assert la[8]["attn_loss"] > 0 and la[10]["attn_loss"] == 0  # the stop fell inside the resumed half


def test_haste_flops_at_xl_are_the_four_logit_products_and_end_at_the_stop():
    """HASTE's extra model FLOPs at SiT-XL/2: q k^T of 12 heads over 256 tokens in 4 blocks (multiply-add = 2), in
    the forward and twice that in the backward; past repa.stop_step the step is plain SiT + projector again."""
    from core import bench
    from core.task import load_task_config

    def flops(name, step=0):
        cls, cfg = load_task_config(os.path.join(CONFIGS, "class_cond", name), check_data=False)
        plan = plan_run(cfg, cls(cfg, cls.random_data(cfg, 256)), DistContext(0, 1, 0, torch.device("cpu")))
        return bench.count_flops(plan, encoders=[], step=step)

    repa, haste = flops("sit_xl2_repa_in256.yaml"), flops("sit_xl2_haste_in256.yaml")
    extra = 4 * 12 * 256 * 256 * 72 * 2  # SiT-XL heads are 1152 / 16 = 72 wide
    assert haste["model_fwd"] - repa["model_fwd"] == pytest.approx(extra, rel=1e-9)
    assert haste["model_bwd"] - repa["model_bwd"] == pytest.approx(2 * extra, rel=1e-9)
    assert flops("sit_xl2_haste_in256.yaml", step=250_000) == repa
