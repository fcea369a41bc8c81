"""Crosscoder training throughput: our sparse BatchTopK step against a dense reference.

Prints tokens/s and peak memory of one optimisation step (forward, backward, Adam) for
``BatchTopKCrossCoderTrainer.update`` and for a straightforward dense implementation of the same
step (decoder over all m latents, dense backward through the masked codes), run in the same
process on the same data, interleaved step by step, and their ratio. Peak memory is measured in a
fresh child process per variant: on CPU the peak RSS above the resident size before a
steady-state step (Linux VmHWM), on GPU ``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_train.py            # CPU: d=256, m=8192, k=32, batch 1024
    python benchmarks/bench_train.py --gpu      # the paper's sizes (below), bf16 autocast on CUDA, TF32 on
    python benchmarks/bench_train.py --gpu --device cpu --small   # the same --gpu path, reduced, on CPU
    python benchmarks/bench_train.py --fork /tmp/sof   # also the published (science-of-finetuning) trainer

``--fork DIR`` (a checkout of science-of-finetuning/dictionary_learning) times the fork's
``BatchTopKCrossCoderTrainer.update`` beside ours at the CPU size, in one child process (ours on the
installed dictionary_learning, the fork on its own package), on the same batch, the two variants
interleaved step by step. With ``--gpu`` it runs at the paper's sizes on the GPU: ours in fp32 (TF32
matmuls, like the fork) and under bf16 autocast, then the fork in fp32, one after the other.

The --gpu path runs d=3584 and d=4096 (m=32*d, k=100, batch 4096) the way training runs on a GPU
(``training.autocast: auto``: fp32 weights and Adam, the step under bf16 autocast; the dense
reference under the same autocast) and prints, besides tokens/s and the dense reference, the share
of the device's dense-matmul peak that our step reaches: the step's dense FLOPs (the encoder
matmul, 2*B*2d*m) per second over the FLOP/s of a bf16 matmul of that very shape, (B x 2d) @
(2d x m), timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from mneme_plugin.crosscoder.trainer import BatchTopKCrossCoderTrainer


class DenseReference:
    """The textbook step: dense codes, dense decoder matmul, autograd through everything."""

    def __init__(self, d: int, m: int, k: int, device: str, dtype: torch.dtype, lr: float = 1e-4,
                 autocast: bool = False) -> None:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(2, m, d, generator=gen)
        w = w / w.norm(dim=-1, keepdim=True) * 0.1
        self.W_dec = w.to(device, dtype).detach().requires_grad_()
        self.W_enc = w.permute(0, 2, 1).contiguous().to(device, dtype).detach().requires_grad_()
        self.b_enc = torch.zeros(m, device=device, dtype=dtype, requires_grad=True)
        self.b_dec = torch.zeros(2, d, device=device, dtype=dtype, requires_grad=True)
        self.k, self.m = k, m
        self.device_type, self.autocast = torch.device(device).type, autocast
        params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        self.optimizer = torch.optim.Adam(params, lr=lr, fused=True)

    def update(self, step: int, x: torch.Tensor) -> float:
        batch = x.shape[0]
        with torch.autocast(self.device_type, torch.bfloat16, enabled=self.autocast):
            pre = torch.relu(x.reshape(batch, -1) @ self.W_enc.reshape(-1, self.m) + self.b_enc)
            with torch.no_grad():
                salience = pre * self.W_dec.pow(2).sum(dim=(0, 2))
                mask = torch.zeros_like(salience).reshape(-1)
                mask[salience.reshape(-1).topk(self.k * batch, sorted=False).indices] = 1
            f = pre * mask.reshape(pre.shape)
            x_hat = torch.einsum("bm,lmd->bld", f, self.W_dec) + self.b_dec
            loss = (x - x_hat).float().pow(2).sum(dim=(1, 2)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([self.W_enc, self.b_enc, self.W_dec, self.b_dec], 1.0)
        self.optimizer.step()
        return loss.item()


def build(kind: str, d: int, m: int, k: int, device: str, dtype: torch.dtype, autocast: bool = False):
    """A variant's model; ``autocast``: fp32 weights, step under bf16 autocast (the GPU training path)."""
    if autocast:
        dtype = torch.float32
    if kind == "dense":
        return DenseReference(d, m, k, device, dtype, autocast=autocast)
    dtype_name = str(dtype).replace("torch.", "")
    trainer = BatchTopKCrossCoderTrainer(
        steps=10_000, activation_dim=d, dict_size=m, k=k, device=device, seed=0, warmup_steps=0,
        autocast="bfloat16" if autocast else "off",
    )
    if dtype_name != "float32":
        trainer.ae.to(dtype)
        trainer.optimizer = torch.optim.Adam(trainer.ae.parameters(), lr=1e-4, fused=True)
    return trainer


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(model, x: torch.Tensor, steps: int, device: str) -> float:
    model.update(0, x)  # warm-up (and our trainer's decoder-bias initialisation)
    synchronize(device)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        model.update(step, x)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def time_interleaved(models: dict, x: torch.Tensor, steps: int, device: str) -> dict[str, list[float]]:
    """Seconds of each step of each model, the models taking turns step by step (each after a
    warm-up step), so that a change of load on a shared machine falls on all of them alike."""
    for model in models.values():
        model.update(0, x)  # warm-up (and our trainer's decoder-bias initialisation)
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(1, steps + 1):
        for name, model in models.items():
            synchronize(device)
            start = time.perf_counter()
            model.update(step, x)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def child_peak_memory(kind: str, d: int, m: int, k: int, batch: int, device: str, dtype: str) -> float:
    """Peak memory (MiB) of a few steps of one variant in a fresh process."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(d), str(m), str(k), str(batch), device, dtype],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def run_child(kind: str, d: int, m: int, k: int, batch: int, device: str, dtype_name: str) -> None:
    dtype = getattr(torch, dtype_name)
    x = torch.randn(batch, 2, d, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    model = build(kind, d, m, k, device, dtype)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        for step in range(3):
            model.update(step, x)
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        model.update(0, x)  # first step allocates the optimizer state: count only steady-state steps
        before = _proc_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak RSS (Linux)
            f.write("5")
        for step in range(1, 4):
            model.update(step, x)
        peak = (_proc_status_kib("VmHWM") - before) / 1024
    print(json.dumps({"peak_mib": peak}))


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def bench(d: int, m: int, k: int, batch: int, device: str, dtype_name: str, steps: int) -> None:
    """Ours and the dense reference interleaved step by step (``time_interleaved``); the ratio is of
    the total times, with the range of the per-step ratios beside it."""
    dtype = getattr(torch, dtype_name)
    x = torch.randn(batch, 2, d, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    print(f"\n== d={d}, m={m}, k={k}, batch={batch}, {dtype_name} on {device} "
          f"({torch.get_num_threads()} threads), {steps} interleaved steps each")
    times = time_interleaved({kind: build(kind, d, m, k, device, dtype) for kind in ("sparse", "dense")},
                             x, steps, device)
    for kind, label in (("sparse", "ours (sparse BatchTopK)"), ("dense", "dense reference")):
        seconds = sum(times[kind]) / steps
        peak = child_peak_memory(kind, d, m, k, batch, device, dtype_name)
        print(f"{label:>24}: {seconds * 1e3:8.1f} ms/step  {batch / seconds:10.0f} tokens/s  "
              f"peak {'step memory ' if device == 'cpu' else ''}{peak:8.1f} MiB")
    per_step = sorted(dense / ours for ours, dense in zip(times["sparse"], times["dense"]))
    print(f"{'speed-up':>24}: {sum(times['dense']) / sum(times['sparse']):.2f}x (dense time / ours; "
          f"per step {per_step[0]:.2f}x to {per_step[-1]:.2f}x)")


def bench_fork(d: int, m: int, k: int, batch: int, steps: int, fork: str, device: str = "cpu") -> None:
    out = subprocess.run([sys.executable, __file__, "--fork-child", fork, "--steps", str(steps),
                          "--fork-size", str(d), str(m), str(k), str(batch), device],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"The fork's trainer failed to run from {fork}:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    order = "interleaved" if device == "cpu" else "one after the other"
    print(f"\n== side by side with the published trainer (science-of-finetuning fork at {fork}), d={d}, m={m}, "
          f"k={k}, batch={batch}, on {result['device']}, {steps} steps each ({order})")
    labels = {"ours": "ours", "ours_bf16": "ours (bf16 autocast)", "fork": "fork BatchTopKCrossCoderTrainer"}
    for name, label in labels.items():
        if name in result:
            seconds = result[name]
            print(f"{label:>32}: {seconds * 1e3:8.1f} ms/step  {batch / seconds:10.0f} tokens/s")
    print(f"{'speed-up':>32}: {result['fork'] / result['ours']:.2f}x (fork time / ours, both fp32"
          f"{' with TF32 matmuls' if device != 'cpu' else ''})")
    if "ours_bf16" in result:
        print(f"{'':>32}  {result['fork'] / result['ours_bf16']:.2f}x (fork time / ours under bf16 autocast, "
              f"our default on GPUs; the fork has no autocast)")


def run_fork_child(fork: str, d: int, m: int, k: int, batch: int, steps: int, device: str = "cpu") -> None:
    """Both trainers in this process; prints seconds per step. Ours is built first on the installed
    dictionary_learning, then that package is dropped from ``sys.modules`` so the fork's own package
    (same name) imports from ``fork``: each trainer runs on its own code. On CPU the two are timed
    interleaved step by step; on a GPU one after the other, since two paper-size models need not fit."""
    if device != "cpu":  # as the --gpu path: TF32 matmuls for both fp32 trainers
        torch.backends.cuda.matmul.allow_tf32 = True
    x = torch.randn(batch, 2, d, generator=torch.Generator().manual_seed(1)).to(device)
    ours = {"ours": build("sparse", d, m, k, device, torch.float32)}
    totals = {}
    if device != "cpu":
        totals["ours"] = time_steps(ours.pop("ours"), x, steps, device)
        totals["ours_bf16"] = time_steps(build("sparse", d, m, k, device, torch.float32, autocast=True),
                                         x.bfloat16(), steps, device)
        torch.cuda.empty_cache()
    for name in [n for n in sys.modules if n == "dictionary_learning" or n.startswith("dictionary_learning.")]:
        del sys.modules[name]
    sys.path.insert(0, fork)
    from dictionary_learning.trainers.crosscoder import BatchTopKCrossCoderTrainer as Fork

    fork_trainer = Fork(steps=10_000, activation_dim=d, dict_size=m, k=k, layer=0, lm_name="bench", lr=1e-4,
                        warmup_steps=0, seed=0, device=device)
    if device != "cpu":
        totals["fork"] = time_steps(fork_trainer, x, steps, device)
    else:
        times = time_interleaved({**ours, "fork": fork_trainer}, x, steps, device)
        totals = {name: sum(seconds) / steps for name, seconds in times.items()}
    print(json.dumps({"device": _device_name(device), **totals}))


def matmul_peak_flops(device: str, dtype: torch.dtype, rows: int, inner: int, cols: int, repeats: int = 10) -> float:
    """FLOP/s of a (rows x inner) @ (inner x cols) matmul on ``device`` (the dense-matmul peak, measured here)."""
    a = torch.randn(rows, inner, device=device).to(dtype)
    b = torch.randn(inner, cols, device=device).to(dtype)
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * rows * inner * cols * repeats / (time.perf_counter() - start)


def bench_peak_share(d: int, m: int, k: int, batch: int, device: str, steps: int) -> None:
    """Tokens/s under bf16 autocast, dense reference and the share of the measured dense-matmul peak."""
    peak = matmul_peak_flops(device, torch.bfloat16, batch, 2 * d, m)
    # Activations as a store holds them (bf16); weights fp32, the step under bf16 autocast.
    x = torch.randn(batch, 2, d, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
    print(f"\n== d={d}, m={m}, k={k}, batch={batch}, bf16 autocast on {_device_name(device)}, {steps} timed steps; "
          f"bf16 matmul ({batch}x{2 * d}) @ ({2 * d}x{m}) measured at {peak / 1e9:.1f} GFLOP/s")
    seconds, memory = {}, {}
    cuda = device.startswith("cuda")
    for kind in ("sparse", "dense"):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        model = build(kind, d, m, k, device, torch.float32, autocast=True)
        seconds[kind] = time_steps(model, x, steps, device)
        # Weights, gradients, Adam state and the step's activations (the batch x included).
        memory[kind] = f"  peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
        del model
        if cuda:
            torch.cuda.empty_cache()
    encoder_flops = 2 * batch * 2 * d * m
    share = encoder_flops / seconds["sparse"] / peak
    print(f"{'ours (sparse BatchTopK)':>24}: {seconds['sparse'] * 1e3:8.1f} ms/step  {batch / seconds['sparse']:10.0f} "
          f"tokens/s  {share:.1%} of the dense-matmul peak (encoder FLOPs){memory['sparse']}")
    print(f"{'dense reference':>24}: {seconds['dense'] * 1e3:8.1f} ms/step  {batch / seconds['dense']:10.0f} "
          f"tokens/s{memory['dense']}")
    print(f"{'speed-up':>24}: {seconds['dense'] / seconds['sparse']:.2f}x (dense time / ours)")


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--gpu", action="store_true", help="Run the paper's sizes in bf16 (TF32 on).")
    parser.add_argument("--device", default="cuda", help="Device of the --gpu path (cpu for a dry run).")
    parser.add_argument("--small", action="store_true", help="Reduced --gpu sizes (d=64, 128), for a dry run.")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="The --gpu path's activation sizes d (default 3584 4096; m=32*d).")
    parser.add_argument("--fork", help="Folder of a science-of-finetuning/dictionary_learning checkout: also time its trainer.")
    parser.add_argument("--fork-child", help=argparse.SUPPRESS)
    parser.add_argument("--fork-size", nargs=5, default=["256", "8192", "32", "1024", "cpu"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}.")
    if getattr(args, "fork", None) and not Path(args.fork, "dictionary_learning").is_dir():
        parser.error(f"--fork {args.fork} holds no dictionary_learning package (give the folder of the fork's "
                     "snapshot, with dictionary_learning/ inside).")
    if args.fork_child:
        d, m, k, batch = map(int, args.fork_size[:4])
        run_fork_child(args.fork_child, d, m, k, batch, args.steps, args.fork_size[4])
        return
    if args.child:
        kind, d, m, k, batch, device, dtype = args.child
        run_child(kind, int(d), int(m), int(k), int(batch), device, dtype)
        return
    if args.gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("--gpu needs CUDA; use --device cpu --small for a dry run of this path.")
        sizes = (64, 128) if args.small else tuple(args.sizes or (3584, 4096))
        batch, k = (256, 8) if args.small else (4096, 100)
        for d in sizes:
            bench_peak_share(d, 32 * d, k, batch, args.device, args.steps)
            if args.fork:
                bench_fork(d, 32 * d, k, batch, args.steps, args.fork, args.device)
        return
    bench(256, 8192, 32, 1024, "cpu", "float32", args.steps)
    if args.fork:
        bench_fork(256, 8192, 32, 1024, args.steps, args.fork)
    if torch.cuda.is_available():
        bench(256, 8192, 32, 1024, "cuda", "float32", args.steps * 5)
    else:
        print("\n(no GPU here: the paper-size bf16 figures need --gpu on a CUDA machine)")


if __name__ == "__main__":
    main()
