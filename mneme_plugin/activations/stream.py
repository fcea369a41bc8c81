"""Harvest on the fly into a shuffle buffer, for runs too big to store on disk."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from mneme_plugin.activations.config import HarvestConfig
from mneme_plugin.activations.corpus import CorpusSource
from mneme_plugin.activations.harvest import HarvestContext, filter_outliers
from mneme_plugin.activations.normalization import NormalizationStats
from mneme_plugin.distributed import SINGLE_PROCESS, DistributedContext
from mneme_plugin.errors import ConfigError


class HarvestStream:
    """Iterable of shuffled (B, 2, d) float32 batches harvested on the fly.

    Rows go into a buffer of ``shuffle_buffer_rows``; whenever it is full it is permuted (seeded)
    and its first half is emitted as batches, the rest stays to mix with newer rows. One pass over
    the corpus per iteration; the final partial batch is dropped. Deterministic given ``seed``.
    ``scale_factors`` are estimated from the first ``normalization_tokens`` tokens before the
    first batch is yielded (on first access).

    With ``dist`` (a data-parallel job) each rank reads a disjoint part of the stream: forward
    batch i of the corpus is harvested by rank i mod W (the split of the sharded harvest), into the
    rank's own shuffle buffer (seeded by seed and rank), and batches have ``batch_size / W`` rows,
    this rank's share of each global batch. Rank 0 estimates the scale factors for all ranks. The
    global batches are then not the ones one process would draw (each rank shuffles its own share);
    a streamed run resumes with the same data only with the same number of ranks.
    """

    def __init__(
        self,
        base: Any,
        edited: Any,
        corpus: CorpusSource,
        config: HarvestConfig,
        batch_size: int,
        shuffle_buffer_rows: int = 65_536,
        seed: int = 0,
        dist: DistributedContext = SINGLE_PROCESS,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        if batch_size % dist.world_size:
            raise ConfigError(f"batch_size={batch_size} is the global batch; it must be a multiple of the "
                              f"number of ranks ({dist.world_size}).")
        if shuffle_buffer_rows < 2 * batch_size:
            raise ConfigError(
                f"shuffle_buffer_rows ({shuffle_buffer_rows}) must be at least 2 x batch_size ({batch_size})."
            )
        self.ctx = HarvestContext.build(base, edited, config)
        self.corpus = corpus
        self.config = config
        self.batch_size = batch_size
        self.shuffle_buffer_rows = shuffle_buffer_rows
        self.seed = seed
        self.dist = dist
        self._stats: NormalizationStats | None = None
        self.outliers_dropped = 0

    @property
    def d_model(self) -> int:
        return self.ctx.d_model

    @property
    def stats(self) -> NormalizationStats:
        if self._stats is None:
            stats = self.ctx.estimate_normalization(self.corpus) if self.dist.is_main else None
            self._stats = self.dist.broadcast_object(stats)
        return self._stats

    @property
    def scale_factors(self) -> torch.Tensor:
        """Per-model factors (2,) [base, edited] that make E||x|| = sqrt(d_model)."""
        return torch.tensor(self.stats.scale_factors, dtype=torch.float32)

    def __iter__(self) -> Iterator[torch.Tensor]:
        stats = self.stats
        rank, world = self.dist.rank, self.dist.world_size
        gen = torch.Generator().manual_seed(self.seed + 7919 * rank)
        dropped_ids = self.ctx.dropped_ids()
        buffer = torch.empty(0, 2, self.d_model)
        half = self.shuffle_buffer_rows // 2
        batch_size = self.batch_size // world
        self.outliers_dropped = 0
        for i, windows in enumerate(self.ctx.windows(self.corpus)):
            if i % world != rank:
                continue
            rows = self.ctx.run_batch(windows, i, dropped_ids)
            rows, n_out = filter_outliers(rows, stats, self.config.outlier_factor)
            self.outliers_dropped += n_out
            buffer = torch.cat([buffer, rows.activations.float()])
            while buffer.shape[0] >= self.shuffle_buffer_rows:
                buffer = buffer[torch.randperm(buffer.shape[0], generator=gen)]
                n_out_rows = (half // batch_size) * batch_size
                out, buffer = buffer[:n_out_rows], buffer[n_out_rows:]
                yield from out.split(batch_size)
        buffer = buffer[torch.randperm(buffer.shape[0], generator=gen)]
        for start in range(0, buffer.shape[0] - batch_size + 1, batch_size):
            yield buffer[start : start + batch_size]


def harvest_stream(
    base: Any,
    edited: Any,
    corpus: CorpusSource,
    config: HarvestConfig,
    batch_size: int,
    shuffle_buffer_rows: int = 65_536,
    seed: int = 0,
    dist: DistributedContext = SINGLE_PROCESS,
) -> HarvestStream:
    """Shuffled (B, 2, d) batches harvested on the fly (this rank's share under ``dist``); see
    :class:`HarvestStream`."""
    return HarvestStream(base, edited, corpus, config, batch_size, shuffle_buffer_rows, seed, dist)
