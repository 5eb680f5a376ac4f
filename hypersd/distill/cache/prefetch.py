"""Batches drawn ahead by DataLoader workers, with draws that stay a function of the generator.

The loop asks for each step's batch with a generator seeded afresh for that step, and the
seeds of consecutive steps differ by a constant. When two consecutive draws of one size come
from fresh generators, workers start drawing the batches of the seeds that follow, each from
its own fresh generator. A batch drawn ahead is used only when the generator asked with is
fresh from exactly that seed, and the generator is then left in the state the worker's ended
in; any other draw is made on the spot. So a batch, and every draw after it from the same
generator, is the same whether or not it was drawn ahead: runs and resumes stay exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from hypersd.distill.cache.examples import CachedExamples, to_device
from hypersd.distill.data import Batch


class _Draws(Dataset):
    """Item (seed, n): the batch a fresh generator of ``seed`` draws, and its state after."""

    def __init__(self, examples: CachedExamples):
        self.examples = examples

    def __getitem__(self, item: tuple[int, int]):
        g = torch.Generator().manual_seed(item[0])
        return self.examples.draw(item[1], g), g.get_state()


class _Seeds:
    """The seeds the coming draws should have: start, start + stride, ..."""

    def __init__(self, start: int, stride: int, n: int):
        self.start, self.stride, self.n = start, stride, n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seed = self.start
        while True:
            yield seed, self.n
            seed += self.stride


@dataclass
class _Ahead:
    batches: Iterator                    # the DataLoader's iterator
    seed: int                            # the seed its next batch was drawn with
    stride: int
    n: int


class Prefetched:
    """``examples`` with batches drawn ahead by ``workers`` processes, ``depth`` each."""

    def __init__(self, examples: CachedExamples, workers: int, depth: int = 2):
        self.examples, self.workers, self.depth = examples, workers, depth
        self.has_images = examples.has_images
        self.hits = self.misses = 0
        self._last: tuple[int, int] | None = None
        self._ahead: _Ahead | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def sample(self, n: int, g: torch.Generator) -> Batch:
        seed = g.initial_seed()
        fresh = torch.equal(g.get_state(), torch.Generator().manual_seed(seed).get_state())
        ahead = self._ahead
        if fresh and ahead is not None and (ahead.seed, ahead.n) == (seed, n):
            batch, state = next(ahead.batches)
            ahead.seed += ahead.stride
            g.set_state(state)
            self.hits += 1
            return to_device(batch, self.examples.device)
        self.misses += 1
        batch = self.examples.sample(n, g)
        if fresh:
            self._plan(seed, n)
        return batch

    def _plan(self, seed: int, n: int) -> None:
        """After two fresh draws of one size, draw ahead along their stride."""
        last, self._last = self._last, (seed, n)
        if last is None or last[1] != n or seed <= last[0]:
            return
        stride = seed - last[0]
        self.close()
        loader = DataLoader(_Draws(self.examples), batch_size=None, sampler=_Seeds(seed + stride, stride, n),
                            num_workers=self.workers, prefetch_factor=self.depth, collate_fn=_as_is)
        self._ahead = _Ahead(iter(loader), seed + stride, stride, n)

    def close(self) -> None:
        """Stop the workers (they also stop with the process)."""
        if self._ahead is not None:
            shutdown = getattr(self._ahead.batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._ahead = None


def _as_is(item):
    return item
