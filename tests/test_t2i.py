"""MMDiT: joint attention really mixes the streams; shapes at 256/512; REPA tap; CFG null path; caption choice."""
import pytest
import torch

from t2i.mmdit import MMDIT_PRESETS, MMDiT, build_mmdit
from t2i.task import T2ITask, T2IConfig, caption_index

TINY = dict(**MMDIT_PRESETS["tiny"], input_size=8, in_channels=12, text_dim=16, repa_depth=2, encoder_dims=(32,),
            projector_dim=24)


def model(**overrides) -> MMDiT:
    torch.manual_seed(0)
    m = MMDiT(**{**TINY, **overrides})
    with torch.no_grad():  # leave adaLN-Zero's identity init: every block must do something for these tests
        for p in m.parameters():
            if (p == 0).all():
                p.normal_(std=0.2)
    return m.eval()


def inputs(b=2, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 12, 8, 8, generator=g), torch.rand(b, generator=g), torch.randn(b, L, 16, generator=g)


def test_output_shapes_and_repa_tokens():
    m = model()
    x, t, ctx = inputs()
    v, zs = m(x, t, ctx)
    assert v.shape == x.shape and len(zs) == 1 and zs[0].shape == (2, 16, 32)


@pytest.mark.parametrize("resolution,latent", [(256, 32), (512, 64)])
def test_paper_shapes_at_256_and_512(resolution, latent):
    """App. K model on 32x32x4 latents (256 tokens) and the large preset on 64x64x4 (1024 tokens), CLIP-L text."""
    preset = "base" if resolution == 256 else "large"
    with torch.device("meta"):
        m = MMDiT(**MMDIT_PRESETS[preset], input_size=latent, in_channels=4, text_dim=768, encoder_dims=(768,))
        v, zs = m(torch.zeros(2, 4, latent, latent), torch.zeros(2), torch.zeros(2, 77, 768))
    assert v.shape == (2, 4, latent, latent) and zs[0].shape == (2, (latent // 2) ** 2, 768)
    n = sum(p.numel() for p in m.parameters())
    if preset == "base":
        # per block two streams of qkv 3h^2 + proj h^2 + MLP 8h^2 + adaLN 6h^2 = 36 h^2; x 24 blocks = 510M
        assert abs(n - 36 * 768**2 * 24) < 0.02 * n, n
        # the official REPA MMDiT sets num_heads = depth: 24 heads of 32 channels
        assert m.blocks[0].x_block.num_heads == 24 and m.blocks[0].x_block.head_dim == 32


def test_image_output_depends_on_caption_only_through_attention():
    m = model()
    x, t, ctx = inputs()
    other = ctx.clone()
    other[1] += 1.0  # change only sample 1's caption
    v1, _ = m(x, t, ctx)
    v2, _ = m(x, t, other)
    assert torch.allclose(v1[0], v2[0], atol=1e-6)  # samples do not mix
    assert (v1[1] - v2[1]).abs().max() > 1e-3  # the caption reaches the image tokens


def test_text_tokens_see_image_tokens():
    m = model()
    x, t, ctx = inputs()
    seen = []
    m.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(out[1].detach().clone()))
    m(x, t, ctx)
    m(x + 1.0, t, ctx)  # only the image changes
    assert (seen[0] - seen[1]).abs().max() > 1e-3


def test_last_block_text_stream_is_pre_only():
    m = model()
    last, first = m.blocks[-1].context_block, m.blocks[0].context_block
    assert last.pre_only and not hasattr(last, "mlp") and not hasattr(last, "proj")
    h = MMDIT_PRESETS["tiny"]["hidden_size"]
    assert last.adaLN_modulation[-1].out_features == 2 * h and first.adaLN_modulation[-1].out_features == 6 * h
    full = model(pre_only_last=False)
    assert not full.blocks[-1].context_block.pre_only


def test_repa_tokens_come_from_block_repa_depth():
    m = model()
    x, t, ctx = inputs()
    hooked = []
    m.blocks[1].register_forward_hook(lambda mod, args, out: hooked.append(out[0]))
    _, zs = m(x, t, ctx)
    assert torch.allclose(zs[0], m.projectors[0](hooked[0]))


def test_qk_norm_pooled_text_and_checkpointing():
    m = model(qk_norm=True, pooled_text=True)
    assert isinstance(m.blocks[0].x_block.q_norm, torch.nn.RMSNorm)
    x, t, ctx = inputs()
    m.train()
    def loss():
        v, zs = m(x, t, ctx)
        return v.square().mean() + zs[0].mean()

    out = loss()
    out.backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.grad_checkpointing = True
    out2 = loss()
    out2.backward()
    assert torch.allclose(out, out2)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(grads, m.parameters()))


def test_bf16_weights_take_fp32_inputs():
    m = model().to(torch.bfloat16)
    v, zs = m(*inputs())
    assert v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all()


def test_input_errors():
    m = model()
    x, t, ctx = inputs()
    with pytest.raises(ValueError, match=r"expects context \(B=2, L, 16\), got \(2, 5, 8\)"):
        m(x, t, ctx[..., :8])
    with pytest.raises(ValueError, match="expects latents"):
        m(x[:, :4], t, ctx)
    with pytest.raises(ValueError, match="repa_depth 9 must be within the 4 blocks"):
        MMDiT(**{**TINY, "repa_depth": 9})


def test_build_from_recorded_kwargs_round_trips():
    m = model()
    again = build_mmdit({**TINY, "encoder_dims": [32]})
    assert again.load_state_dict(m.state_dict()) is not None


def test_cfg_null_condition_replaces_dropped_captions():
    cfg = T2IConfig()
    task = T2ITask(cfg, T2ITask.random_data(cfg, 256), null_context=torch.full((5, 16), -7.0))
    ctx = torch.randn(3, 5, 16)
    out = task.condition({"context": ctx}, torch.tensor([False, True, False]), torch.device("cpu"))["context"]
    assert torch.equal(out[0], ctx[0]) and torch.equal(out[2], ctx[2]) and (out[1] == -7.0).all()


def test_caption_choice_is_reproducible_and_varies():
    picks = [caption_index(0, p, 5) for p in range(200)]
    assert picks == [caption_index(0, p, 5) for p in range(200)]  # a pure function: replays on resume
    assert sorted(set(picks)) == [0, 1, 2, 3, 4]  # all captions get used
    assert picks != [caption_index(1, p, 5) for p in range(200)]  # the seed matters


def test_t2i_refuses_the_ddpm_objective():
    from core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"objective.kind \(text-to-image\): 'ddpm' is not one of: transport"):
        load_config(T2IConfig, "configs/debug/t2i_tiny.yaml", ["objective.kind=ddpm"])


def test_synthetic_text_tokens_are_checked_against_the_config_and_the_generated_set(tmp_path):
    from core.config import ConfigError, load_config
    from core.dist import DistContext
    from t2i.data import make_synthetic_t2i

    with pytest.raises(ConfigError, match=r"data.synthetic_text_tokens=0 is outside 1..77"):
        load_config(T2IConfig, "configs/debug/t2i_tiny.yaml", ["data.synthetic_text_tokens=0"])
    make_synthetic_t2i(str(tmp_path / "data"), 8, 32, "clip-tiny", "pixel-s2d2", text_tokens=12)
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    load = lambda L: load_config(T2IConfig, "configs/debug/t2i_tiny.yaml",  # noqa: E731
                                 [f"run.dir={tmp_path}", f"data.synthetic_text_tokens={L}"])  # the set: run.dir/data
    assert T2ITask.prepare_data(load(12), ctx).manifest["text_embedding"]["shape"] == [12, 32]
    with pytest.raises(ConfigError, match=r"stores 12 caption tokens but data.synthetic_text_tokens=16; delete it"):
        T2ITask.prepare_data(load(16), ctx)


def test_sample_images_follow_the_recorded_transport_path():
    """t2i.sample's SDE takes its score from the velocity on the path the model was trained on; DDPM is refused."""
    from t2i.sample import sample_images

    m = model()
    _, _, ctx = inputs(b=2)
    null = torch.zeros(5, 16)

    def draw(objective):
        meta = {"latent": {"shape": [12, 8, 8], "autoencoder": "pixel-s2d2", "scale_factor": 1.0},
                "objective": objective}
        return sample_images(m, meta, ctx, null, sampler="sde", steps=4, cfg=1.5)

    linear, cosine = draw({"kind": "transport", "path": "linear"}), draw({"kind": "transport", "path": "cosine"})
    assert linear.shape == (2, 16, 16, 3) and (linear == draw({})).all()  # no record: the linear default
    assert (linear != cosine).any()
    with pytest.raises(ValueError, match="trained with objective.kind='ddpm'"):
        draw({"kind": "ddpm"})
