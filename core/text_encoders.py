"""Frozen caption encoders for text-to-image: per-token embeddings (B, L, D) of a list of captions.

A spec names the encoder, as the vision encoders' specs do (core/encoders.py):

    clip-l                  CLIP ViT-L/14 text (transformers CLIPTextModel + CLIPTokenizer from
                            openai/clip-vit-large-patch14): the last hidden state, 77 tokens x 768, as U-ViT
                            and the REPA T2I setup (App. K)
    clip-l@SOURCE           the same model from a local directory or hub id (must be 768 wide)
    clip@SOURCE             any transformers CLIP text model + tokenizer at SOURCE (width from its config)
    openclip:ARCH[@SOURCE]  an open_clip text tower (ARCH e.g. ViT-bigG-14; SOURCE a pretrained tag or a local
                            weights file): tokens after ln_final; L is the tokenizer's context length
    clip-tiny               test-only: random-init 2-layer CLIPTextModel (width 32, seed 0) with the real CLIP BPE
                            tokenizer, built offline from open_clip's bundled vocabulary
    openclip-tiny           test-only: random-init 2-layer open_clip TextTransformer (width 32) + open_clip's tokenizer

Captions are padded with the tokenizer's pad token and truncated to its context length (77 for CLIP); no
attention mask is passed (the causal mask keeps padding out of the caption tokens), as U-ViT's FrozenCLIPEmbedder.
`tokens=L` keeps the first L output tokens only (L = `max_length`): the text transformers are causal, so these are
exactly what the full-length pass gives them, and short captions (the demo's fit in 12) lose nothing while the
joint attention of the MMDiT gets 77 - L tokens fewer.
"""
import contextlib
import functools
import gzip
import os
from typing import Optional, Sequence, Union

import torch
from torch import nn

from core.hub import require_weights

CLIP_L_SOURCE = "openai/clip-vit-large-patch14"
CLIP_L_DIM = 768
TEXT_ENCODER_NAMES = ("clip-l", "clip", "openclip", "clip-tiny", "openclip-tiny")
# The tiny test encoders: width 32, 2 layers, 2 heads, MLP 64, seed 0 (full CLIP vocabulary, 49408 tokens).
_TINY = dict(width=32, layers=2, heads=2, mlp=64, seed=0)


class TextEncoder(nn.Module):
    """A frozen caption encoder. Attributes: id (the spec that rebuilds it), dim (D), context_length (the
    tokenizer's), max_length (L, the output tokens kept: context_length unless `keep_tokens` lowered it)."""

    def __init__(self, spec: str, dim: int, context_length: int):
        super().__init__()
        self.id, self.dim = spec, int(dim)
        self.context_length = self.max_length = int(context_length)

    causal = True  # the transformer's causal mask keeps later (padding) tokens out of earlier ones

    def keep_tokens(self, tokens: int | None) -> "TextEncoder":
        """Keep the first `tokens` output tokens (None: all); ValueError outside 1..context_length, or below it for
        a bidirectional tower (its first tokens depend on the rest, so the cut would not be the full pass's)."""
        tokens = self.context_length if tokens is None else int(tokens)
        if not 1 <= tokens <= self.context_length:
            raise ValueError(f"text encoder {self.id!r}: text tokens must be in 1..{self.context_length}, got {tokens}")
        if tokens < self.context_length and not self.causal:
            raise ValueError(f"text encoder {self.id!r} attends in both directions (no causal mask): its first "
                             f"{tokens} tokens are not those of the full {self.context_length}-token pass; keep all "
                             f"{self.context_length}")
        self.max_length = tokens
        return self

    def _tokens(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each caption with its start/end tokens (up to context_length): more than max_length means the
        caption is cut."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """texts: B captions -> (B, max_length, dim) float32 token embeddings on the encoder's device."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode takes a list of caption strings")
        if len(texts) == 0:
            return torch.zeros(0, self.max_length, self.dim, device=self.device)
        return self._tokens(list(texts))[:, : self.max_length].float()

    def train(self, mode: bool = True) -> "TextEncoder":
        """Always eval: the encoder is frozen."""
        return super().train(False)


class HFClipTextEncoder(TextEncoder):
    """transformers CLIPTextModel; tokens = last_hidden_state (after the final layer norm)."""

    def __init__(self, spec: str, model: nn.Module, tokenizer, context_length: int = 77):
        super().__init__(spec, model.config.hidden_size, context_length)
        self.model, self.tokenizer = model, tokenizer
        self.requires_grad_(False)
        self.train(False)

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        ids = self.tokenizer(list(texts), max_length=self.context_length, truncation=True)["input_ids"]
        return [len(i) for i in ids]

    def _tokens(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=self.context_length, truncation=True,
                             return_tensors="pt")["input_ids"]
        return self.model(input_ids=ids.to(self.device)).last_hidden_state


class OpenClipTextEncoder(TextEncoder):
    """open_clip text tower; tokens = the transformer's output after ln_final (B, context_length, width)."""

    def __init__(self, spec: str, tower: nn.Module, tokenizer):
        width = tower.text.transformer.width if hasattr(tower, "text") else tower.transformer.width
        super().__init__(spec, width, tokenizer.context_length)
        self.tower, self.tokenizer = tower, tokenizer
        self.requires_grad_(False)
        self.train(False)

    @property
    def causal(self) -> bool:
        tower = self.tower.text if hasattr(self.tower, "text") else self.tower
        return getattr(tower, "attn_mask", None) is not None  # SigLIP-style towers (no_causal_mask) have none

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        return (self.tokenizer(list(texts)) != 0).sum(dim=1).tolist()  # open_clip pads with token 0

    def _tokens(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts).to(self.device)
        t = self.tower
        if hasattr(t, "text"):  # CustomTextCLIP: its TextTransformer returns (pooled, tokens)
            t = t.text
        if hasattr(t, "output_tokens"):  # a TextTransformer
            t.output_tokens = True
            return t(ids)[1]
        # open_clip's CLIP keeps the text tower's parts on the model: encode_text up to ln_final
        x = t.token_embedding(ids) + t.positional_embedding
        return t.ln_final(t.transformer(x, attn_mask=t.attn_mask))


def parse_text_encoder_spec(spec: str) -> tuple[str, Optional[str], Optional[str]]:
    """spec -> (name, arch or None, source or None); raises ValueError naming the valid forms."""
    head, _, source = spec.strip().partition("@")
    head, source = head.strip(), source.strip() or None
    name, _, arch = head.partition(":")
    valid = "clip-l, clip-l@SOURCE, clip@SOURCE, openclip:ARCH[@SOURCE], clip-tiny, openclip-tiny"
    if name not in TEXT_ENCODER_NAMES:
        raise ValueError(f"unknown text encoder {spec!r}; valid forms: {valid}")
    if (name == "openclip") != bool(arch):
        raise ValueError(f"text encoder {spec!r}: 'openclip:ARCH' needs an architecture, other names take none; "
                         f"valid forms: {valid}")
    if name.endswith("-tiny") and source:
        raise ValueError(f"text encoder {name!r} is random-init and takes no @SOURCE (got {source!r})")
    if name == "clip" and not source:
        raise ValueError(f"text encoder {spec!r}: 'clip' needs @SOURCE (a local directory or hub id)")
    return name, arch or None, source


def text_shape(spec: str, tokens: int | None = None) -> tuple[int, int]:
    """(L tokens, D width) of the caption embeddings of `spec` (keeping `tokens`) without loading it, for the
    names whose shape is fixed (clip-l, the tiny ones); ValueError for the others, known only from their weights."""
    name, _, _ = parse_text_encoder_spec(spec)
    if tokens is not None and not 1 <= tokens <= 77:
        raise ValueError(f"text encoder {spec!r}: text tokens must be in 1..77, got {tokens}")
    if name == "clip-l" or name.endswith("-tiny"):
        return tokens or 77, CLIP_L_DIM if name == "clip-l" else _TINY["width"]
    raise ValueError(f"the embedding shape of text encoder {spec!r} is known only once it is loaded")


def load_text_encoder(spec: str, device: Union[str, torch.device] = "cpu", tokens: Optional[int] = None
                      ) -> TextEncoder:
    """Build the frozen text encoder named by `spec` (module docstring) in eval mode on `device`, keeping the
    first `tokens` output tokens (None: all)."""
    name, arch, source = parse_text_encoder_spec(spec)
    spec = spec.strip()
    if name == "clip-tiny":
        enc = _tiny_hf_clip(spec)
    elif name == "openclip-tiny":
        enc = _tiny_open_clip(spec)
    elif name == "openclip":
        enc = _open_clip(spec, arch, source)
    else:
        enc = _hf_clip(spec, source or CLIP_L_SOURCE)
        if name == "clip-l" and enc.dim != CLIP_L_DIM:
            raise ValueError(f"text encoder {spec!r} is {enc.dim} wide, but CLIP ViT-L/14 text is {CLIP_L_DIM}: "
                             f"{source!r} is not that model (use clip@SOURCE for another CLIP text model)")
    return enc.keep_tokens(tokens).to(device)


def _hf_clip(spec: str, source: str) -> TextEncoder:
    # heavy (transformers): imported only when this model is built
    from transformers import CLIPTextModel, CLIPTokenizer

    path = os.path.expanduser(source)
    if source.startswith(("/", "./", "../", "~")) and not os.path.exists(path):
        raise FileNotFoundError(f"text encoder {spec!r}: path {source!r} does not exist")
    name = spec.partition("@")[0].strip()
    require_weights(source, f"text encoder {spec!r}: its model", f"name the copy as {name}@DIR (data_prep.coco "
                    "--text-encoder, t2i.sample --text-encoder)")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path)
        model = CLIPTextModel.from_pretrained(path, dtype=torch.float32)
    except OSError as e:
        raise OSError(f"text encoder {spec!r}: cannot load a CLIP text model and tokenizer from {source!r}: {e}") from e
    return HFClipTextEncoder(spec, model, tokenizer, context_length=min(77, model.config.max_position_embeddings))


@functools.lru_cache(maxsize=1)
def clip_bpe_tokenizer():
    """The CLIP BPE tokenizer (transformers CLIPTokenizer, 49408 tokens) built offline from open_clip's bundled
    BPE merges, as OpenAI's CLIP builds its vocabulary: 256 byte symbols, the same with '</w>', the merges, then
    <|startoftext|> (49406) and <|endoftext|> (49407). Built once per process (~2 s) and shared: do not modify."""
    # heavy (open_clip, transformers): imported only when the tokenizer is built
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges)


def _tiny_hf_clip(spec: str) -> TextEncoder:
    # heavy (transformers): imported only when this model is built
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_bpe_tokenizer()
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=_TINY["width"], intermediate_size=_TINY["mlp"],
                            num_hidden_layers=_TINY["layers"], num_attention_heads=_TINY["heads"],
                            max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with _seeded(_TINY["seed"]):
        model = CLIPTextModel(config)
    return HFClipTextEncoder(spec, model, tokenizer)


def _tiny_open_clip(spec: str) -> TextEncoder:
    # heavy (open_clip): imported only when this model is built
    from open_clip.model import CLIPTextCfg, _build_text_tower
    from open_clip.tokenizer import SimpleTokenizer

    cfg = CLIPTextCfg(width=_TINY["width"], heads=_TINY["heads"], layers=_TINY["layers"],
                      mlp_ratio=_TINY["mlp"] / _TINY["width"])
    with _seeded(_TINY["seed"]):
        tower = _build_text_tower(embed_dim=_TINY["width"], text_cfg=cfg)
    return OpenClipTextEncoder(spec, tower, SimpleTokenizer(context_length=cfg.context_length))


def _open_clip(spec: str, arch: str, source: Optional[str]) -> TextEncoder:
    # heavy (open_clip): imported only when this model is built
    import open_clip

    if arch not in open_clip.list_models():
        raise ValueError(f"text encoder {spec!r}: {arch!r} is not an open_clip model")
    path = os.path.expanduser(source) if source else None
    if path and source.startswith(("/", "./", "../", "~")) and not os.path.exists(path):
        raise FileNotFoundError(f"text encoder {spec!r}: path {source!r} does not exist")
    try:
        model = open_clip.create_model(arch, pretrained=path, device="cpu")
    except RuntimeError as e:
        raise RuntimeError(f"text encoder {spec!r}: cannot load open_clip {arch} from {source!r}: {e}") from e
    if hasattr(model, "visual"):
        model.visual = None  # only the text tower is used
    return OpenClipTextEncoder(spec, model, open_clip.get_tokenizer(arch))


@contextlib.contextmanager
def _seeded(seed: int):
    """Run a block under torch.manual_seed(seed) without changing the caller's CPU RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
