"""Representation metrics of the REPA paper (Sec. 2, App. C.1): CKNNA alignment and a linear probe.

    python -m eval.representation --run runs/in256 --data /data/in256_val --encoder dinov2-b --layer 8 --t 0.5

Samples: a random subset of --num samples of the dataset (seeded by --seed; prepared ImageNet shards are sorted
by class, so the first N would hold a few classes only). Hidden states: the output of block `layer` (1-indexed)
of a class-conditional model on its training objective's noisy input at time t, globally average-pooled over
tokens: x_t = alpha_t x0 + sigma_t eps on the transport's path (linear: (1 - t) x0 + t eps) and model(x_t, t, y)
for SiT; for the ddpm objective (DiT) x_s = q_sample(x0, s) and model(x_s, s, y) with the step s = round(t T)
(capped at T - 1). Encoder features: the target encoder's patch tokens of the same images, pooled the same way.
CKNNA with k = 10 (the paper: 10,000 ImageNet val images). Linear probe: a stratified split (20% of each class
for validation), mini-batches of 256, 90 epochs.
"""
import argparse
import json
import math
import sys
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.diffusion import GaussianDiffusion, t_to_step
from core.encoders import load_encoder
from core.latents import LatentNorm
from core.shards import ShardReader, decode_value
from core.transport import Transport, build_objective
from eval.loading import load_eval_model, objective_config, resolve_weights

VAL_FRACTION = 0.2  # share of each class held out for the probe's validation accuracy
PROBE_BATCH = 256  # probe mini-batch: ~8K rows in one full batch are one Adam step per epoch, which underfits


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
                 epochs: int = 90, lr: float = 1e-3, batch_size: int = PROBE_BATCH, seed: int = 0) -> dict:
    """Accuracy of a linear classifier on frozen features (REPA App. C.1, after DAE): parameter-free batch norm
    (train statistics), Adam with cosine decay. x: (n, D) float, y: (n,) long. Returns {"train_acc", "val_acc"}."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    norm = lambda x: (x.float() - mean) / std  # noqa: E731
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    with torch.random.fork_rng(devices=[]):  # the head's init from `seed` too, the caller's RNG untouched
        torch.manual_seed(seed)
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


def subset_indices(n: int, num: int, seed: int = 0) -> list[int]:
    """min(num, n) distinct positions of range(n) drawn at random with `seed`, in increasing order (read locality)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[:num].tolist())


def stratified_split(labels: torch.Tensor, val_fraction: float = VAL_FRACTION,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) index tensors: round(val_fraction * n_c) random members of each class c go to val (a class of
    one sample stays in train), so both sides hold the same classes whatever the order of `labels` (n,)."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        n_val = min(int(val_fraction * len(members) + 0.5), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    train, val = torch.cat(train).sort().values, torch.cat(val).sort().values
    if len(val) == 0:
        raise ValueError(f"{len(labels)} samples of {len(torch.unique(labels))} classes leave no validation samples "
                         "for the linear probe: use more samples (--num)")
    return train, val


def probe_objective(meta: dict):
    """The objective whose noisy inputs a model of record `meta` was trained on: Transport (SiT, its path) or
    GaussianDiffusion (DiT's ddpm). Only class-conditional models (model(x, t, y)) are measured: ValueError else."""
    task = meta["model"]["task"]
    if task != "class_cond":
        raise ValueError(f"representation metrics need a class-conditional model, called as model(x, t, y) with the "
                         f"dataset's labels; {meta.get('source')!r} is a {task!r} model, which takes other "
                         "conditions (e.g. t2i: caption embeddings)")
    if meta["model"].get("kwargs", {}).get("reg_dim"):
        raise ValueError(f"{meta.get('source')!r} is a REG model: its hidden states depend on the noised encoder "
                         "class token it takes as token 0, which these metrics do not feed; they measure models "
                         "called as model(x, t, y)")
    return build_objective(objective_config(meta))


def noisy_input(objective, x0: torch.Tensor, t: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, the model's time input (B,)) for clean latents x0 (B, C, H, W) at t in [0, 1] (1 = noise), as the
    objective trains: Transport -> x_t = alpha_t x0 + sigma_t eps and t; GaussianDiffusion -> q_sample at the
    integer step s = round(t T) (capped at T - 1, the noisiest step), fed as s (long), as core.diffusion's loss."""
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    if isinstance(objective, GaussianDiffusion):
        step = min(int(t_to_step(torch.tensor(t), objective.num_timesteps)), objective.num_timesteps - 1)
        index = torch.full((len(x0),), step, dtype=torch.long, device=x0.device)
        return objective.q_sample(x0, index, eps), index
    times = torch.full((len(x0),), t, dtype=x0.dtype, device=x0.device)
    return objective.interpolate(x0, eps, times)[0], times


@torch.no_grad()
def pooled_hidden_states(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, layer: int, t: float,
                         generator: torch.Generator, objective=None) -> torch.Tensor:
    """(B, hidden) mean over tokens of block `layer`'s output (1-indexed) on the objective's noisy input at t
    (noisy_input; default: the linear transport, x_t = (1 - t) x0 + t eps)."""
    if not 1 <= layer <= len(model.blocks):
        raise ValueError(f"layer {layer} is outside the model's blocks 1..{len(model.blocks)}")
    x_t, time_input = noisy_input(objective or Transport("linear"), x0, t, generator)
    out = {}
    handle = model.blocks[layer - 1].register_forward_hook(lambda m, i, o: out.__setitem__("h", o))
    try:
        model(x_t, time_input, y)
    finally:
        handle.remove()
    return out["h"].float().mean(1)


def dataset_features(run: str, data: str, encoder_spec: str, layer: int, t: float, num: int, batch_size: int,
                     seed: int = 0, device="cpu") -> dict:
    """Pooled hidden states, pooled encoder features, labels and dataset positions ("index") of `num` samples of a
    prepared dataset drawn at random with `seed` (needs latent.npy, image.png and cls members; flipped copies left
    out). A model other than class-conditional is a ValueError (probe_objective)."""
    objective = probe_objective(resolve_weights(run)[1])  # refuse before building anything
    reader = ShardReader(data)
    complete = reader.has("latent.npy") & reader.has("image.png") & reader.has("cls")
    eligible = [i for i, key in enumerate(reader.keys()) if not key.endswith("_flip") and complete[i]]
    idx = [eligible[j] for j in subset_indices(len(eligible), num, seed)]
    if len(idx) < 2:
        raise ValueError(f"dataset {data!r} has {len(idx)} samples with latent.npy, image.png and cls; need >= 2")
    model, meta = load_eval_model(run, device)
    encoder = load_encoder(encoder_spec, int(reader.manifest["resolution"]), device)
    g = torch.Generator(device).manual_seed(seed)
    norm = LatentNorm.from_record(meta["latent"])
    hidden, feats, labels = [], [], []
    for b in range(0, len(idx), batch_size):
        raw = [reader[i] for i in idx[b:b + batch_size]]
        moments = torch.from_numpy(np.stack([decode_value("latent.npy", r["latent.npy"]) for r in raw])).float()
        x0 = norm.normalize(moments.chunk(2, dim=1)[0])  # posterior mean
        y = torch.tensor([int(r["cls"]) for r in raw], device=device)
        images = torch.from_numpy(np.stack([decode_value("image.png", r["image.png"]) for r in raw]))
        hidden.append(pooled_hidden_states(model, x0.to(device), y, layer, t, g, objective).cpu())
        feats.append(encoder(images.permute(0, 3, 1, 2).to(device)).mean(1).cpu())
        labels.append(y.cpu())
    return {"hidden": torch.cat(hidden), "encoder": torch.cat(feats), "labels": torch.cat(labels),
            "index": torch.tensor(idx)}


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="CKNNA and linear probe of a model's hidden states on a prepared dataset")
    p.add_argument("--run", required=True, help="run directory or exported .safetensors (class-conditional)")
    p.add_argument("--data", required=True, help="prepared dataset (latent.npy, image.png, cls members)")
    p.add_argument("--encoder", default="dinov2-b", help="encoder spec (core/encoders.py)")
    p.add_argument("--layer", type=int, default=8, help="block whose output is measured (1-indexed)")
    p.add_argument("--t", type=float, default=0.5,
                   help="noise level of the model's input in [0, 1] (t=1 noise; DiT: step round(t * 1000))")
    p.add_argument("--num", type=int, default=10000, help="samples, drawn at random from the dataset with --seed")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--probe-epochs", type=int, default=90)
    p.add_argument("--probe-batch-size", type=int, default=PROBE_BATCH, help="linear-probe mini-batch")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward when extracting features")
    p.add_argument("--seed", type=int, default=0, help="seeds the subset, the noise and the probe's split and init")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not 0.0 <= args.t <= 1.0:
        p.error(f"--t must be in [0, 1], got {args.t}")
    if min(args.num, args.probe_epochs, args.probe_batch_size, args.batch_size) < 1:
        p.error("--num, --probe-epochs, --probe-batch-size and --batch-size must be positive")
    try:
        f = dataset_features(args.run, args.data, args.encoder, args.layer, args.t, args.num, args.batch_size,
                             seed=args.seed)
        train, val = stratified_split(f["labels"], VAL_FRACTION, args.seed)
        h, y = f["hidden"], f["labels"]
        res = {"cknna": cknna(h, f["encoder"], args.k), "k": args.k, "layer": args.layer, "t": args.t,
               "encoder": args.encoder, "num": len(y), "num_train": len(train), "num_val": len(val),
               "seed": args.seed,
               **linear_probe(h[train], y[train], h[val], y[val], epochs=args.probe_epochs,
                              batch_size=args.probe_batch_size, seed=args.seed)}
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
