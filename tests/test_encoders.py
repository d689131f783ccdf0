"""Frozen REPA target encoders: preprocessing, token shapes, freezing, determinism, the width table, errors."""

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from core.encoders import (
    ENCODER_NAMES, TargetEncoder, encoder_dim, load_encoder, load_encoders, parse_encoder_spec,
)

TINY = ("dinov2-tiny", "clip-tiny", "siglip-tiny")
ALL_TINY = TINY + ("mae-tiny", "ijepa-tiny", "mocov3-tiny", "dinov3-tiny")  # every random-init encoder


def _images(b, res, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, res, res), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("resolution,input_size,tokens", [(32, 28, 16), (256, 224, 1024), (512, 448, 4096)])
def test_input_size_follows_reference(resolution, input_size, tokens):
    enc = load_encoder("dinov2-tiny", resolution)
    assert (enc.input_size, enc.num_tokens, enc.patch_size, enc.embed_dim) == (input_size, tokens, 7, 32)
    assert enc.preprocess(_images(1, resolution)).shape == (1, 3, input_size, input_size)


@pytest.mark.parametrize("name,expected", [
    ("dinov2-tiny", (0.074065, 0.205182, 0.426492)),  # ImageNet mean/std
    ("clip-tiny", (0.076336, 0.168897, 0.339949)),  # OpenAI CLIP mean/std
    ("siglip-tiny", (0.003922, 0.003922, 0.003922)),  # 0.5 / 0.5
])
def test_grey_image_maps_to_normalised_constant(name, expected):
    enc = load_encoder(name, 256)
    grey = torch.full((2, 3, 256, 256), 128, dtype=torch.uint8)
    x = enc.preprocess(grey)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 224, 224)
    for c in range(3):
        torch.testing.assert_close(x[:, c], torch.full_like(x[:, c], expected[c]), atol=2e-5, rtol=0)
    torch.testing.assert_close(enc.preprocess(grey.float()), x)  # float 0..255 == uint8
    dark = enc.preprocess(torch.ones(1, 3, 224, 224))  # always / 255, even when every value is <= 1
    torch.testing.assert_close(dark * enc.std.view(1, 3, 1, 1) + enc.mean.view(1, 3, 1, 1),
                               torch.full_like(dark, 1 / 255))


def test_preprocess_is_normalise_then_bicubic_resize():
    enc = load_encoder("dinov2-tiny", 256)
    images = _images(2, 256)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    normalised = (images.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    x = enc.preprocess(images)
    torch.testing.assert_close(x, F.interpolate(normalised, size=224, mode="bicubic", align_corners=False))
    assert not torch.allclose(x, F.interpolate(normalised, size=224, mode="bilinear", align_corners=False))
    small = load_encoder("dinov2-tiny", 32)  # already at input size 28: no resize at all
    torch.testing.assert_close(small.preprocess(_images(2, 28)), (_images(2, 28).float() / 255 - mean.view(1, 3, 1, 1))
                               / std.view(1, 3, 1, 1))


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("resolution", [256, 512])
def test_forward_shape_dtype_frozen(name, resolution):
    enc = load_encoder(name, resolution)
    with torch.enable_grad():
        z = enc(_images(1, resolution))
    grid = round(224 * resolution / 256) // 7
    assert z.shape == (1, grid * grid, 32) == (1, enc.num_tokens, encoder_dim(name))
    assert z.dtype == torch.float32 and not z.requires_grad and z.grad_fn is None
    assert torch.isfinite(z).all()
    assert not any(p.requires_grad for p in enc.parameters())
    parent = nn.ModuleDict({"enc": enc, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not any(m.training for m in enc.modules())


def test_output_is_float32_when_a_parent_casts_the_encoder():
    enc = load_encoder("dinov2-tiny", 32)
    images = _images(2, 32)
    reference = enc(images)
    z = enc.to(torch.bfloat16)(images)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, reference, atol=0.1, rtol=0.05)


def test_dinov2_tokens_are_patch_tokens_after_final_norm():
    enc = load_encoder("dinov2-tiny", 256)
    images = _images(2, 256)
    full = enc.model(pixel_values=enc.preprocess(images)).last_hidden_state
    assert full.shape[1] == enc.num_tokens + 1  # CLS first
    torch.testing.assert_close(enc(images), full[:, 1:])


def test_clip_tokens_are_last_block_without_cls_before_ln_post():
    enc = load_encoder("clip-tiny", 32)
    images = _images(2, 32)
    visual = enc.model
    h = visual.transformer(visual._embeds(enc.preprocess(images)))
    assert h.shape[1] == enc.num_tokens + 1
    z = enc(images)
    torch.testing.assert_close(z, h[:, 1:])  # the reference's CLIP wrapper: no ln_post
    assert not torch.allclose(z, visual.ln_post(h)[:, 1:], atol=1e-3)


def test_siglip_is_open_clip_timm_tower_with_trunk_tokens():
    enc = load_encoder("siglip-tiny", 32)
    trunk = enc.model.trunk
    assert isinstance(enc.model, open_clip.timm_model.TimmModel)
    assert isinstance(trunk, timm.models.vision_transformer.VisionTransformer)
    assert trunk.num_prefix_tokens == 0 and trunk.global_pool == "map"  # SigLIP: no CLS, attention pooling
    images = _images(2, 32)
    torch.testing.assert_close(enc(images), trunk.forward_features(enc.preprocess(images)))


def test_position_embeddings_resampled_like_reference():
    """Reference: timm resample_abs_pos_embed (bicubic, antialias) to the token grid once at load time."""
    base = load_encoder("dinov2-tiny", 32).model.embeddings.position_embeddings  # built for 28 px: 4x4 grid
    for resolution, grid in [(256, 32), (512, 64)]:
        pos = load_encoder("dinov2-tiny", resolution).model.embeddings.position_embeddings
        assert pos.shape == (1, grid * grid + 1, 32)
        torch.testing.assert_close(pos, resample_abs_pos_embed(base, [grid, grid], num_prefix_tokens=1))
    clip_base = load_encoder("clip-tiny", 32).model.positional_embedding
    clip_pos = load_encoder("clip-tiny", 256).model.positional_embedding
    torch.testing.assert_close(clip_pos, resample_abs_pos_embed(clip_base[None], [32, 32])[0])
    siglip_base = load_encoder("siglip-tiny", 32).model.trunk.pos_embed
    siglip_pos = load_encoder("siglip-tiny", 256).model.trunk.pos_embed
    torch.testing.assert_close(siglip_pos, resample_abs_pos_embed(siglip_base, [32, 32], num_prefix_tokens=0))


@pytest.mark.parametrize("name", ALL_TINY)
def test_tiny_weights_deterministic_and_global_rng_untouched(name):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = load_encoder(name, 32).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)
    b = load_encoder(name, 32).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_encoder(name, 32).description == f"{name} (random init)"


def test_encoder_dim_table_matches_libraries():
    for name in TINY:
        assert load_encoder(name, 32).embed_dim == encoder_dim(name) == 32
    assert encoder_dim("clip-b") == open_clip.get_model_config("ViT-B-16")["vision_cfg"]["width"] == 768
    assert encoder_dim("clip-l") == open_clip.get_model_config("ViT-L-14")["vision_cfg"]["width"] == 1024
    siglip_trunk = open_clip.get_model_config("ViT-B-16-SigLIP")["vision_cfg"]["timm_model_name"]
    with torch.device("meta"):
        assert encoder_dim("siglip-b") == timm.create_model(siglip_trunk).embed_dim == 768
    assert encoder_dim("dinov2-b") == Dinov2Config().hidden_size == 768  # the default config is dinov2-base
    assert encoder_dim("dinov2-l@/some/dir") == 1024
    assert [encoder_dim(n) for n in ("dinov2-s", "dinov2-g")] == [384, 1536]


def test_parse_spec_and_unknown_name_lists_valid_names():
    assert parse_encoder_spec("dinov2-b") == ("dinov2-b", None)
    assert parse_encoder_spec(" clip-l@/ckpt/clip.bin ") == ("clip-l", "/ckpt/clip.bin")
    assert parse_encoder_spec("dinov2-b@facebook/dinov2-base") == ("dinov2-b", "facebook/dinov2-base")
    with pytest.raises(ValueError, match="unknown encoder 'dinov3-g'") as err:
        load_encoder("dinov3-g", 256)
    assert all(name in str(err.value) for name in ENCODER_NAMES)
    with pytest.raises(ValueError, match="unknown encoder"):
        encoder_dim("mae-g")


def test_input_size_not_divisible_by_patch_raises():
    with pytest.raises(ValueError, match=r"input size 88 px .* patch size 7"):
        load_encoder("dinov2-tiny", 100)  # round(224 * 100 / 256) = 88, not a multiple of 7


def test_bad_sources_raise_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="/nonexistent/dinov2"):
        load_encoder("dinov2-b@/nonexistent/dinov2", 256)
    with pytest.raises(FileNotFoundError, match="/nonexistent/clip.bin"):
        load_encoder("clip-l@/nonexistent/clip.bin", 256)
    with pytest.raises(FileNotFoundError, match="open_clip_pytorch_model.bin"):
        load_encoder(f"siglip-b@{tmp_path}", 256)  # a directory without weights
    with pytest.raises(ValueError, match="neither a local file nor an open_clip pretrained tag"):
        load_encoder("clip-b@no-such-tag", 256)
    with pytest.raises(ValueError, match="random-init and takes no @SOURCE"):
        load_encoder("clip-tiny@/some/file", 256)


def test_local_dinov2_directory_loads_with_from_pretrained_and_checks_width(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny = load_encoder("dinov2-tiny", 32).model
    Dinov2Model(tiny.config).save_pretrained(tmp_path)  # a 32-wide model where dinov2-b (768) is expected
    with pytest.raises(ValueError, match="token width 32 but 'dinov2-b' is 768 wide"):
        load_encoder(f"dinov2-b@{tmp_path}", 256)


def test_load_encoders_builds_each_spec():
    encs = load_encoders(["dinov2-tiny", "siglip-tiny"], 256)
    assert [e.name for e in encs] == ["dinov2-tiny", "siglip-tiny"]
    assert all(isinstance(e, TargetEncoder) and e.num_tokens == 1024 for e in encs)
    assert [e.name for e in load_encoders("clip-tiny", 32)] == ["clip-tiny"]


@pytest.mark.parametrize("name", ["dinov2-tiny", "clip-tiny", "siglip-tiny"])
def test_grid_sizes_input_to_the_model_token_grid(name):
    """With the model's token grid given, every encoder yields grid^2 tokens (patch-16 ones included)."""
    enc = load_encoder(name, 256, grid=16)
    assert enc.input_size == enc.patch_size * 16 and enc.num_tokens == 256
    out = enc(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert out.shape == (1, 256, enc.embed_dim)


@pytest.mark.parametrize("spec, dim, params_m", [("dinov2-s@random", 384, 21.6), ("clip-b@random", 768, 85.8)])
def test_random_source_builds_the_real_architecture(spec, dim, params_m):
    enc = load_encoder(spec, 256, grid=16)
    assert enc.embed_dim == dim and enc.num_tokens == 256 and "random weights" in enc.description
    # the published sizes less the position embeddings beyond the 16x16 grid
    assert sum(p.numel() for p in enc.model.parameters()) / 1e6 == pytest.approx(params_m, rel=0.01)
    first = next(iter(enc.model.parameters()))
    assert torch.equal(first, next(iter(load_encoder(spec, 256, grid=16).model.parameters())))  # seeded


def test_random_source_is_refused_by_the_tiny_encoders():
    with pytest.raises(ValueError, match="random-init and takes no @SOURCE"):
        load_encoder("dinov2-tiny@random", 32)
