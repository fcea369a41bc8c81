"""Latent scaling for every latent in one pass vs a per-latent loop (the published approach).

Run: OMP_NUM_THREADS=1 python benchmarks/bench_scaling.py [--tokens 262144] [--small-tokens 65536]

A random crosscoder (m=8192, d=256, threshold set so ~k latents fire per token) and synthetic
paired activations generated batch by batch (never held whole).

* ours: ``attribute()`` over the stream: encoding + float64 accumulation of F^T X, F^T X_hat,
  sum f^2, betas for every latent, classification. Timed end to end, in a fresh subprocess.
* reference: a first pass encodes every token and keeps codes (sparse, per latent), normalised
  activations and reconstructions in memory; then, for each latent, its beta for the four targets
  from its dense f column, with the error target built explicitly (N, d) per latent, as the
  published code does. The loop is timed on a subset of latents and extrapolated linearly to all
  m (the output says so); the first pass is timed in full.
* memory: peak resident set size (``resource.getrusage(...).ru_maxrss``, Linux KiB) of a fresh
  subprocess running ``attribute`` on two token counts, and its increase over the RSS measured
  just before the pass (after imports and building the crosscoder). tracemalloc does not see
  torch's CPU tensors, hence RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mneme_plugin.attribution import AttributionConfig, attribute  # noqa: E402
from mneme_plugin.crosscoder import BatchTopKCrossCoder, CrossCoderConfig  # noqa: E402

BATCH = 4096
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def build_crosscoder(m: int, d: int, k: int) -> BatchTopKCrossCoder:
    torch.manual_seed(0)
    cc = BatchTopKCrossCoder(CrossCoderConfig(activation_dim=d, dict_size=m, k=k))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        cc.W_dec.mul_(0.5 + torch.rand(2, m, 1, generator=gen))  # unequal norms per model
        cc.b_dec.copy_(0.1 * torch.randn(2, d, generator=gen))
        x = next(iter(stream(BATCH, d, seed=123)))
        sal = cc.pre_activations(cc.normalize(x)) * cc.salience_weights()
        cc.threshold.copy_(sal.flatten().kthvalue(sal.numel() - k * BATCH).values)
    return cc


def stream(n_tokens: int, d: int, seed: int = 0):
    """Synthetic (B, 2, d) batches, generated on the fly: memory does not grow with n_tokens."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) / d**0.5
    for start in range(0, n_tokens, BATCH):
        b = min(BATCH, n_tokens - start)
        base = torch.randn(b, d, generator=gen)
        edited = base @ mix + 0.5 * torch.randn(b, d, generator=gen)
        yield torch.stack([base, edited], dim=1)


def rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> None:
    cc = build_crosscoder(args.m, args.d, args.k)
    before = rss_kib()
    t0 = time.perf_counter()
    result = attribute(cc, stream(args.tokens, args.d), AttributionConfig(batch_size=BATCH, device="cpu"), progress=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    table = result.table
    if args.save:
        table[["latent", "beta_r_base", "beta_r_edited", "beta_e_base", "beta_e_edited", "fire_count"]].to_parquet(args.save)
    print(json.dumps({"seconds": seconds, "peak_kib": peak, "before_kib": before,
                      "fired": int((table["fire_count"] > 0).sum()), "counts": result.counts}))


def run_child(args: argparse.Namespace, tokens: int, save: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--tokens", str(tokens), "--m", str(args.m), "--d", str(args.d), "--k", str(args.k)]
    if save:
        cmd += ["--save", save]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


@torch.no_grad()
def reference(args: argparse.Namespace, latents: list[int]) -> tuple[float, float, dict[int, list[float]]]:
    cc = build_crosscoder(args.m, args.d, args.k)
    W, b = cc.W_dec.detach(), cc.b_dec.detach()
    t0 = time.perf_counter()
    xs, xhats, rows, cols, vals = [], [], [], [], []
    offset = 0
    for x in stream(args.tokens, args.d):
        f = cc.encode(x)
        xn = cc.normalize(x)
        xs.append(xn)
        xhats.append(torch.einsum("bm,lmd->bld", f, W) + b)
        r, c = f.nonzero(as_tuple=True)
        rows.append(r + offset); cols.append(c); vals.append(f[r, c])
        offset += x.shape[0]
    X, XH = torch.cat(xs), torch.cat(xhats)
    F = torch.sparse_coo_tensor(torch.stack([torch.cat(cols), torch.cat(rows)]), torch.cat(vals), (args.m, offset), check_invariants=False).coalesce()
    F = F.to_sparse_csr()  # row j = f column of latent j
    first_pass = time.perf_counter() - t0

    betas: dict[int, list[float]] = {}
    t0 = time.perf_counter()
    for j in latents:
        fj = F[j].to_dense()  # (N,) the stored f column
        dj = W[1, j]
        denom = dj.dot(dj) * fj.dot(fj)
        out = []
        for model in (0, 1):  # reconstruction targets
            out.append(dj.dot(fj @ XH[:, model]) / denom)
        for model in (0, 1):  # error targets, built explicitly per latent
            err = X[:, model] - XH[:, model] + fj[:, None] * W[model, j]
            out.append(dj.dot(fj @ err) / denom)
        betas[j] = [float(v) for v in out]
    per_latent = (time.perf_counter() - t0) / len(latents)
    return first_pass, per_latent, betas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=262_144)
    parser.add_argument("--small-tokens", type=int, default=65_536)
    parser.add_argument("--m", type=int, default=8192)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--ref-latents", type=int, default=24)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import pandas as pd
    import tempfile

    print(f"m={args.m}, d={args.d}, k={args.k}, batch {BATCH}, torch threads {torch.get_num_threads()}, CPU")
    with tempfile.TemporaryDirectory() as tmp:
        saved = str(Path(tmp) / "ours.parquet")
        big = run_child(args, args.tokens, save=saved)
        small = run_child(args, args.small_tokens)
        ours = pd.read_parquet(saved)
    print(f"ours: all {args.m} latents, {args.tokens:,} tokens, one pass: {big['seconds']:.1f} s "
          f"({big['fired']} latents fired)")

    fired = ours.index[ours["fire_count"] > 0].to_numpy()
    step = max(1, len(fired) // args.ref_latents)
    latents = [int(j) for j in fired[::step][: args.ref_latents]]
    first_pass, per_latent, ref_betas = reference(args, latents)
    cols = ["beta_r_base", "beta_r_edited", "beta_e_base", "beta_e_edited"]
    diff = max(abs(ours.loc[j, c] - v) / max(1.0, abs(v)) for j, vals in ref_betas.items() for c, v in zip(cols, vals))
    ref_total = first_pass + per_latent * args.m
    print(f"reference: encode + keep pass {first_pass:.1f} s; per-latent loop {per_latent:.3f} s/latent, timed on "
          f"{len(latents)} latents and extrapolated linearly to {args.m}: {per_latent * args.m:.0f} s; "
          f"total {ref_total:.0f} s")
    print(f"speed-up (reference total / ours): {ref_total / big['seconds']:.1f}x   "
          f"(max relative beta difference on the subset: {diff:.1e}; reference runs in float32)")
    for name, r, n in (("small", small, args.small_tokens), ("large", big, args.tokens)):
        print(f"peak RSS ours, {n:>9,} tokens: {r['peak_kib'] / 1024:7.1f} MiB "
              f"(+{(r['peak_kib'] - r['before_kib']) / 1024:.1f} MiB over the RSS before the pass)")
    print(f"tokens x{args.tokens / args.small_tokens:.0f} -> peak RSS x{big['peak_kib'] / small['peak_kib']:.2f} "
          f"(memory accounting: ru_maxrss of a fresh subprocess per run)")
    print(f"reference keeps X and X_hat: {2 * args.tokens * 2 * args.d * 4 / 2**20:.0f} MiB at {args.tokens:,} tokens, "
          "growing linearly with tokens")


if __name__ == "__main__":
    main()
