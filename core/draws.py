"""The random draws of a training step, independent of how its global batch is split over ranks and micro-batches.

Each draw of a step (the latent's posterior noise, CFG dropout, t, the noise, REG's token noise) is made for the
whole global batch from one generator seeded by (run.seed, step), in the same order on every rank, and a
micro-batch keeps its own rows of it. Sample i of step s thus gets the same draws on 1 rank or 256, with or without
gradient accumulation: a run resumed on another number of ranks continues the trajectory it would have had, the
order of float reductions aside. The cost is one global-batch-sized draw per micro-batch, a few MB at most.

A plain torch.Generator stands for all the rows of one batch (`as_draws`), so samplers and tests pass one directly.
"""
import numpy as np
import torch


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of every draw of optimiser step `step`: a pure function of (seed, step)."""
    s = int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(s)


class RowDraws:
    """Draws for rows [start, start + n) of a batch of `total` rows from `generator`: each draw is made with
    `total` rows and sliced, n being the leading size asked for. total=None: the batch is all the rows asked for."""

    def __init__(self, generator: torch.Generator, start: int = 0, total: int | None = None):
        if start < 0 or (total is not None and start >= total):
            raise ValueError(f"rows from {start} are outside a batch of {total}")
        self.generator, self.start, self.total = generator, start, total

    def _rows(self, draw, shape, **kw) -> torch.Tensor:
        n = shape[0]
        if self.total is None:
            return draw(tuple(shape), generator=self.generator, **kw)
        if self.start + n > self.total:
            raise ValueError(f"rows {self.start}..{self.start + n - 1} are outside a batch of {self.total}")
        return draw((self.total, *shape[1:]), generator=self.generator, **kw)[self.start:self.start + n]

    def randn(self, shape, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._rows(torch.randn, shape, device=device, dtype=dtype)

    def rand(self, shape, device: torch.device) -> torch.Tensor:
        return self._rows(torch.rand, shape, device=device)

    def randint(self, high: int, shape, device: torch.device) -> torch.Tensor:
        return self._rows(lambda size, **kw: torch.randint(0, high, size, **kw), shape, device=device)


def as_draws(source: "RowDraws | torch.Generator") -> RowDraws:
    """`source` itself, or a plain generator as the draws of a whole batch (exactly its own torch draws)."""
    return source if isinstance(source, RowDraws) else RowDraws(source)
