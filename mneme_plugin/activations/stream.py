"""Harvest on the fly into a shuffle buffer, for runs too big to store on disk."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch

from mneme_plugin.activations.config import HarvestConfig
from mneme_plugin.activations.corpus import CorpusSource, require_reiterable
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

    With ``dist`` (a data-parallel job) the stream is the one of one process, dealt out: forward
    batch i of the corpus is harvested by rank i mod W (the split of the sharded harvest), every
    rank receives every harvested row (an all-gather per round of W forward batches), keeps the same
    shuffle buffer and yields its share of each global batch (``batch_size / W`` rows, rank r the
    r-th slice). So W ranks train on one process's global batches, and a streamed run resumes on the
    same data with any number of ranks. The price: each rank holds the whole shuffle buffer and
    receives every row (float32, 8*d bytes a token). Rank 0 estimates the scale factors for all.
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
        # Read once for the normalisation estimate and once per pass of __iter__: never a one-shot iterator.
        require_reiterable(corpus, "a harvest stream reads it for the normalisation estimate and again on every pass")
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
        world = self.dist.world_size
        gen = torch.Generator().manual_seed(self.seed)
        dropped_ids = self.ctx.dropped_ids()
        buffer = torch.empty(0, 2, self.d_model)
        half = self.shuffle_buffer_rows // 2
        share = slice(self.dist.rank * self.batch_size // world, (self.dist.rank + 1) * self.batch_size // world)
        self.outliers_dropped = 0
        for rows in self._rows(stats, dropped_ids):
            buffer = torch.cat([buffer, rows])
            while buffer.shape[0] >= self.shuffle_buffer_rows:
                buffer = buffer[torch.randperm(buffer.shape[0], generator=gen)]
                n_out_rows = (half // self.batch_size) * self.batch_size
                out, buffer = buffer[:n_out_rows], buffer[n_out_rows:]
                yield from (batch[share] for batch in out.split(self.batch_size))
        buffer = buffer[torch.randperm(buffer.shape[0], generator=gen)]
        for start in range(0, buffer.shape[0] - self.batch_size + 1, self.batch_size):
            yield buffer[start : start + self.batch_size][share]

    def _rows(self, stats: NormalizationStats, dropped_ids: torch.Tensor) -> Iterator[torch.Tensor]:
        """The kept float32 rows of each forward batch, in corpus order. With W ranks, forward batches
        go round by round: rank r harvests batch i*W + r and every rank receives the round's rows."""
        rank, world = self.dist.rank, self.dist.world_size
        batches = self.ctx.windows(self.corpus)
        for first in itertools.count(0, world):
            round_ = list(itertools.islice(batches, world))
            if not round_:
                return
            mine, n_out = torch.empty(0, 2, self.d_model), 0
            with self.dist.together("while harvesting the stream"):  # before the round's all-gather
                if rank < len(round_):
                    rows = self.ctx.run_batch(round_[rank], first + rank, dropped_ids)
                    rows, n_out = filter_outliers(rows, stats, self.config.outlier_factor)
                    mine = rows.activations.float()
            if world == 1:
                self.outliers_dropped += n_out
                yield mine
                continue
            parts, n_out = self._all_gather_rows(mine, n_out)
            self.outliers_dropped += n_out
            yield from parts[: len(round_)]

    def _all_gather_rows(self, rows: torch.Tensor, n_out: int) -> tuple[list[torch.Tensor], int]:
        """Every rank's rows (ranks harvest different numbers), and the outliers dropped over ranks."""
        device = self.dist.comm_device
        counts = self.dist.all_gather(torch.tensor([rows.shape[0], n_out], device=device)).cpu()
        padded = torch.zeros(int(counts[:, 0].max()), 2, self.d_model, device=device)
        padded[: rows.shape[0]] = rows.to(device)
        gathered = self.dist.all_gather(padded).cpu()
        return [gathered[r, : int(counts[r, 0])] for r in range(self.dist.world_size)], int(counts[:, 1].sum())


def stream_length_problem(token_budget: int | None, steps: int, batch_size: int) -> str | None:
    """Why a streamed training of ``steps`` x ``batch_size`` rows cannot finish on ``token_budget`` tokens:
    a stream reads the corpus once (a store is read in epochs), at most one row per token, so it would
    stop hours in, with "The data stream ended". None when it fits or the budget is the whole corpus."""
    needed = steps * batch_size
    if token_budget is None or needed <= token_budget:
        return None
    last_step = token_budget // batch_size
    return (f"training: {steps:,} steps of batch_size {batch_size:,} need {needed:,} activation rows, but with "
            f"training.stream the corpus is read once, at most one row per token, and the harvest reads "
            f"{token_budget:,} tokens (harvest.max_tokens in whole windows): the training would stop at about step "
            f"{last_step:,}. Raise harvest.max_tokens (--max-tokens) to at least {needed:,} or lower training.steps "
            f"to at most {last_step:,}.")


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
