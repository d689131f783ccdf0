"""core/text_encoders.py: spec parsing, the tiny CLIP / OpenCLIP text encoders, loading a saved CLIP text model."""

import pytest
import torch

from core.text_encoders import clip_bpe_tokenizer, load_text_encoder, parse_text_encoder_spec


@pytest.fixture(scope="module")
def tiny():
    return load_text_encoder("clip-tiny")


def test_offline_clip_tokenizer_matches_open_clip():
    from open_clip.tokenizer import SimpleTokenizer

    tok = clip_bpe_tokenizer()
    assert len(tok) == 49408 and (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    text = "A photo of two cats, sleeping on a sofa!"
    ids = tok([text], padding="max_length", max_length=77, truncation=True)["input_ids"][0]
    ref = SimpleTokenizer()([text])[0].tolist()
    n = ref.index(49407) + 1
    assert ids[:n] == ref[:n] and ids[n:] == [49407] * (77 - n)  # HF CLIP pads with <|endoftext|>


def test_clip_tiny_shapes_and_determinism(tiny):
    caps = ["a red circle above a blue square", "", "word " * 200]
    x = tiny.encode(caps)
    assert x.shape == (3, 77, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert (tiny.id, tiny.dim, tiny.max_length) == ("clip-tiny", 32, 77)
    assert torch.equal(load_text_encoder("clip-tiny").encode(caps), x)  # seeded random init
    # batch 1 vs batch 3: the same math, other GEMM blocking; float32 round-off only (9.4e-7 seen on an AMD EPYC)
    torch.testing.assert_close(tiny.encode(caps[:1])[0], x[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x[0], x[1])
    assert tiny.encode([]).shape == (0, 77, 32)
    with pytest.raises(TypeError, match="list of caption strings"):
        tiny.encode("a single string")


def test_clip_from_saved_directory(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "clip")
    tiny.tokenizer.save_pretrained(tmp_path / "clip")
    loaded = load_text_encoder(f"clip@{tmp_path / 'clip'}")
    caps = ["a photo of a cat", "two dogs"]
    assert loaded.id == f"clip@{tmp_path / 'clip'}" and loaded.dim == 32
    assert torch.allclose(loaded.encode(caps), tiny.encode(caps), atol=1e-6)
    with pytest.raises(ValueError, match="is 32 wide, but CLIP ViT-L/14 text is 768"):
        load_text_encoder(f"clip-l@{tmp_path / 'clip'}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_encoder(f"clip-l@{tmp_path / 'missing'}")


def test_openclip_tiny():
    enc = load_text_encoder("openclip-tiny")
    x = enc.encode(["a photo of a cat", ""])
    assert x.shape == (2, 77, 32) and x.dtype == torch.float32 and (enc.dim, enc.max_length) == (32, 77)
    assert not torch.allclose(x[0], x[1])
    # batch 1 vs batch 2: float32 round-off only (the blocking of the matrix products depends on the batch)
    torch.testing.assert_close(load_text_encoder("openclip-tiny").encode(["a photo of a cat"])[0], x[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,match", [
    ("t5-xxl", "unknown text encoder"), ("openclip", "needs an architecture"), ("clip-l:ViT-L-14", "take none"),
    ("clip-tiny@/x", "random-init"), ("clip", "needs @SOURCE"), ("openclip:NoSuchArch", "not an open_clip model"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        load_text_encoder(spec)


def test_spec_parsing():
    assert parse_text_encoder_spec("clip-l") == ("clip-l", None, None)
    assert parse_text_encoder_spec("clip-l@/w/clip") == ("clip-l", None, "/w/clip")
    assert parse_text_encoder_spec("openclip:ViT-bigG-14@laion2b_s39b_b160k") == \
        ("openclip", "ViT-bigG-14", "laion2b_s39b_b160k")


@pytest.mark.parametrize("spec", ["clip-tiny", "openclip-tiny"])
def test_keep_tokens_is_the_start_of_the_full_embedding(spec):
    texts = ["a red circle above a blue square", ""]
    full = load_text_encoder(spec).encode(texts)
    short = load_text_encoder(spec, tokens=12)
    assert short.max_length == 12 and short.context_length == 77
    assert torch.equal(short.encode(texts), full[:, :12]) and short.encode([]).shape == (0, 12, 32)
    if spec == "clip-tiny":  # causal: a pass over only the first 12 token ids gives the same 12 outputs
        ids = short.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            alone = short.model(input_ids=ids[:, :12]).last_hidden_state
        assert torch.allclose(alone, full[:, :12], atol=1e-5)
    with pytest.raises(ValueError, match="text tokens must be in 1..77, got 0"):
        load_text_encoder(spec, tokens=0)


def test_token_counts_include_start_and_end_tokens():
    texts = ["a red circle", "a picture of a green square over a blue triangle"]
    for spec in ("clip-tiny", "openclip-tiny"):
        assert load_text_encoder(spec).token_counts(texts) == [5, 12], spec


def test_a_bidirectional_tower_keeps_all_its_tokens():
    """Without a causal mask (SigLIP-style towers) the first L tokens depend on the padding after them, so
    keeping fewer than the context length would not be the full pass's tokens: refused."""
    from open_clip.model import CLIPTextCfg, _build_text_tower
    from open_clip.tokenizer import SimpleTokenizer

    from core.text_encoders import OpenClipTextEncoder

    cfg = CLIPTextCfg(width=32, heads=2, layers=2, mlp_ratio=2.0, no_causal_mask=True)
    enc = OpenClipTextEncoder("openclip-bidirectional", _build_text_tower(embed_dim=32, text_cfg=cfg),
                              SimpleTokenizer(context_length=77))
    assert not enc.causal and load_text_encoder("openclip-tiny").causal and load_text_encoder("clip-tiny").causal
    full = enc.encode(["a red circle"])
    assert enc.keep_tokens(77).max_length == 77
    with pytest.raises(ValueError, match="attends in both directions .* keep all 77"):
        enc.keep_tokens(12)
    # why: the bidirectional tower's first tokens change with what follows them
    ids = enc.tokenizer(["a red circle"])
    with torch.no_grad():
        alone = enc.tower.transformer(enc.tower.token_embedding(ids[:, :12]) + enc.tower.positional_embedding[:12])
    assert not torch.allclose(enc.tower.ln_final(alone), full[:, :12], atol=1e-4)
