"""Planted-feature recovery of the crosscoder trainer, beside the science-of-finetuning trainer.

Trains on paired activations built from known directions (``mneme_plugin/crosscoder/planted.py``) at
k = 1x, 2x and 4x the planted data's true L0, and prints one row per (set, trainer, k):

- rec: recovered share (best latent cosine > 0.9 with the concatenated (base, edited) direction, in
  normalised space), then per planted kind (sh shared, am amplified, su suppressed, bo base-only,
  eo edited-only);
- leak bo/eo: norm of the absent side over the present side of the best latents of base-only /
  edited-only features (0 = kept on one side);
- EV b/e: explained variance per model and dead: share of latents that never fire, on 8,192
  held-out rows with the inference encoding (``crosscoder.metrics.evaluate_crosscoder``);
- side: how many planted features of each kind ``attribute`` (mneme_plugin.attribution) classifies on
  their side through their best latent (suppressed -> suppressed/base_only, base-only ->
  base_only/suppressed, amplified -> amplified/edited_only, edited-only -> edited_only/amplified,
  shared -> shared).

    python benchmarks/bench_quality.py                       # ours, defaults, both planted sets
    python benchmarks/bench_quality.py --salience paper      # the MNEME paper's squared-norm weight
    python benchmarks/bench_quality.py --loss norm           # the fork's training loss
    python benchmarks/bench_quality.py --fork /tmp/sof       # also the fork's BatchTopKCrossCoderTrainer,
        # from `git --git-dir=<mirror of science-of-finetuning/dictionary_learning> archive HEAD dictionary_learning | tar x -C /tmp/sof`
        # (trained in a child process: its package is named like the dictionary_learning we depend on;
        # its weights are read back with mneme_plugin.formats and measured like ours)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mneme_plugin.crosscoder.planted import KINDS, PlantedData, PlantedSpec, attribution_sides, leak, recovery  # noqa: E402

SETS = {
    "simple": PlantedSpec(),
    "amplified": PlantedSpec(
        counts={"shared": 60, "amplified": 20, "suppressed": 20, "base_only": 20, "edited_only": 20},
        p_active=0.015, model_scales=(1.0, 3.0),
    ),
}
K_MULTIPLES = (1, 2, 4)
DICT_SIZE, BATCH, STEPS, EVAL_ROWS = 256, 512, 1500, 8192
FORK_LR, FORK_WARMUP = 1e-3, 50  # the fork has no run-scaled schedule: the settings of issue 12's comparison
SHORT = {"shared": "sh", "amplified": "am", "suppressed": "su", "base_only": "bo", "edited_only": "eo"}


def k_grid(spec: PlantedSpec) -> list[int]:
    """k at 1x, 2x and 4x the true L0, rounded (at least 1)."""
    return [max(1, round(mult * spec.true_l0)) for mult in K_MULTIPLES]


def train_ours(data: PlantedData, k: int, salience: str, loss: str, seed: int):
    from mneme_plugin.crosscoder.trainer import BatchTopKCrossCoderTrainer

    trainer = BatchTopKCrossCoderTrainer(steps=STEPS, activation_dim=data.spec.d, dict_size=DICT_SIZE, k=k,
                                         batch_size=BATCH, salience=salience, loss=loss, seed=seed, device="cpu",
                                         activation_scale=data.scale_factors().tolist())
    batches = data.batches(BATCH, seed=1)
    for step in range(STEPS):
        trainer.update(step, next(batches))
    return trainer.ae.eval()


def train_fork(set_name: str, k: int, salience: str, seed: int, fork: str, out_dir: str) -> None:
    """In a child process: train the fork's trainer on pre-scaled batches, save what its format reader reads."""
    sys.path.insert(0, fork)
    from dictionary_learning.trainers.crosscoder import BatchTopKCrossCoderTrainer as Fork

    data = PlantedData(SETS[set_name])
    scale = data.scale_factors()
    kw = {} if salience == "crosscoder" else {"dict_class_kwargs": {"code_normalization": salience.upper()}}
    trainer = Fork(steps=STEPS, activation_dim=data.spec.d, dict_size=DICT_SIZE, k=k, layer=0, lm_name="planted",
                   lr=FORK_LR, warmup_steps=FORK_WARMUP, seed=seed, device="cpu", **kw)
    batches = data.batches(BATCH, seed=1)
    for step in range(STEPS):
        trainer.update(step, next(batches) * scale[None, :, None])
    torch.save(trainer.ae.state_dict(), Path(out_dir) / "model_final.pt")
    (Path(out_dir) / "config.json").write_text(json.dumps({"trainer": trainer.config}, default=str))


def measure(crosscoder, data: PlantedData, input_scale: torch.Tensor) -> dict:
    """Quality figures of a crosscoder that reads ``x * input_scale`` (ours: raw x, scale 1)."""
    from mneme_plugin.attribution import attribute
    from mneme_plugin.crosscoder.metrics import evaluate_crosscoder

    scale = data.scale_factors()
    W_dec = crosscoder.W_dec.detach()
    found = recovery(W_dec, data, scale)
    x = data.sample(EVAL_ROWS, torch.Generator().manual_seed(999)) * input_scale[None, :, None]
    metrics = evaluate_crosscoder(crosscoder, x.split(BATCH))
    table = attribute(crosscoder, x, {"device": "cpu"}, progress=False).table
    return {
        "recovered": round(found["recovered"], 3),
        "by_kind": {kind: round(v, 2) for kind, v in found["by_kind"].items()},
        "leak": {kind: round(v, 3) for kind, v in leak(W_dec, data, found["best"]).items()},
        "ev": [round(metrics.explained_variance_base, 3), round(metrics.explained_variance_edited, 3)],
        "dead": round(metrics.dead_fraction, 3),
        "on_side": attribution_sides(table["latent_class"].tolist(), data, found["best"]),
    }


def run(set_name: str, impl: str, k: int, args: argparse.Namespace) -> dict:
    data = PlantedData(SETS[set_name])
    if impl == "ours":
        crosscoder = train_ours(data, k, args.salience, args.loss, args.seed)
        figures = measure(crosscoder, data, torch.ones(2))
    else:
        from mneme_plugin.formats import load_crosscoder

        salience = args.salience if args.salience != "paper" else "crosscoder"  # the fork has no squared weight
        with tempfile.TemporaryDirectory() as out_dir:
            subprocess.run([sys.executable, __file__, "--child", set_name, "--k", str(k), "--fork", args.fork,
                            "--salience", salience, "--seed", str(args.seed), "--out", out_dir],
                           check=True, capture_output=True, text=True)
            crosscoder = load_crosscoder(out_dir)
        figures = measure(crosscoder, data, data.scale_factors())
    return {"set": set_name, "impl": impl, "k": k, "salience": args.salience, "loss": args.loss, **figures}


def row(r: dict) -> str:
    kinds = [kind for kind in KINDS if kind in r["by_kind"]]
    by_kind = " ".join(f"{SHORT[kind]} {r['by_kind'][kind]:.2f}" for kind in kinds)
    sides = " ".join(f"{SHORT[kind]} {r['on_side'][kind][0]}/{r['on_side'][kind][1]}" for kind in kinds)
    return (f"{r['set']:<9} {r['impl']:<4} {r['k']:>2}  rec {r['recovered']:.2f} ({by_kind})  "
            f"leak {r['leak']['base_only']:.3f}/{r['leak']['edited_only']:.3f}  "
            f"EV {r['ev'][0]:.3f}/{r['ev'][1]:.3f}  dead {r['dead']:.2f}  side {sides}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--salience", default="crosscoder")
    parser.add_argument("--loss", default="squared", help="ours: training loss (squared / norm)")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--k", default=None, help="comma-separated k values (default: 1x, 2x, 4x true L0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fork", default=None, help="folder holding the fork's dictionary_learning package")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of the table")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        train_fork(args.child, int(args.k), args.salience, args.seed, args.fork, args.out)
        return
    impls = ["ours"] + (["fork"] if args.fork else [])
    print(f"salience {args.salience}, loss {args.loss}, seed {args.seed}; m={DICT_SIZE}, batch {BATCH}, "
          f"{STEPS} steps; fork: lr {FORK_LR}, warmup {FORK_WARMUP}", flush=True)
    for set_name in args.sets.split(","):
        spec = SETS[set_name]
        ks = [int(k) for k in args.k.split(",")] if args.k else k_grid(spec)
        if not args.json:
            print(f"-- {set_name}: {spec.n_features} features, true L0 {spec.true_l0:.2f}, k {ks}", flush=True)
        for k in ks:
            for impl in impls:
                result = run(set_name, impl, k, args)
                print(json.dumps(result) if args.json else row(result), flush=True)


if __name__ == "__main__":
    main()
