"""Representation metrics of the REPA paper (Sec. 2, App. C.1): CKNNA alignment and a linear probe.

    python -m eval.representation --run runs/in256 --data /data/in256_val --encoder dinov2-b --layer 8 --t 0.5

Hidden states: the output of block `layer` (1-indexed) of the model on x_t = (1 - t) x0 + t eps of the dataset's
latents, globally average-pooled over tokens. Encoder features: the target encoder's patch tokens of the same
images, pooled the same way. CKNNA with k = 10 (the paper: 10,000 ImageNet val images).
"""
import argparse
import json
import math
import sys
from typing import Optional

import core  # noqa: F401
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def cknna(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """CKNNA (Huh et al. 2024; REPA App. C.1, Eqs. 21-24) of features a (n, Da) and b (n, Db) of the same n inputs.

    Inner-product kernels K = a aᵀ, L = b bᵀ, centred per row (K_ij - mean_l K_il); Align(K, L) sums
    K̄_ij L̄_ij over pairs i != j where j is among the k nearest neighbours of i under both kernels;
    CKNNA = Align(K, L) / sqrt(Align(K, K) Align(L, L)). Rows are L2-normalised first. 1 for identical features.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"cknna needs (n, D) features of the same n, got {tuple(a.shape)} and {tuple(b.shape)}")
    n = a.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"cknna: k must be in [1, n-1] = [1, {n - 1}], got {k}")
    a, b = F.normalize(a.double(), dim=1), F.normalize(b.double(), dim=1)
    K, L = a @ a.T, b @ b.T
    mask_k, mask_l = _knn_mask(K, k), _knn_mask(L, k)
    Kc, Lc = K - K.mean(1, keepdim=True), L - L.mean(1, keepdim=True)

    def align(X, Y, mask):
        return (mask * X * Y).sum()

    denom = torch.sqrt(align(Kc, Kc, mask_k) * align(Lc, Lc, mask_l))
    return float(align(Kc, Lc, mask_k * mask_l) / denom)


def _knn_mask(K: torch.Tensor, k: int) -> torch.Tensor:
    """(n, n) 0/1: j among the k most similar (largest kernel value) of row i, i itself excluded."""
    K = K.clone().fill_diagonal_(float("-inf"))
    return torch.zeros_like(K).scatter_(1, K.topk(k, dim=1).indices, 1.0)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 epochs: int = 90, lr: float = 1e-3, batch_size: int = 16384, seed: int = 0) -> dict:
    """Accuracy of a linear classifier on frozen features (REPA App. C.1, after DAE): parameter-free batch norm
    (train statistics), Adam with cosine decay. x: (n, D) float, y: (n,) long. Returns {"train_acc", "val_acc"}."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    norm = lambda x: (x.float() - mean) / std  # noqa: E731
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    head = nn.Linear(train_x.shape[1], num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    xs = norm(train_x)
    for _ in range(epochs):
        perm = torch.randperm(len(xs), generator=g)
        for i in range(0, len(xs), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(head(xs[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        acc = lambda x, y: float((head(norm(x)).argmax(1) == y).float().mean())  # noqa: E731
        return {"train_acc": acc(train_x, train_y), "val_acc": acc(val_x, val_y)}


@torch.no_grad()
def pooled_hidden_states(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, layer: int, t: float,
                         generator: torch.Generator) -> torch.Tensor:
    """(B, hidden) mean over tokens of block `layer`'s output (1-indexed) on x_t = (1 - t) x0 + t eps."""
    if not 1 <= layer <= len(model.blocks):
        raise ValueError(f"layer {layer} is outside the model's blocks 1..{len(model.blocks)}")
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    x_t = (1 - t) * x0 + t * eps
    out = {}
    handle = model.blocks[layer - 1].register_forward_hook(lambda m, i, o: out.__setitem__("h", o))
    try:
        model(x_t, torch.full((len(x0),), t, device=x0.device), y)
    finally:
        handle.remove()
    return out["h"].float().mean(1)


def dataset_features(run: str, data: str, encoder_spec: str, layer: int, t: float, num: int, batch_size: int,
                     seed: int = 0, device="cpu") -> dict:
    """Pooled hidden states, pooled encoder features and labels of the first `num` samples of a prepared dataset
    (needs latent.npy, image.png and cls members; flipped copies left out)."""
    from core.encoders import load_encoder
    from core.shards import ShardReader, decode_value
    from eval.loading import load_eval_model

    model, meta = load_eval_model(run, device)
    reader = ShardReader(data)
    idx = [i for i, (_, key, exts) in enumerate(reader.entries)
           if not key.endswith("_flip") and {"latent.npy", "image.png", "cls"} <= set(exts)][:num]
    if len(idx) < 2:
        raise ValueError(f"dataset {data!r} has {len(idx)} samples with latent.npy, image.png and cls; need >= 2")
    encoder = load_encoder(encoder_spec, int(reader.manifest["resolution"]), device)
    g = torch.Generator(device).manual_seed(seed)
    lat = meta["latent"]
    hidden, feats, labels = [], [], []
    for b in range(0, len(idx), batch_size):
        raw = [reader[i] for i in idx[b:b + batch_size]]
        moments = torch.from_numpy(np.stack([decode_value("latent.npy", r["latent.npy"]) for r in raw])).float()
        x0 = moments.chunk(2, dim=1)[0] * lat["scale_factor"] + lat.get("shift", 0.0)  # posterior mean
        y = torch.tensor([int(r["cls"]) for r in raw], device=device)
        images = torch.from_numpy(np.stack([decode_value("image.png", r["image.png"]) for r in raw]))
        hidden.append(pooled_hidden_states(model, x0.to(device), y, layer, t, g).cpu())
        feats.append(encoder(images.permute(0, 3, 1, 2).to(device)).mean(1).cpu())
        labels.append(y.cpu())
    return {"hidden": torch.cat(hidden), "encoder": torch.cat(feats), "labels": torch.cat(labels)}


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="CKNNA and linear probe of a model's hidden states on a prepared dataset")
    p.add_argument("--run", required=True, help="run directory or exported .safetensors")
    p.add_argument("--data", required=True, help="prepared dataset (latent.npy, image.png, cls members)")
    p.add_argument("--encoder", default="dinov2-b", help="encoder spec (core/encoders.py)")
    p.add_argument("--layer", type=int, default=8, help="block whose output is measured (1-indexed)")
    p.add_argument("--t", type=float, default=0.5, help="noise level of the model's input (t=1 noise)")
    p.add_argument("--num", type=int, default=10000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--probe-epochs", type=int, default=90)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    try:
        f = dataset_features(args.run, args.data, args.encoder, args.layer, args.t, args.num, args.batch_size)
        n_train = int(0.8 * len(f["labels"]))
        res = {"cknna": cknna(f["hidden"], f["encoder"], args.k), "k": args.k, "layer": args.layer, "t": args.t,
               "encoder": args.encoder, "num": len(f["labels"]),
               **linear_probe(f["hidden"][:n_train], f["labels"][:n_train], f["hidden"][n_train:],
                              f["labels"][n_train:], epochs=args.probe_epochs)}
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
