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

``--seeds`` varies the training seed (the crosscoder's initialisation); the planted directions
(``--data-seed``), the training stream and the held-out rows stay fixed. ``--oracle`` adds three rows
per (set, k) that show what a crosscoder can reach on that data:

- ``codes``: the true codes and directions, the batch's k * B largest contributions kept (the
  BatchTopK budget): only the planted noise and the budget are lost;
- ``lin``: the same support and directions, each feature's amplitude read by the best linear
  function of the input (least squares of its true code over training rows where it fires): what a
  linear encoder that selects the right latents could read;
- ``enc``: a crosscoder whose decoder is fixed at the true directions (one latent per planted
  feature) and whose encoder, biases and threshold are trained with our defaults (deterministic:
  one run): the EV our training reaches with every direction given (a learned decoder can do a
  little better by spending its spare latents on mixtures of features). Between ``enc`` and ``lin``
  lies what the encoder's training leaves on the table at this many steps.

    python benchmarks/bench_quality.py                       # ours, defaults, both planted sets
    python benchmarks/bench_quality.py --salience paper      # the MNEME paper's squared-norm weight
    python benchmarks/bench_quality.py --loss squared        # the paper's Eq. 1 (default: the fork's norm loss)
    python benchmarks/bench_quality.py --salience paper --decoder-init-norm 2   # decoder rows start at norm 2
    python benchmarks/bench_quality.py --width 2             # d=64, twice the features, m=512, the same true L0
    python benchmarks/bench_quality.py --salience crosscoder,paper --seeds 0 1 2 3 4   # per-seed rows, then mean ± sd
    python benchmarks/bench_quality.py --oracle              # also the oracle rows above
    python benchmarks/bench_quality.py --device cuda         # ours trained on a GPU (bf16 autocast)
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
from dataclasses import replace
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
ORACLES = ("codes", "lin", "enc")  # the --oracle rows (docstring)
SHORT = {"shared": "sh", "amplified": "am", "suppressed": "su", "base_only": "bo", "edited_only": "eo"}


def k_grid(spec: PlantedSpec) -> list[int]:
    """k at 1x, 2x and 4x the true L0, rounded (at least 1)."""
    return [max(1, round(mult * spec.true_l0)) for mult in K_MULTIPLES]


def train_ours(data: PlantedData, k: int, salience: str, loss: str, seed: int, dict_size: int = DICT_SIZE,
               decoder: torch.Tensor | None = None, device: str = "cpu", decoder_init_norm: float = 1.0):
    """Our trainer with its defaults (on CUDA: bf16 autocast); ``decoder`` (2, m, d) in normalised space:
    fixed, only the rest trains. Returns the crosscoder on the CPU, where it is measured."""
    from mneme_plugin.crosscoder.trainer import BatchTopKCrossCoderTrainer

    trainer = BatchTopKCrossCoderTrainer(steps=STEPS, activation_dim=data.spec.d, dict_size=dict_size, k=k,
                                         batch_size=BATCH, salience=salience, loss=loss, seed=seed, device=device,
                                         activation_scale=data.scale_factors().tolist(),
                                         decoder_init_norm=decoder_init_norm)
    if decoder is not None:
        with torch.no_grad():
            trainer.ae.W_dec.copy_(decoder.to(device))
            trainer.ae.W_enc.copy_((decoder.permute(0, 2, 1) / decoder.pow(2).sum(dim=(0, 2))).to(device))
        trainer.ae.W_dec.requires_grad_(False)  # Adam skips a parameter without a gradient
    batches = data.batches(BATCH, seed=1)
    for step in range(STEPS):
        trainer.update(step, next(batches).to(device))
    return trainer.ae.eval().cpu()


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> list[float]:
    """Per model, as ``evaluate_crosscoder`` computes it (the same in raw and normalised units)."""
    x, x_hat = x.double(), x_hat.double()
    total = (x - x.mean(dim=0)).pow(2).sum(dim=(0, 2))
    return (1 - (x - x_hat).pow(2).sum(dim=(0, 2)) / total).tolist()


def oracle_codes(data: PlantedData, k: int) -> dict:
    """EV of the true codes and directions with BatchTopK's budget: the k * B largest contributions
    (code times the normalised direction's norm summed over models, the ``crosscoder`` salience) per batch."""
    scale = data.scale_factors()
    x, codes = data.sample_with_codes(EVAL_ROWS, torch.Generator().manual_seed(999))
    directions = data.scaled_directions()
    weight = (directions * scale[None, :, None]).norm(dim=-1).sum(dim=1)  # (n,)
    kept = codes * budget_mask(codes, weight, k)
    x_hat = torch.einsum("bn,nld->bld", kept, directions)
    return {"ev": [round(v, 3) for v in explained_variance(x, x_hat)]}


def budget_mask(codes: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """The true codes' support under BatchTopK's budget: per batch, the k * B largest code x ``weight``."""
    kept = torch.zeros_like(codes, dtype=torch.bool)
    for rows in torch.arange(len(codes)).split(BATCH):
        salience = (codes[rows] * weight).reshape(-1)
        mask = torch.zeros_like(salience, dtype=torch.bool)
        mask[salience.topk(k * len(rows)).indices] = True
        kept[rows] = mask.reshape(len(rows), -1) & (codes[rows] > 0)
    return kept


def oracle_linear(data: PlantedData, k: int, fit_rows: int = 200_000) -> dict:
    """EV of the true support (``oracle_codes``' mask) and directions with each feature's amplitude read by
    the best linear function of the normalised input: per feature, least squares of its true code on
    (x, 1) over ``fit_rows`` training rows where it fires. What a linear encoder that selected the right
    latents could read; ``enc`` below it is the training's shortfall, not the architecture's."""
    scale = data.scale_factors()
    directions = data.scaled_directions() * scale[None, :, None]  # normalised space
    weight = directions.norm(dim=-1).sum(dim=1)

    def inputs(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([(x * scale[None, :, None]).flatten(1), torch.ones(len(x), 1)], dim=1).double()

    x_fit, codes_fit = data.sample_with_codes(fit_rows, torch.Generator().manual_seed(1234))
    design = inputs(x_fit)
    readers = torch.zeros(design.shape[1], codes_fit.shape[1], dtype=torch.float64)
    for j in range(codes_fit.shape[1]):
        fires = codes_fit[:, j] > 0
        readers[:, j] = torch.linalg.lstsq(design[fires], codes_fit[fires, j, None].double()).solution[:, 0]
    x, codes = data.sample_with_codes(EVAL_ROWS, torch.Generator().manual_seed(999))
    read = budget_mask(codes, weight, k) * (inputs(x) @ readers).float()
    x_hat = torch.einsum("bn,nld->bld", read, directions)
    return {"ev": [round(v, 3) for v in explained_variance(x * scale[None, :, None], x_hat)]}


def oracle_encoder(data: PlantedData, k: int, salience: str, loss: str, seed: int, device: str = "cpu") -> dict:
    """Figures of a crosscoder whose decoder is the true directions, the rest trained by our defaults."""
    from mneme_plugin.crosscoder.metrics import evaluate_crosscoder

    scale = data.scale_factors()
    decoder = (data.scaled_directions() * scale[None, :, None]).permute(1, 0, 2).contiguous()  # (2, n, d)
    crosscoder = train_ours(data, k, salience, loss, seed, dict_size=data.spec.n_features, decoder=decoder,
                            device=device)
    x = data.sample(EVAL_ROWS, torch.Generator().manual_seed(999))
    metrics = evaluate_crosscoder(crosscoder, x.split(BATCH))
    return {"ev": [round(metrics.explained_variance_base, 3), round(metrics.explained_variance_edited, 3)],
            "dead": round(metrics.dead_fraction, 3)}


def train_fork(set_name: str, k: int, salience: str, seed: int, fork: str, out_dir: str, data_seed: int = 0,
               width: int = 1) -> None:
    """In a child process: train the fork's trainer on pre-scaled batches, save what its format reader reads."""
    sys.path.insert(0, fork)
    from dictionary_learning.trainers.crosscoder import BatchTopKCrossCoderTrainer as Fork

    data = planted(set_name, data_seed, width)
    scale = data.scale_factors()
    kw = {} if salience == "crosscoder" else {"dict_class_kwargs": {"code_normalization": salience.upper()}}
    trainer = Fork(steps=STEPS, activation_dim=data.spec.d, dict_size=width_dict_size(width), k=k, layer=0,
                   lm_name="planted", lr=FORK_LR, warmup_steps=FORK_WARMUP, seed=seed, device="cpu", **kw)
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


def planted_spec(set_name: str, data_seed: int, width: int = 1) -> PlantedSpec:
    """A planted set's spec; ``width`` scales its dimension and feature counts (and ``width_dict_size`` the
    dictionary) and divides the activation probability, so the true L0 stays the same."""
    spec = replace(SETS[set_name], seed=data_seed)
    if width == 1:
        return spec
    return replace(spec, d=spec.d * width, counts={kind: n * width for kind, n in spec.counts.items()},
                   p_active=spec.p_active / width)


def planted(set_name: str, data_seed: int, width: int = 1) -> PlantedData:
    return PlantedData(planted_spec(set_name, data_seed, width))


def width_dict_size(width: int) -> int:
    """The dictionary of a set ``width`` times as wide."""
    return DICT_SIZE * width


def run(set_name: str, impl: str, salience: str, k: int, seed: int, args: argparse.Namespace) -> dict:
    data = planted(set_name, args.data_seed, args.width)
    head = {"set": set_name, "impl": impl, "k": k, "salience": salience, "loss": args.loss, "seed": seed}
    if impl == "ours":
        crosscoder = train_ours(data, k, salience, args.loss, seed, dict_size=width_dict_size(args.width),
                                device=args.device, decoder_init_norm=args.decoder_init_norm)
        figures = measure(crosscoder, data, torch.ones(2))
    elif impl == "codes":
        figures = oracle_codes(data, k)
    elif impl == "lin":
        figures = oracle_linear(data, k)
    elif impl == "enc":
        figures = oracle_encoder(data, k, salience, args.loss, seed, device=args.device)
    else:
        from mneme_plugin.formats import load_crosscoder

        with tempfile.TemporaryDirectory() as out_dir:
            subprocess.run([sys.executable, __file__, "--child", set_name, "--k", str(k), "--fork", args.fork,
                            "--salience", salience, "--seed", str(seed), "--data-seed", str(args.data_seed),
                            "--width", str(args.width),
                            "--out", out_dir],
                           check=True, capture_output=True, text=True)
            crosscoder = load_crosscoder(out_dir)
        figures = measure(crosscoder, data, data.scale_factors())
    return {**head, **figures}


def label(r: dict) -> str:
    name = r["impl"] if r["impl"] in ORACLES else f"{r['impl']}:{r['salience']}"
    return f"{r['set']:<9} {name:<15} {r['k']:>2}"


def row(r: dict) -> str:
    ev = f"EV {r['ev'][0]:.3f}/{r['ev'][1]:.3f}"
    if "recovered" not in r:  # an oracle row
        dead = f"  dead {r['dead']:.2f}" if "dead" in r else ""
        return f"{label(r)} s{r['seed']}  oracle {ev}{dead}"
    kinds = [kind for kind in KINDS if kind in r["by_kind"]]
    by_kind = " ".join(f"{SHORT[kind]} {r['by_kind'][kind]:.2f}" for kind in kinds)
    sides = " ".join(f"{SHORT[kind]} {r['on_side'][kind][0]}/{r['on_side'][kind][1]}" for kind in kinds)
    return (f"{label(r)} s{r['seed']}  rec {r['recovered']:.2f} ({by_kind})  "
            f"leak {r['leak']['base_only']:.3f}/{r['leak']['edited_only']:.3f}  "
            f"{ev}  dead {r['dead']:.2f}  side {sides}")


def summary(rows: list[dict]) -> str:
    """Mean ± sd over the seeds of one (set, trainer, k); the sd is the sample sd (n - 1)."""
    def stat(values: list[float], digits: int = 2) -> str:
        t = torch.tensor(values, dtype=torch.float64)
        sd = float(t.std()) if len(values) > 1 else 0.0
        return f"{float(t.mean()):.{digits}f}±{sd:.{digits}f}"

    r0 = rows[0]
    seeds = f"seeds {min(r['seed'] for r in rows)}-{max(r['seed'] for r in rows)} (n={len(rows)})"
    ev = f"EV {stat([r['ev'][0] for r in rows], 3)}/{stat([r['ev'][1] for r in rows], 3)}"
    if "recovered" not in r0:
        dead = f"  dead {stat([r['dead'] for r in rows])}" if "dead" in r0 else ""
        return f"{label(r0)} mean  oracle {ev}{dead}  {seeds}"
    kinds = [kind for kind in KINDS if kind in r0["by_kind"]]
    by_kind = " ".join(f"{SHORT[kind]} {stat([r['by_kind'][kind] for r in rows])}" for kind in kinds)
    leaks = "/".join(stat([r["leak"][kind] for r in rows], 3) for kind in ("base_only", "edited_only"))
    worst = "/".join(f"{max(r['leak'][kind] for r in rows):.3f}" for kind in ("base_only", "edited_only"))
    return (f"{label(r0)} mean  rec {stat([r['recovered'] for r in rows])} (min {min(r['recovered'] for r in rows):.2f}; "
            f"{by_kind})  leak {leaks} (max {worst})  {ev}  dead {stat([r['dead'] for r in rows])}  {seeds}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--salience", default="crosscoder",
                        help="ours: comma-separated salience modes, one row each (crosscoder = our default)")
    parser.add_argument("--loss", default=None, help="ours: training loss (losses.RECONSTRUCTION_LOSSES: norm_1.25, norm, squared; default: the trainer's)")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated planted sets ({', '.join(SETS)})")
    parser.add_argument("--k", default=None, help="comma-separated k values (default: 1x, 2x, 4x true L0)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (one run; see --seeds)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="training seeds: one row per seed, then mean ± sd per (set, trainer, k)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the planted directions")
    parser.add_argument("--fork", default=None, help="folder holding the fork's dictionary_learning package")
    parser.add_argument("--oracle", action="store_true", help="also the oracle rows `codes`, `lin` and `enc` (docstring)")
    parser.add_argument("--device", default="cpu",
                        help="ours: training device (cuda trains under bf16 autocast, training.autocast auto); "
                             "measured on the CPU either way")
    parser.add_argument("--width", type=int, default=1,
                        help="scale the sets' dimension, feature counts and dictionary by this factor (same true L0)")
    parser.add_argument("--decoder-init-norm", type=float, default=1.0,
                        help="ours: initial decoder row norm (training.decoder_init_norm; the fork's norm_init_scale)")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of the table")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = sorted(set(args.sets.split(",")) - set(SETS))
    if unknown:
        parser.error(f"--sets: unknown planted set(s) {unknown}; the sets are {', '.join(SETS)}.")
    if args.fork and not Path(args.fork, "dictionary_learning").is_dir():
        parser.error(f"--fork {args.fork} holds no dictionary_learning package (give the folder of the fork's "
                     "snapshot, with dictionary_learning/ inside).")
    if args.child:
        train_fork(args.child, int(args.k), args.salience, args.seed, args.fork, args.out, args.data_seed, args.width)
        return
    if args.loss is None:
        from mneme_plugin.crosscoder.config import TrainingConfig

        args.loss = TrainingConfig.loss
    saliences = args.salience.split(",")
    variants = [("ours", salience) for salience in saliences]
    if args.fork:  # the fork has no squared weight: `paper` runs it with its CROSSCODER weight, once
        fork_saliences = dict.fromkeys("crosscoder" if s == "paper" else s for s in saliences)
        variants += [("fork", salience) for salience in fork_saliences]
    if args.oracle:
        variants = [(oracle, saliences[0]) for oracle in ORACLES] + variants
    seeds = args.seeds if args.seeds is not None else [args.seed]
    print(f"salience {args.salience}, loss {args.loss}, training seeds {seeds}, data seed {args.data_seed}, "
          f"ours trained on {args.device}, decoder rows at norm {args.decoder_init_norm}; "
          f"m={width_dict_size(args.width)}, batch {BATCH}, {STEPS} steps; fork: lr {FORK_LR}, warmup {FORK_WARMUP}", flush=True)
    results: dict[tuple, list[dict]] = {}
    for set_name in args.sets.split(","):
        spec = planted_spec(set_name, args.data_seed, args.width)
        ks = [int(k) for k in args.k.split(",")] if args.k else k_grid(spec)
        if not args.json:
            print(f"-- {set_name}: {spec.n_features} features, true L0 {spec.true_l0:.2f}, k {ks}", flush=True)
        for k in ks:
            for impl, salience in variants:
                for seed in seeds if impl not in ORACLES else seeds[:1]:  # deterministic
                    result = run(set_name, impl, salience, k, seed, args)
                    results.setdefault((set_name, k, impl, salience), []).append(result)
                    print(json.dumps(result) if args.json else row(result), flush=True)
    if len(seeds) > 1 and not args.json:
        print("-- mean ± sd over training seeds", flush=True)
        for rows in results.values():
            if len(rows) > 1:
                print(summary(rows), flush=True)


if __name__ == "__main__":
    main()
