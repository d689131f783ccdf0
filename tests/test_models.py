"""SiT/DiT backbone and its layers: reference state-dict layout, shapes, REPA tap, init, checkpointing, errors."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from class_cond.models import SIT_PRESETS, SiT, build_model
from core.layers import (
    Attention,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    attention,
    get_2d_sincos_pos_embed,
    timestep_embedding,
    unpatchify,
)

REFERENCE_KEYS = Path(__file__).parent / "data" / "repa_sit_xl2_keys.txt"  # the official SiT-XL/2's (header: source)
NUM_CLASSES = 10
# 8x8 latents, patch 2 -> 16 tokens; two encoders of different widths.
H = SIT_PRESETS["tiny"]["hidden_size"]
TINY = dict(input_size=8, num_classes=NUM_CLASSES, encoder_dims=(16, 8), projector_dim=32, repa_depth=2)


def tiny_model(**overrides) -> SiT:
    torch.manual_seed(0)
    return build_model("tiny", **{**TINY, **overrides})


def tiny_inputs(model: SiT, batch: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, NUM_CLASSES + 1, (batch,), generator=g)
    return x, t, y


def perturb_zero_init(model: SiT) -> SiT:
    """Give the zero-initialised adaLN and output layers random weights so every block does something."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for mod in [*model.blocks, model.final_layer]:
            lin = mod.adaLN_modulation[-1]
            lin.weight.copy_(0.1 * torch.randn(lin.weight.shape, generator=g))
            lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=g))
        w = model.final_layer.linear.weight
        w.copy_(0.1 * torch.randn(w.shape, generator=g))
    return model


def reference_keys() -> list[tuple[str, tuple[int, ...]]]:
    rows = [line.split("\t") for line in REFERENCE_KEYS.read_text().splitlines() if line and not line.startswith("#")]
    return [(key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())) for key, shape in rows]


def test_xl2_state_dict_matches_reference():
    with torch.device("meta"):
        model = SiT(**SIT_PRESETS["XL/2"], num_classes=1000, encoder_dims=(768,), repa_depth=8)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == reference_keys()


def test_presets_are_data():
    assert len(SIT_PRESETS) == 18  # S, B, L, XL at patch 1, 2, 4, 8; tiny and tiny/1
    assert SIT_PRESETS["B/4"] == dict(depth=12, hidden_size=768, num_heads=12, patch_size=4)
    assert SIT_PRESETS["L/8"] == dict(depth=24, hidden_size=1024, num_heads=16, patch_size=8)
    assert SIT_PRESETS["S/2"] == dict(depth=12, hidden_size=384, num_heads=6, patch_size=2)
    assert SIT_PRESETS["tiny"] == dict(depth=4, hidden_size=128, num_heads=4, patch_size=2)
    assert len(tiny_model(depth=2).blocks) == 2  # overrides win over the preset


def test_output_and_zs_shapes():
    model = tiny_model()
    x, t, y = tiny_inputs(model)
    out, zs = model(x, t, y)
    assert out.shape == x.shape
    assert [z.shape for z in zs] == [(3, 16, 16), (3, 16, 8)]


def test_learn_sigma_doubles_output_channels():
    model = tiny_model(learn_sigma=True)
    x, t, y = tiny_inputs(model)
    out, _ = model(x, t, y)
    assert out.shape == (3, 8, 8, 8)


def test_no_encoders_gives_no_zs_and_ignores_repa_depth():
    model = tiny_model(encoder_dims=(), repa_depth=99)
    x, t, y = tiny_inputs(model)
    out, zs = model(x, t, y)
    assert zs == [] and len(model.projectors) == 0
    assert out.shape == x.shape


def test_first_block_gets_tokens_plus_pos_embed_and_t_plus_y():
    model = tiny_model()
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0], c=args[1]))
    x, t, y = tiny_inputs(model)
    model(x, t, y)
    torch.testing.assert_close(seen["x"], model.x_embedder(x) + get_2d_sincos_pos_embed(H, 4)[None])
    torch.testing.assert_close(seen["c"], model.t_embedder(t) + model.y_embedder(y))


@pytest.mark.parametrize("repa_depth", [1, 3])
def test_zs_come_from_block_repa_depth(repa_depth):
    model = perturb_zero_init(tiny_model(repa_depth=repa_depth))
    hidden = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda mod, args, output, i=i: hidden.__setitem__(i, output))
    x, t, y = tiny_inputs(model)
    _, zs = model(x, t, y)
    for k, projector in enumerate(model.projectors):
        torch.testing.assert_close(zs[k], projector(hidden[repa_depth - 1]), rtol=0, atol=0)
        assert not torch.allclose(zs[k], projector(hidden[repa_depth]))  # a different block gives other tokens


def test_adaln_zero_output_is_zero_at_init():
    model = tiny_model()
    x, t, y = tiny_inputs(model)
    out, _ = model(x, t, y)
    assert torch.equal(out, torch.zeros_like(out))
    out, _ = perturb_zero_init(model)(x, t, y)
    assert out.abs().min() > 0


def test_initialization_follows_dit():
    model = tiny_model()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert torch.equal(mod.bias, torch.zeros_like(mod.bias)), name
    for mod in [*model.blocks, model.final_layer]:
        assert torch.equal(mod.adaLN_modulation[-1].weight, torch.zeros_like(mod.adaLN_modulation[-1].weight))
    assert torch.equal(model.final_layer.linear.weight, torch.zeros_like(model.final_layer.linear.weight))
    qkv = model.blocks[0].attn.qkv.weight  # xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    assert 0.95 * math.sqrt(6 / (H + 3 * H)) < qkv.abs().max() <= math.sqrt(6 / (H + 3 * H))
    proj = model.projectors[0][0].weight
    assert 0.9 * math.sqrt(6 / (H + 32)) < proj.abs().max() <= math.sqrt(6 / (H + 32))
    patch = model.x_embedder.proj.weight  # xavier on the (H, 4*2*2) view
    assert 0.9 * math.sqrt(6 / (H + 16)) < patch.abs().max() <= math.sqrt(6 / (H + 16))
    assert model.t_embedder.mlp[2].weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.1)
    torch.testing.assert_close(model.pos_embed, get_2d_sincos_pos_embed(H, 4)[None], rtol=0, atol=0)


def test_grad_checkpointing_same_output_and_grads():
    model = perturb_zero_init(tiny_model())
    x, t, y = tiny_inputs(model)
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def run():
        model.zero_grad()
        out, zs = model(x, t, y)
        (out.square().mean() + sum(z.square().mean() for z in zs)).backward()
        return out, zs, {n: p.grad.clone() for n, p in model.named_parameters()}

    out, zs, grads = run()
    model.grad_checkpointing = True
    calls.clear()
    out_ckpt, zs_ckpt, grads_ckpt = run()
    assert len(calls) == 2  # the block's forward is recomputed in backward: checkpointing is really on
    torch.testing.assert_close(out_ckpt, out, rtol=1e-6, atol=1e-7)
    for z_ckpt, z in zip(zs_ckpt, zs):
        torch.testing.assert_close(z_ckpt, z, rtol=1e-6, atol=1e-7)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def manual_attention(q, k, v):
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_matches_hand_written(qk_norm):
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qk_norm=qk_norm)
    if qk_norm:  # non-trivial LayerNorm affine so the norms must actually be applied
        for norm in (attn.q_norm, attn.k_norm):
            torch.nn.init.normal_(norm.weight)
            torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 5, 32)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    if qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    expected = attn.proj(manual_attention(q, k, v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention(q, k, v), manual_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_attention_loads_timm_weights():
    from timm.models.vision_transformer import Attention as TimmAttention

    torch.manual_seed(0)  # the REPA release builds timm's Attention with qk_norm and LayerNorm
    ref = TimmAttention(32, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm)
    for norm in (ref.q_norm, ref.k_norm):
        torch.nn.init.normal_(norm.weight)
    ours = Attention(32, num_heads=4, qkv_bias=True, qk_norm=True)
    ours.load_state_dict(ref.state_dict())  # strict: same key names
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


def test_timestep_embedding_values():
    # dim 4: half = 2, freqs = exp(-ln(10000) * [0, 1] / 2) = [1, 0.01]; layout [cos | sin].
    emb = timestep_embedding(torch.tensor([0.0, 1.0]), 4)
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0], [math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)]])
    torch.testing.assert_close(emb, expected)
    odd = timestep_embedding(torch.tensor([1.0]), 5)
    assert odd.shape == (1, 5) and odd[0, -1] == 0


def test_timestep_embedder_uses_raw_t_and_model_dtype():
    embedder = TimestepEmbedder(16)
    t = torch.tensor([0.0, 0.25, 1.0])  # SiT time in [0, 1], not rescaled to DiT's 0..999
    torch.testing.assert_close(embedder(t), embedder.mlp(timestep_embedding(t, 256)))
    assert embedder.to(torch.bfloat16)(t).dtype == torch.bfloat16


def dit_numpy_pos_embed(embed_dim, grid_size):
    """facebookresearch/DiT models.py get_2d_sincos_pos_embed, condensed."""

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return torch.from_numpy(emb).float()


def test_2d_sincos_pos_embed():
    emb = get_2d_sincos_pos_embed(4, 2)
    assert emb.shape == (4, 4) and emb.dtype == torch.float32
    # Token 1 is (row 0, col 1); first half encodes the column: [sin 1, cos 1, sin 0, cos 0].
    torch.testing.assert_close(emb[1], torch.tensor([math.sin(1), math.cos(1), 0.0, 1.0]))
    torch.testing.assert_close(emb[2], torch.tensor([0.0, 1.0, math.sin(1), math.cos(1)]))
    torch.testing.assert_close(get_2d_sincos_pos_embed(64, 5), dit_numpy_pos_embed(64, 5), rtol=0, atol=1e-7)


def test_unpatchify_inverts_patch_embed_order():
    B, C, p, size = 2, 3, 2, 6
    x = torch.randn(B, C, size, size)
    embed = PatchEmbed(size, p, C, p * p * C)
    with torch.no_grad():  # a conv that copies each patch out in DiT's (p, q, c) token layout
        embed.proj.weight.zero_()
        embed.proj.bias.zero_()
        for i in range(p):
            for j in range(p):
                for c in range(C):
                    embed.proj.weight[(i * p + j) * C + c, c, i, j] = 1.0
        tokens = embed(x)
    assert tokens.shape == (B, (size // p) ** 2, p * p * C)
    torch.testing.assert_close(tokens[:, 1, :C], x[:, :, 0, p])  # token 1 = row 0, column 1
    torch.testing.assert_close(unpatchify(tokens, p, C), x)


def test_null_label_is_accepted_and_distinct():
    emb = LabelEmbedder(NUM_CLASSES, 8)
    out = emb(torch.tensor([0, NUM_CLASSES]))
    assert not torch.equal(out[0], out[1])
    assert emb.embedding_table.num_embeddings == NUM_CLASSES + 1


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match=r"'XL/3'.*S/2.*XL/8.*tiny"):
        build_model("XL/3")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(repa_depth=5), r"repa_depth 5 .*depth=4"),
        (dict(repa_depth=0), r"repa_depth 0 .*depth=4"),
        (dict(input_size=9), r"input_size 9 .*patch_size 2"),
        (dict(hidden_size=66), r"hidden_size 66 .*num_heads 4"),
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**overrides)


@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (2, 3, 8, 8), (4, 8, 8)])
def test_wrong_input_shape_raises(shape):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\(B, 4, 8, 8\)"):
        model(torch.randn(shape), torch.rand(2), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("label", [-1, NUM_CLASSES + 1])
def test_label_out_of_range_raises(label):
    model = tiny_model()
    x, t, _ = tiny_inputs(model, batch=2)
    with pytest.raises(ValueError, match=rf"\[{label}\] out of range \[0, {NUM_CLASSES}\]"):
        model(x, t, torch.tensor([0, label]))


def test_class_cond_task_checks_labels_before_they_reach_the_device():
    from class_cond.task import ClassCondConfig, ClassCondTask
    from conftest import TINY as TINY_YAML
    from core.config import load_config
    from core.task import DataInfo

    task = ClassCondTask(load_config(ClassCondConfig, TINY_YAML), DataInfo("(labels only)", {"num_classes": 3}))
    with pytest.raises(ValueError, match=r"\[5\] out of range \[0, 3\]"):
        task.condition({"label": torch.tensor([0, 5])}, torch.zeros(2, dtype=torch.bool), torch.device("cpu"))
    # off the host the embedder reads no label values (on a GPU that would stall every step)
    model = tiny_model().to("meta")
    x, t, _ = tiny_inputs(model, batch=2)
    out, _ = model(x.to("meta"), t.to("meta"), torch.tensor([0, NUM_CLASSES + 7], device="meta"))
    assert out.device.type == "meta"
