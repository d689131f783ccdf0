"""Add the per-channel latent statistics to a dataset prepared before data_prep recorded them.

    python -m data_prep.latent_stats DATASET [--workers N]

Reads every sample's latent.npy (the float16 moments training reads), computes the exact per-channel mean and
unbiased std of the latents training draws (core.latents.LatentStats: the same sums data_prep keeps per shard)
and rewrites manifest.json with them as latent.channel_stats, atomically; nothing else in the dataset changes.
Training with data.latent_norm=channel needs them.
"""
import argparse
import functools
import json
import os
import sys
from multiprocessing import Pool

from core.latents import LatentStats
from core.shards import ShardFormatError, decode_value, index_shard, read_manifest, write_manifest


def shard_stats(root: str, name: str) -> tuple[dict | None, list]:
    """The LatentStats record of one shard's latent.npy members, read one by one, and the shard's members
    (index_shard), so the manifest's sample index needs no second reading of the tar headers."""
    path = os.path.join(root, name)
    stats, members = None, index_shard(path)
    with open(path, "rb") as f:
        for key, exts in members:
            if "latent.npy" not in exts:
                raise ShardFormatError(f"{path}: sample {key!r} has no latent.npy")
            offset, size = exts["latent.npy"]
            f.seek(offset)
            moments = decode_value("latent.npy", f.read(size))
            stats = stats or LatentStats(moments.shape[0] // 2)
            stats.add(moments)
    return (stats.to_record() if stats is not None else None), members


def dataset_stats(root: str, workers: int = 1) -> tuple[LatentStats, list]:
    """The statistics of the whole prepared dataset at `root`, its shards read by `workers` processes, and each
    shard's members."""
    names = [s["name"] for s in read_manifest(root)["shards"]]
    work = functools.partial(shard_stats, root)
    if workers > 1:
        with Pool(workers) as pool:
            results = pool.map(work, names)
    else:
        results = [work(n) for n in names]
    return LatentStats.combined([r for r, _ in results]), [m for _, m in results]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="a prepared dataset directory (data_prep/FORMATS.md)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="shard-reading processes")
    args = p.parse_args(argv)
    try:
        manifest = read_manifest(args.dataset)
        stats, members = dataset_stats(args.dataset, max(1, args.workers))
    except (ShardFormatError, OSError) as err:
        print(f"data_prep.latent_stats: {err}", file=sys.stderr)
        return 2
    if len(stats.sum) != manifest["latent"]["shape"][0]:
        print(f"data_prep.latent_stats: the shards hold latents of {len(stats.sum)} channels, the manifest says "
              f"{manifest['latent']['shape'][0]}", file=sys.stderr)
        return 2
    manifest["latent"]["channel_stats"] = stats.entry()
    write_manifest(args.dataset, manifest, members)
    print(f"{args.dataset}: per-channel statistics of {stats.count} values per channel written to manifest.json")
    print(json.dumps({k: [round(v, 4) for v in manifest['latent']['channel_stats'][k]] for k in ("mean", "std")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
