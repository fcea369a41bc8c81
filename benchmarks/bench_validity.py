"""The method-validity grid (issue 15): the organism over seeds x targets x interventions.

Runs ``mneme run`` on every case (cached and resumable under --out), then scores every prediction
rule offline on the finished runs and prints, per case and as mean ± sd per intervention, Eq. 4
accuracy, precision, recall and F1 of MNEME (one row per rule) and of the random, naive and oracle
baselines, the recovered share of remediation vs its random-sample control, and the threshold
ceiling of RMU (the best accuracy any one threshold on the stored predictions' robust z reaches at
mean precision >= 0.8, picked with hindsight). Writes
``validity_cases.csv``, ``validity_summary.csv`` (and ``validity_summary_significant.csv``, against
the ground truth whose drops are also significant) and ``remediation_cases.csv`` to --out.

    python benchmarks/bench_validity.py                                   # 4 seeds x 3 targets
    python benchmarks/bench_validity.py --seeds 0 1 --targets law --interventions rmu
    python benchmarks/bench_validity.py --score-only                      # rescore finished runs
    python benchmarks/bench_validity.py --seeds 0 1 2 --interventions identity insecure   # behaviour cases
    python benchmarks/bench_validity.py --crosscoders 3    # + 2 crosscoders per case, predictions pooled by vote
    python benchmarks/bench_validity.py --out runs/validity-4x --agnostic-docs 8000   # 4x the task-agnostic text

A case takes ~1 min on 2 CPU cores (plus ~70 s per seed for the organism's pretraining; the behaviour
organism of the identity / insecure cases pretrains for ~3.5-4.7 min). Behaviour cases are scored on the
behaviour categories; their knowledge-domain evaluation and the intersection analysis (amplified
latents mapped to harm categories) are printed too and written to ``behaviour_cases.csv``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mneme_plugin.errors import MnemeError  # noqa: E402
from mneme_plugin.files import atomic_write  # noqa: E402
from mneme_plugin.layout import RunLayout  # noqa: E402
from mneme_plugin.organism.catalog import INTERVENTIONS, KNOWLEDGE_INTERVENTIONS  # noqa: E402
from mneme_plugin.organism.corpus import DOMAINS  # noqa: E402
from mneme_plugin.organism.demo import CASE_RUN  # noqa: E402
from mneme_plugin.organism.validity import (  # noqa: E402
    behaviour_rows, case_evidence, grid_cases, remediation_rows, run_extra_crosscoders, run_grid_case, score_case,
    summarize, summarize_remediation, threshold_ceiling,
)
from mneme_plugin.sideeffects.config import PredictConfig  # noqa: E402
from mneme_plugin.sideeffects.metrics import UNDEFINED  # noqa: E402

PREDICTION_RULES = {
    "MNEME outlier_or_broad": PredictConfig(rule="outlier_or_broad", outlier_z=3.0),
    # The default's sensitivity to its outlier threshold (a lower one only adds false positives on fresh seeds).
    "MNEME outlier_or_broad, z >= 2.5": PredictConfig(rule="outlier_or_broad", outlier_z=2.5),
    # Recall-leaning: a concentrated edit's outliers plus the categories changed beyond the control.
    "MNEME outlier_plus_broad": PredictConfig(rule="outlier_plus_broad", outlier_z=3.0),
    "MNEME outlier": PredictConfig(rule="outlier", outlier_z=3.0),
    "MNEME enrichment": PredictConfig(rule="enrichment"),
    "MNEME enrichment (suppressed side)": PredictConfig(rule="enrichment", side="suppressed"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/validity"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--targets", nargs="+", default=["law", "biology", "security"], choices=sorted(DOMAINS))
    parser.add_argument("--interventions", nargs="+", default=list(KNOWLEDGE_INTERVENTIONS), choices=INTERVENTIONS,
                        help="identity / insecure: the behaviour cases (not run by default).")
    parser.add_argument("--score-only", action="store_true", help="Score the cases already run; run nothing.")
    parser.add_argument("--crosscoders", type=int, default=1,
                        help="Crosscoders per case: N > 1 trains N - 1 more (training seeds seed + 100, + 200, ...) "
                             "and also scores each rule's predictions pooled by majority vote.")
    parser.add_argument("--agnostic-docs", type=int, default=None,
                        help="Documents of the task-agnostic slice the method reads (default: the organism's "
                             "2,000; at least 800, since each crosscoder holds 8,192 of the slice's ~22 tokens per "
                             "document out for evaluation); the models and the ground truth are the same for any "
                             "value. Use another --out.")
    parser.add_argument("--significance", type=float, default=0.05,
                        help="Also score against a ground truth whose drops must be significant at this level "
                             "(Fisher's one-sided exact test on the domain's questions); 0 to skip.")
    args = parser.parse_args()
    if any(seed < 0 for seed in args.seeds):
        parser.error(f"--seeds must be whole numbers >= 0, got {args.seeds}.")
    if args.crosscoders < 1:
        parser.error(f"--crosscoders must be at least 1 (the case's own crosscoder), got {args.crosscoders}.")
    if not 0 <= args.significance < 1:
        parser.error(f"--significance must be in (0, 1), or 0 to skip it; got {args.significance}.")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file: give a folder (the grid's cases are cached there).")
    if args.agnostic_docs is not None and args.agnostic_docs < 800:
        parser.error(f"--agnostic-docs {args.agnostic_docs} is too few: each crosscoder holds 8,192 token rows out for "
                     "evaluation, which needs at least 800 documents (~17,600 tokens).")
    logging.basicConfig(level=logging.WARNING)

    rows, significant_rows, remediation, significant_remediation, behaviour = [], [], [], [], []
    evidence: dict[str, list] = {}  # truth -> per RMU case (robust z, degraded set)
    truths = {"drop > 0.1": None} | ({f"and significant at {args.significance}": args.significance} if args.significance else {})
    cases = grid_cases(args.seeds, args.targets, args.interventions)
    for i, case in enumerate(cases, 1):
        case_dir = args.out / case.name
        if not args.score_only:
            start = time.perf_counter()
            run_grid_case(case, args.out, agnostic_docs=args.agnostic_docs)
            if args.crosscoders > 1:
                run_extra_crosscoders(case, args.out, args.crosscoders)
            print(f"[{i}/{len(cases)}] {case.name}: {time.perf_counter() - start:.0f} s", flush=True)
        elif not RunLayout(case_dir / CASE_RUN).evaluation.exists():
            print(f"[{i}/{len(cases)}] {case.name}: not run yet, skipped", flush=True)
            continue
        rows.extend(score_case(case, case_dir, PREDICTION_RULES, n_crosscoders=args.crosscoders))
        if args.significance:
            significant_rows.extend(score_case(case, case_dir, PREDICTION_RULES, significance=args.significance,
                                               n_crosscoders=args.crosscoders))
        if case.intervention == "rmu":  # a concentrated edit: the robust z is what its rule reads
            for truth, significance in truths.items():
                evidence.setdefault(truth, []).append(case_evidence(case, case_dir, significance))
        remediation.extend(remediation_rows(case, case_dir))
        if args.significance:
            significant_remediation.extend(remediation_rows(case, case_dir, args.significance))
        behaviour.extend(behaviour_rows(case, case_dir))
    if not rows:
        parser.exit(2, f"No finished case of this grid under {args.out}: run it without --score-only first.\n")
    table = pd.DataFrame(rows)
    summary = summarize(table)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "validity_cases.csv", lambda p: table.to_csv(p, index=False))
    atomic_write(args.out / "validity_summary.csv", lambda p: summary.to_csv(p, index=False))
    pd.set_option("display.width", 250)
    pd.set_option("display.max_colwidth", 60)
    print("\nPer case (MNEME rows):")
    mneme = table[table["method"].str.startswith("MNEME")]
    print(mneme[["case", "method", "accuracy", "precision", "f1", "predicted", "true"]].to_string(index=False, na_rep=UNDEFINED))
    print("\nMean ± sd over the grid:")
    print(summary.to_markdown(index=False))
    if not significant_rows:  # an earlier run's table against the significant drops would describe other cases
        (args.out / "validity_summary_significant.csv").unlink(missing_ok=True)
    if significant_rows:
        significant = summarize(pd.DataFrame(significant_rows))
        atomic_write(args.out / "validity_summary_significant.csv", lambda p: significant.to_csv(p, index=False))
        print(f"\nMean ± sd over the grid, degraded = drop > 0.1 and significant at {args.significance}:")
        print(significant.to_markdown(index=False))
    if evidence:
        ceiling = pd.DataFrame([{"intervention": "rmu", "truth": truth, "cases": len(cases),
                                 **threshold_ceiling(cases, min_precision=0.8)} for truth, cases in evidence.items()])
        print("\nThreshold ceiling: the best mean Eq. 4 accuracy one threshold on the stored predictions' robust z "
              "reaches at mean precision >= 0.8, the threshold picked with hindsight (a bound for any rule that "
              "thresholds this evidence):")
        print(ceiling.round(3).to_markdown(index=False))
    if remediation:
        remediated = pd.DataFrame(remediation)
        atomic_write(args.out / "remediation_cases.csv", lambda p: remediated.to_csv(p, index=False))
        print("\nRemediation vs the random-sample control (share of the lost accuracy recovered, mean ± sd over cases):")
        print(summarize_remediation(remediated).to_markdown(index=False))
    if significant_remediation:
        print(f"\nThe same, on the degraded domains whose drop is also significant at {args.significance} (a drop "
              "of 4 of 32 questions clears 0.1 but is within chance):")
        print(summarize_remediation(pd.DataFrame(significant_remediation)).to_markdown(index=False))
    if behaviour:
        table = pd.DataFrame(behaviour)
        atomic_write(args.out / "behaviour_cases.csv", lambda p: table.to_csv(p, index=False))
        print("\nBehaviour cases: safe-answer drops, MNEME on the knowledge domains, intersection analysis:")
        print(table.to_markdown(index=False))


if __name__ == "__main__":
    try:
        main()
    except MnemeError as err:  # a config the package refuses: its message, not a traceback
        sys.exit(f"error: {err}")
