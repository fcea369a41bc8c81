"""Gradient reduction of data-parallel training: our explicit all-reduce against PyTorch's DDP.

Both variants run the same step (``BatchTopKCrossCoderTrainer.update``) on the same rank slices;
they differ only in how the gradients are averaged:

* ``ddp``: what training uses, ``DistributedBatchTopKCrossCoderTrainer``: PyTorch's
  ``DistributedDataParallel`` around the step (bucketed all-reduces overlapped with backward);
* ``explicit``: one coalesced all-reduce of every gradient after backward (the alternative).

Rounds alternate the variants (the machine's load drifts); the median ms/step of each is printed,
with a 1-process run of one rank's slice (compute only, no communication) as the reference, and
the largest weight difference between the two variants after the run (they must agree).

    python benchmarks/bench_allreduce.py                 # relaunches itself: torchrun, 2 gloo ranks on CPU
    python benchmarks/bench_allreduce.py --nproc 4 --d 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from mneme_plugin.crosscoder.distributed import DistributedBatchTopKCrossCoderTrainer
from mneme_plugin.crosscoder.trainer import BatchTopKCrossCoderTrainer


_ARGS = "MNEME_BENCH_ALLREDUCE_ARGS"
class ExplicitAllReduceTrainer(DistributedBatchTopKCrossCoderTrainer):
    """The same step without DDP: one coalesced all-reduce of every gradient after backward."""

    def _forward(self, x):
        return BatchTopKCrossCoderTrainer._forward(self, x)

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        params = list(self.ae.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.dist.all_sum(torch.cat([g.reshape(-1) for g in grads])).div_(self.dist.world_size)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(p)
            offset += g.numel()


def make(kind: str, args) -> BatchTopKCrossCoderTrainer:
    cls = {"explicit": ExplicitAllReduceTrainer, "ddp": DistributedBatchTopKCrossCoderTrainer,
           "local": BatchTopKCrossCoderTrainer}[kind]
    return cls(steps=10_000, activation_dim=args.d, dict_size=args.expansion * args.d, k=args.k, device="cpu",
               seed=0, warmup_steps=0)


def timed(trainer: BatchTopKCrossCoderTrainer, batches: list[torch.Tensor], first_step: int) -> float:
    start = time.perf_counter()
    for i, x in enumerate(batches):
        trainer.update(first_step + i, x)
    return (time.perf_counter() - start) / len(batches) * 1e3


def worker(args) -> None:
    trainers = {kind: make(kind, args) for kind in ("explicit", "ddp")}
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local = args.batch // world
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(args.batch, 2, args.d, generator=gen)[rank * local : (rank + 1) * local]
               for _ in range(args.steps)]
    for trainer in trainers.values():
        trainer.update(0, batches[0])  # warm-up, decoder-bias initialisation
    times: dict[str, list[float]] = {kind: [] for kind in trainers}
    step = 1
    for _ in range(args.rounds):
        for kind, trainer in trainers.items():
            times[kind].append(timed(trainer, batches, step))
        step += len(batches)
    diff = max(float((a - b).detach().abs().max()) for a, b in
               zip(trainers["explicit"].ae.parameters(), trainers["ddp"].ae.parameters()))
    if rank == 0:
        print(f"== d={args.d}, m={args.expansion * args.d}, k={args.k}, global batch {args.batch} "
              f"({local} rows per rank), {world} gloo ranks on CPU ({torch.get_num_threads()} threads each), "
              f"{args.rounds} rounds x {args.steps} steps; load before: {os.getloadavg()[0]:.2f}")
        for kind, label in (("explicit", "explicit all-reduce"), ("ddp", "DDP")):
            print(f"{label:>24}: {statistics.median(times[kind]):8.1f} ms/step (median of rounds: "
                  f"{', '.join(f'{t:.0f}' for t in times[kind])})")
        print(f"{'DDP / explicit':>24}: {statistics.median(times['ddp']) / statistics.median(times['explicit']):.2f}x")
        print(f"{'max weight difference':>24}: {diff:.2e}")


def reference(args) -> None:
    """One process, one rank's slice: the compute without communication."""
    trainer = make("local", args)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(args.batch // args.nproc, 2, args.d, generator=gen) for _ in range(args.steps)]
    trainer.update(0, batches[0])
    times = [timed(trainer, batches, 1 + r * args.steps) for r in range(args.rounds)]
    print(f"{'1 process, one slice':>24}: {statistics.median(times):8.1f} ms/step (compute only, "
          f"{torch.get_num_threads()} threads)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--expansion", type=int, default=32)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024, help="global batch")
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--rounds", type=int, default=4)
    if "WORLD_SIZE" in os.environ:  # a rank: the options come through the environment (torchrun
        worker(parser.parse_args(os.environ[_ARGS].split()))  # would take --d for one of its own)
        return
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", _ARGS: " ".join(sys.argv[1:])}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                    __file__], check=True, env=env)
    torch.set_num_threads(1)
    reference(args)


if __name__ == "__main__":
    main()
