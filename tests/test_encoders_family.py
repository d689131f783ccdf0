"""MAE, I-JEPA, MoCo v3 and DINOv3 target encoders: token grid, preprocessing, which tokens, attention, weights."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import DINOv3ViTConfig, IJepaConfig, ViTMAEConfig

from core.encoders import (
    ENCODER_NAMES, encoder_attention, encoder_dim, load_encoder, mocov3_state_dict, parse_encoder_spec,
    random_weights_spec,
)

TINY = ("mae-tiny", "ijepa-tiny", "mocov3-tiny", "dinov3-tiny")
IMAGENET = (torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225]))


def _images(b, res, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, res, res), generator=g, dtype=torch.uint8)


def _normalised(images):
    mean, std = IMAGENET
    return (images.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("resolution,grid", [(256, 32), (512, 64)])
def test_tiny_token_grid_width_frozen(name, resolution, grid):
    enc = load_encoder(name, resolution)
    assert (enc.patch_size, enc.input_size, enc.grid) == (7, 7 * grid, grid)
    with torch.enable_grad():
        z = enc(_images(1, resolution))
    assert z.shape == (1, grid * grid, encoder_dim(name)) == (1, enc.num_tokens, 32)
    assert z.dtype == torch.float32 and z.grad_fn is None and torch.isfinite(z).all()
    assert not any(p.requires_grad for p in enc.parameters())
    parent = nn.ModuleDict({"enc": enc, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training and not any(m.training for m in enc.modules())


@pytest.mark.parametrize("spec,patch,inputs", [
    ("mae-l@random", 16, (256, 512)),  # the reference feeds MAE and MoCo v3 unresized: 16x16 patches of 16 px
    ("mae-h@random", 14, (224, 448)),  # patch 14: resized to 224 * res / 256, as the reference's I-JEPA
    ("ijepa-h@random", 14, (224, 448)),
    ("mocov3-b@random", 16, (256, 512)),
    ("dinov3-l@random", 16, (256, 512)),
])
def test_released_encoders_give_16x16_tokens_at_256_px(spec, patch, inputs):
    for resolution, input_size in zip((256, 512), inputs):
        with torch.device("meta"):  # the real architecture without its FLOPs or memory
            enc = load_encoder(spec, resolution, device="meta")
        assert (enc.patch_size, enc.input_size) == (patch, input_size)
        assert enc.num_tokens == (16 * resolution // 256) ** 2 and enc.embed_dim == encoder_dim(spec)
        assert "random weights" in enc.description
        with torch.device("meta"):  # the model's token grid decides when given (a /1 model: 32x32 at 256 px)
            assert load_encoder(spec, 256, device="meta", grid=32).input_size == 32 * patch


@pytest.mark.parametrize("spec,params_m", [
    ("mae-l@random", 303.4), ("mae-h@random", 630.8), ("ijepa-h@random", 630.8), ("mocov3-b@random", 85.8),
    ("dinov3-s@random", 21.6), ("dinov3-l@random", 303.1),
])
def test_random_architectures_have_the_published_sizes(spec, params_m):
    with torch.device("meta"):
        enc = load_encoder(spec, 256, device="meta", grid=16)
    # the published sizes (MAE/I-JEPA ViT-L 304M and ViT-H 632M, ViT-B 86M, DINOv3 ViT-S 21M and ViT-L 300M) less
    # the heads and decoders these encoders drop
    assert sum(p.numel() for p in enc.model.parameters()) / 1e6 == pytest.approx(params_m, rel=0.01)


def test_random_weights_are_seeded_and_really_built():
    a, b = (load_encoder("mocov3-s@random", 256, grid=16) for _ in range(2))
    assert a.input_size == 256 and a.num_tokens == 256 and isinstance(a.model, VisionTransformer)
    assert len(a.model.blocks) == 12 and a.model.blocks[0].attn.num_heads == 12  # MoCo v3 ViT-S: 12 heads
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert random_weights_spec("mocov3-b") == "mocov3-b@random" and random_weights_spec("mae-tiny") == "mae-tiny"


@pytest.mark.parametrize("name", TINY)
def test_grey_image_maps_to_imagenet_normalised_constant(name):
    enc = load_encoder(name, 256)
    x = enc.preprocess(torch.full((2, 3, 256, 256), 128, dtype=torch.uint8))
    assert x.shape == (2, 3, 224, 224)
    for c, expected in enumerate((0.074065, 0.205182, 0.426492)):  # (128 / 255 - mean) / std, ImageNet
        torch.testing.assert_close(x[:, c], torch.full_like(x[:, c], expected), atol=2e-5, rtol=0)
    images = _images(2, 256)
    torch.testing.assert_close(enc.preprocess(images),
                               F.interpolate(_normalised(images), size=224, mode="bicubic", align_corners=False))


def test_patch16_encoders_are_not_resized_at_256_px():
    """The reference normalises MAE and MoCo v3 inputs without resizing them; a 16x16 grid at 256 px does the same."""
    enc = load_encoder("mocov3-s@random", 256, grid=16)
    images = _images(2, 256)
    torch.testing.assert_close(enc.preprocess(images), _normalised(images), rtol=0, atol=0)


def test_mae_tokens_are_last_block_in_raster_order_before_the_final_norm():
    enc = load_encoder("mae-tiny", 32)
    assert enc.model.config.mask_ratio == 0.0
    images = _images(2, 32)
    x = enc.preprocess(images)
    # the library's own shuffle (random noise), undone by its ids_restore, must give our tokens
    out = enc.model(pixel_values=x, noise=torch.rand(2, 16, generator=torch.Generator().manual_seed(1)),
                    output_hidden_states=True)
    assert not torch.equal(out.ids_restore, torch.arange(16).expand(2, 16))
    index = out.ids_restore[..., None].expand(-1, -1, 32)
    unshuffled = torch.gather(out.hidden_states[-1][:, 1:], 1, index)
    z = enc(images)
    torch.testing.assert_close(z, unshuffled, rtol=1e-5, atol=1e-5)
    normed = torch.gather(out.last_hidden_state[:, 1:], 1, index)
    assert not torch.allclose(z, normed, atol=1e-2)  # the reference's MAE ViT skips the final norm
    _, _, cls = enc.targets(images, with_cls=True)
    torch.testing.assert_close(cls, out.last_hidden_state[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc(images), z, rtol=0, atol=0)  # deterministic


def test_ijepa_tokens_are_all_of_last_hidden_state_and_it_has_no_class_token():
    enc = load_encoder("ijepa-tiny", 32)
    images = _images(2, 32)
    full = enc.model(pixel_values=enc.preprocess(images)).last_hidden_state
    assert full.shape == (2, 16, 32)  # no CLS token
    torch.testing.assert_close(enc(images), full)
    with pytest.raises(ValueError, match="'ijepa-tiny' gives no class token, and REG needs one"):
        enc.targets(images, with_cls=True)
    tokens, logits, cls = enc.targets(images, attn_blocks=(2,))
    assert cls is None and logits[0].shape == (2, 2, 16, 16)
    torch.testing.assert_close(tokens, full)


def test_dinov3_tokens_drop_cls_and_four_registers():
    enc = load_encoder("dinov3-tiny", 32)
    assert enc.model.config.num_register_tokens == 4 and enc.num_prefix == 5
    images = _images(2, 32)
    full = enc.model(pixel_values=enc.preprocess(images)).last_hidden_state
    assert full.shape == (2, 5 + 16, 32)
    torch.testing.assert_close(enc(images), full[:, 5:])
    _, _, cls = enc.targets(images, with_cls=True)
    torch.testing.assert_close(cls, full[:, 0])
    assert not any("position" in n for n, _ in enc.model.named_parameters())  # RoPE: nothing to resample
    big = load_encoder("dinov3-tiny", 512)
    assert big(_images(1, 512)).shape == (1, 64 * 64, 32)


def test_mocov3_tokens_are_forward_features_without_cls():
    enc = load_encoder("mocov3-tiny", 32)
    images = _images(2, 32)
    x = enc.preprocess(images)
    blocks = enc.model.blocks(enc.model._pos_embed(enc.model.patch_embed(x)))
    assert blocks.shape == (2, 1 + 16, 32)
    z = enc(images)
    torch.testing.assert_close(z, enc.model.norm(blocks)[:, 1:])  # after the final norm, as the reference
    _, _, cls = enc.targets(images, with_cls=True)
    torch.testing.assert_close(cls, enc.model.norm(blocks)[:, 0])


def test_position_embeddings_resampled_once_like_the_reference():
    for name, prefix in (("mae-tiny", 1), ("ijepa-tiny", 0)):
        base = load_encoder(name, 32).model.embeddings.position_embeddings  # built for 28 px: 4x4
        pos = load_encoder(name, 256).model.embeddings.position_embeddings
        assert pos.shape == (1, prefix + 32 * 32, 32)
        torch.testing.assert_close(pos, resample_abs_pos_embed(base, [32, 32], num_prefix_tokens=prefix))
    base = load_encoder("mocov3-tiny", 32).model.pos_embed
    torch.testing.assert_close(load_encoder("mocov3-tiny", 512).model.pos_embed,
                               resample_abs_pos_embed(base, [64, 64], num_prefix_tokens=1))


@pytest.mark.parametrize("name,prefix", [("mae-tiny", 1), ("ijepa-tiny", 0), ("dinov3-tiny", 5)])
def test_attention_logits_match_the_eager_attention(name, prefix):
    """Within a row, logit differences are log-probability differences of the model's own (eager) attention, prefix
    columns included in its softmax; for DINOv3 this checks the RoPE rotation too."""
    enc = load_encoder(name, 32)
    images = _images(2, 32)
    tokens, logits, _ = enc.targets(images, attn_blocks=(1, 2))
    torch.testing.assert_close(tokens, enc(images), rtol=0, atol=0)
    assert [a.shape for a in logits] == [(2, 2, 16, 16)] * 2
    enc.model.set_attn_implementation("eager")
    x = enc.preprocess(images)
    kwargs = dict(noise=torch.arange(16.0).expand(2, 16)) if name == "mae-tiny" else {}
    probs = enc.model(pixel_values=x, output_attentions=True, **kwargs).attentions
    for ours, p in zip(logits, probs):
        log_p = p[:, :, prefix:, prefix:].log()
        torch.testing.assert_close(ours - ours[..., :1], log_p - log_p[..., :1], rtol=1e-4, atol=1e-4)
    assert encoder_attention(name) == (enc.model.config.num_hidden_layers, enc.model.config.num_attention_heads)


def test_attention_table_and_refusals():
    assert encoder_attention("mae-l") == (24, 16) and encoder_attention("ijepa-h") == (32, 16)
    assert encoder_attention("dinov3-b") == (12, 12) and encoder_attention("dinov3-s") == (12, 6)
    with pytest.raises(ValueError, match="'mocov3-b' cannot give its attention logits"):
        encoder_attention("mocov3-b")
    enc = load_encoder("mocov3-tiny", 32)
    with pytest.raises(ValueError, match="fuses its q, k, v"):
        enc.targets(_images(1, 32), attn_blocks=(1,))
    with pytest.raises(ValueError, match="has blocks 1..2, not 3"):
        load_encoder("mae-tiny", 32).targets(_images(1, 32), attn_blocks=(3,))


def test_width_table_matches_the_libraries():
    assert encoder_dim("mae-b") == ViTMAEConfig().hidden_size == 768  # the default configs are the base models
    assert encoder_dim("dinov3-s") == DINOv3ViTConfig().hidden_size == 384
    assert IJepaConfig().hidden_size == 768 and encoder_dim("ijepa-h") == 1280
    assert [encoder_dim(n) for n in ("mae-l", "mae-h", "mocov3-s", "mocov3-b", "dinov3-b", "dinov3-l")] == [
        1024, 1280, 384, 768, 768, 1024]


def test_names_are_registered_and_unknown_names_list_them():
    for name in ("mae-b", "mae-l", "mae-h", "ijepa-h", "mocov3-s", "mocov3-b", "dinov3-s", "dinov3-b", "dinov3-l",
                 *TINY):
        assert name in ENCODER_NAMES and parse_encoder_spec(name) == (name, None)
    with pytest.raises(ValueError, match="unknown encoder 'dinov3-g'") as err:
        load_encoder("dinov3-g", 256)
    assert all(name in str(err.value) for name in ENCODER_NAMES)
    with pytest.raises(ValueError, match="random-init and takes no @SOURCE"):
        load_encoder("mocov3-tiny@/some/file", 32)


def test_mocov3_without_a_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'mocov3-b' takes the MoCo v3 release's checkpoint as a local file: "
                                                r"download vit-b-300ep.pth.tar .* pass mocov3-b@/path/to/vit-b-300ep"):
        load_encoder("mocov3-b", 256)
    with pytest.raises(FileNotFoundError, match="'mocov3-s@/nonexistent/vit-s.pth.tar'.* is not a file"):
        load_encoder("mocov3-s@/nonexistent/vit-s.pth.tar", 256)
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_encoder(f"mocov3-s@{tmp_path}", 256)  # a directory
    junk = tmp_path / "vit-s-300ep.pth.tar"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="'mocov3-s@.*': cannot load MoCo v3 weights from"):
        load_encoder(f"mocov3-s@{junk}", 256)
    torch.save({"state_dict": {"module.encoder.fc.weight": torch.ones(2)}}, junk)  # another model's checkpoint
    with pytest.raises(RuntimeError, match=r"no 'module.base_encoder.\*' keys under 'state_dict'"):
        load_encoder(f"mocov3-s@{junk}", 256)


def _moco_checkpoint(encoder: VisionTransformer) -> dict:
    """The layout of a MoCo v3 training checkpoint around `encoder`'s weights: base and momentum encoders (with
    their projector MLPs in `head`), the predictor, and the optimizer."""
    state = {f"module.base_encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"module.momentum_encoder.{k}": v + 1 for k, v in encoder.state_dict().items()})
    for net in ("base_encoder", "momentum_encoder"):
        state.update({f"module.{net}.head.0.weight": torch.ones(8, encoder.embed_dim),
                      f"module.{net}.head.1.running_mean": torch.zeros(8)})
    state["module.predictor.0.weight"] = torch.ones(8, 8)
    return {"epoch": 300, "arch": "vit_base", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


def test_mocov3_state_dict_conversion_loads_strictly():
    with torch.random.fork_rng():
        torch.manual_seed(7)
        source = VisionTransformer(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                                   num_classes=0)
    converted = mocov3_state_dict(_moco_checkpoint(source))
    assert converted.keys() == source.state_dict().keys()  # no head, momentum encoder or predictor keys
    target = VisionTransformer(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                               num_classes=0)
    assert target.load_state_dict(converted, strict=True).missing_keys == []
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())
    with pytest.raises(ValueError, match="no 'module.base_encoder.\\*' keys"):
        mocov3_state_dict({"state_dict": {"blocks.0.norm1.weight": torch.ones(32)}})


def test_mocov3_file_loads_and_its_position_embeddings_are_resampled(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(3)
        release = VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=12,
                                    mlp_ratio=4, qkv_bias=True, num_classes=0)
    path = tmp_path / "vit-s-300ep.pth.tar"
    torch.save(_moco_checkpoint(release), path)
    enc = load_encoder(f"mocov3-s@{path}", 256)
    assert enc.input_size == 256 and enc.num_tokens == 256 and enc.description == f"mocov3-s@{path} ({path})"
    torch.testing.assert_close(enc.model.pos_embed, resample_abs_pos_embed(release.pos_embed, [16, 16]))
    torch.testing.assert_close(enc.model.blocks[11].mlp.fc2.weight, release.blocks[11].mlp.fc2.weight)
    broken = _moco_checkpoint(release)
    del broken["state_dict"]["module.base_encoder.norm.bias"]
    torch.save(broken, path)
    with pytest.raises(RuntimeError, match=r"(?s)cannot load MoCo v3 weights .*Missing key.*norm.bias"):
        load_encoder(f"mocov3-s@{path}", 256)


def test_local_transformers_directory_checks_width(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny = load_encoder("dinov3-tiny", 32).model
    type(tiny)(tiny.config).save_pretrained(tmp_path)  # a 32-wide DINOv3 where dinov3-b (768) is expected
    with pytest.raises(ValueError, match="token width 32 but 'dinov3-b' is 768 wide"):
        load_encoder(f"dinov3-b@{tmp_path}", 256)
    with pytest.raises(FileNotFoundError, match="/nonexistent/mae"):
        load_encoder("mae-l@/nonexistent/mae", 256)
