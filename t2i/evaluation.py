"""Conditions for generating from a text-to-image model: COCO val captions (FID) and prompts (t2i.sample).

    accelerate launch -m eval.generate --run runs/coco --cond-file /data/coco256/val --sampler sde --steps 250 \
        --cfg 2.0 --num-samples 30000 --out samples/coco_sde

Captions follow the U-ViT protocol the paper uses (App. K; U-ViT's eval_t2i_discrete.py draws its contexts from
the val set in a shuffled loader, one random caption per image): sample i is the i-th image of a seeded random
order of the val images, with one of its captions drawn at random, so 30K samples see 30K distinct images of the
40,504 of val2014. Past the last image a new epoch starts (a new order, new captions), as U-ViT's loader cycles.
Their CLIP token embeddings are the ones data_prep.coco stored in the val shards, so no text encoder runs at
generation time; the null condition is the empty caption's embedding stored beside them.
"""
import json
import os
from typing import Sequence

import numpy as np
import torch

from core.shards import ShardReader, decode_value, read_manifest
from t2i.data import load_null_context

CAPTION_SEED = 0  # fixed: every evaluation of every run sees the same captions


class CaptionConditioner:
    """core.task.Conditioner over a prepared val split (options["cond_file"]: its directory) for a model of
    record `meta`."""

    def __init__(self, meta: dict, options: dict):
        root = options.get("cond_file")
        if not root:
            raise ValueError("the t2i task needs --cond-file: the prepared val split of data_prep.coco "
                             "(its directory, holding fid_captions.json and the shards)")
        self.root, self.manifest = root, read_manifest(root)
        if self.manifest.get("kind") != "t2i" or "fid_captions" not in self.manifest:
            raise ValueError(f"--cond-file {root!r} is not a val split prepared by data_prep.coco --split val")
        trained_with = meta.get("data", {}).get("text_encoder")
        if trained_with and trained_with != self.manifest.get("text_encoder"):
            raise ValueError(f"the run was trained on {trained_with!r} caption embeddings but {root!r} holds "
                             f"{self.manifest.get('text_encoder')!r} ones")
        with open(os.path.join(root, self.manifest["fid_captions"])) as f:
            entries = json.load(f)
        self.reader = ShardReader(root)
        by_id = {int(key): i for i, key in enumerate(self.reader.keys()) if not key.endswith("_flip")}
        self.images = [(by_id[e["image_id"]], e["captions"]) for e in entries if e["image_id"] in by_id
                       and e["captions"]]
        if not self.images:
            raise ValueError(f"--cond-file {root!r}: no captioned images in its shards")
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # The first L tokens of a causal text encoder do not depend on the rest, so a val split stored with more
        # tokens than the run was trained on serves it exactly, cut to L.
        stored = self.manifest.get("text_embedding", {}).get("shape", [None])[0]
        self.tokens = meta.get("data", {}).get("text_embedding", {}).get("shape", [stored])[0]
        if stored is not None and self.tokens is not None and stored < self.tokens:
            raise ValueError(f"the run was trained on {self.tokens} caption tokens but {root!r} stores {stored}")
        self.null_context = load_null_context(root, self.manifest)[: self.tokens]
        self.num_available = None  # any number: epochs cycle, as U-ViT's loader

    protocol = "u-vit: seeded image order, one seeded caption per image, epochs cycle (seed 0)"

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(image order, caption index of each image in that order) of epoch e, a function of (CAPTION_SEED, e)."""
        if e not in self._epochs:
            rng = np.random.default_rng([CAPTION_SEED, e])
            order = rng.permutation(len(self.images))
            counts = np.array([len(self.images[j][1]) for j in order])
            self._epochs[e] = order, rng.integers(0, counts)
        return self._epochs[e]

    def pair(self, i: int) -> tuple[int, int, str]:
        """(sample index in the shards, caption index, caption) of generated sample i."""
        order, ks = self._epoch(i // len(self.images))
        pos = i % len(self.images)
        sample, captions = self.images[order[pos]]
        return sample, int(ks[pos]), captions[ks[pos]]

    def captions(self, indices: Sequence[int]) -> list[str]:
        return [self.pair(i)[2] for i in indices]

    def cond(self, indices: Sequence[int], device: torch.device) -> dict:
        rows = []
        for i in indices:
            sample, k, _ = self.pair(i)
            emb = decode_value("txt_emb.npy", self.reader[sample]["txt_emb.npy"])[k, : self.tokens]
            rows.append(emb.astype(np.float32))
        return {"context": torch.from_numpy(np.stack(rows)).to(device)}

    def null(self, cond: dict) -> dict:
        return {"context": self.null_context[None].to(cond["context"].device)}

    def labels(self, indices: Sequence[int]):
        return None


class PromptConditioner:
    """core.task.Conditioner of given caption embeddings: sample i is contexts[i] (N, L, D); the null condition is
    the empty caption's `null` (L, D)."""

    protocol = None

    def __init__(self, contexts: torch.Tensor, null: torch.Tensor):
        if contexts.dim() != 3 or null.shape != contexts.shape[1:]:
            raise ValueError(f"prompt embeddings {tuple(contexts.shape)} and the empty caption's {tuple(null.shape)} "
                             "must be (N, L, D) and (L, D)")
        self.contexts, self.null_context = contexts.float(), null.float()
        self.num_available = len(contexts)

    def cond(self, indices: Sequence[int], device: torch.device) -> dict:
        return {"context": self.contexts[list(indices)].to(device)}

    def null(self, cond: dict) -> dict:
        return {"context": self.null_context[None].to(cond["context"].device)}

    def labels(self, indices: Sequence[int]):
        return None
