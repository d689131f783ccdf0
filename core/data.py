"""Deterministic, resumable data loading: the sample order is a pure function of (seed, step), whatever the ranks.

Position p of the global stream is sample perm_e[p mod n] with e = p // n and perm_e a seeded permutation, so
global step s reads positions [s * global_batch, (s + 1) * global_batch), rank r its contiguous share. Resuming at
step s needs nothing but s. Corrupt samples are replaced by the next readable index and counted; errors of the
environment (an OSError with an errno: open-file limit, missing shard, disk) stop the run instead.
"""
import logging
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from core.shards import ShardFormatError, decode_value

log = logging.getLogger(__name__)

# Errors that mean "this sample is unreadable" (truncated PNG, bad .npy, missing member), not a bug in our code.
# PIL reports undecodable images as OSError; an OSError carrying an errno, though, comes from a system call
# (too many open files, a vanished shard, a failing disk): the environment's problem, raised, never skipped.
SAMPLE_ERRORS = (ValueError, KeyError, OSError, EOFError, IndexError)


def is_sample_error(err: BaseException) -> bool:
    """Whether `err` means that one sample is corrupt (skip it), not that reading cannot work (stop the run)."""
    return isinstance(err, SAMPLE_ERRORS) and not (isinstance(err, OSError) and err.errno is not None)


class StepSampler(Sampler[tuple[int, int]]):
    """Infinite stream of (sample index, stream position) for one rank, from global step `start_step` on.

    The position is unique per draw, so a dataset can derive per-draw randomness from it (e.g. which caption of an
    image to use) that differs across epochs and replays exactly on resume.
    """

    def __init__(self, num_samples: int, global_batch: int, world_size: int, rank: int, seed: int, start_step: int = 0):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        self.n, self.global_batch, self.rank, self.seed = num_samples, global_batch, rank, seed
        self.per_rank = global_batch // world_size
        self.start_step = start_step
        self._epoch, self._perm = -1, None

    def index_at(self, position: int) -> int:
        epoch = position // self.n
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return int(self._perm[position % self.n])

    def __iter__(self):
        step = self.start_step
        while True:
            base = step * self.global_batch + self.rank * self.per_rank
            for j in range(self.per_rank):
                yield self.index_at(base + j), base + j
            step += 1


class SkippingDataset(Dataset):
    """Wraps a random-access `source` and a `decode(raw, position) -> dict` function; items are (index, position)
    pairs from StepSampler. An unreadable sample (is_sample_error) is replaced by the next index (deterministically)
    and the sample carries `skipped` = how many were passed over; any other error, e.g. too many open files,
    propagates."""

    def __init__(self, source, decode: Callable[[dict, int], dict], max_consecutive: int = 64):
        self.source, self.decode, self.max_consecutive = source, decode, max_consecutive

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, position = item
        n = len(self.source)
        for k in range(min(self.max_consecutive, n)):
            j = (index + k) % n
            try:
                sample = self.decode(self.source[j], position)
            except SAMPLE_ERRORS as err:
                if not is_sample_error(err):
                    raise
                log.warning("skipping corrupt sample %d: %s: %s", j, type(err).__name__, err)
                continue
            sample["skipped"] = k
            return sample
        raise RuntimeError(f"{self.max_consecutive} consecutive samples from index {index} could not be read")


def decode_training_sample(raw: dict, members: tuple[str, ...], need_image: bool,
                           feature_keys: tuple[str, ...]) -> dict:
    """The members every task reads from a shard sample (FORMATS.md), after checking that the task's own
    `members` are there too: {"moments": (2C, h, w), ["image": uint8 (3, H, W)], ["feats": tuple of (N, D)]}, the
    floats in their stored dtype (float16 as data_prep writes them: half the bytes to collate, pin and copy; the
    step converts them to float32 on the device, exactly). Raises ShardFormatError naming a missing member."""
    wanted = ("latent.npy", *members) + (("image.png",) if need_image else ()) + feature_keys
    missing = [k for k in wanted if k not in raw]
    if missing:
        raise ShardFormatError(f"sample {raw.get('__key__')!r} has no {missing[0]!r} member")
    out = {"moments": torch.from_numpy(decode_value("latent.npy", raw["latent.npy"]))}
    if need_image:
        out["image"] = torch.from_numpy(decode_value("image.png", raw["image.png"]).copy()).permute(2, 0, 1)
    if feature_keys:
        out["feats"] = tuple(torch.from_numpy(decode_value(k, raw[k])) for k in feature_keys)
    return out


def collate(samples: list[dict]) -> dict:
    batch = default_collate(samples)
    batch["skipped"] = int(batch["skipped"].sum())
    return batch


def make_loader(dataset: Dataset, sampler: StepSampler, micro_batch: int, num_workers: int,
                pin_memory: bool = False) -> DataLoader:
    """Data loader over `sampler`'s infinite stream in micro-batches."""
    return DataLoader(
        dataset, batch_size=micro_batch, sampler=sampler, num_workers=num_workers, collate_fn=collate,
        pin_memory=pin_memory, persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
    )
