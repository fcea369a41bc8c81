"""How visible each side effect of RMU is in the two models themselves (issue 15's "why RMU stays under 0.9").

For every RMU organism of the grid and every domain other than the unlearned one, beside the measured
accuracy drop: how much the edit moved the residual stream at the crosscoder's layer on that domain's own
documents of the task-agnostic slice (mean over tokens of ||edited - base||^2 / ||base||^2), the output
KL on them, and the drop in log-probability of the right answer where those documents state a fact (the
token after ``the {entity} {relation}``, which is what the benchmark asks). It reads the slice's domain
labels, which MNEME never has: an upper bound on what any reader of activations on that text could see.
Prints one row per (case, domain), then, for the side effects (non-target domains whose drop is > 0.1)
against the domains that did not degrade, each measure's AUROC and where each side effect ranks in its case.

    python benchmarks/bench_trace.py --seeds 0 1 2 3 --targets law biology security --out runs/validity

--out is the validity grid's folder: its organisms (``seedN/organism``) are reloaded, missing ones built
(one thread: ~80 s per seed of pretraining on 2 CPU cores, then ~30 s per RMU edit).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mneme_plugin.activations.config import DEFAULT_HOOK_TEMPLATE  # noqa: E402
from mneme_plugin.organism.build import build_organism  # noqa: E402
from mneme_plugin.organism.corpus import DOMAINS  # noqa: E402
from mneme_plugin.organism.validity import DROP_THRESHOLD  # noqa: E402

MEASURES = ("residual_change", "output_kl", "answer_logp_drop")


def domain_trace(organism, domain: str, docs: int, batch: int = 25, max_tokens: int = 64) -> dict[str, float]:
    """The three measures on up to ``docs`` of the slice's documents of ``domain``."""
    tokenizer = organism.tokenizer
    hook = DEFAULT_HOOK_TEMPLATE.format(layer=organism.config.n_layers // 2)
    answers = torch.tensor(sorted(tokenizer.convert_tokens_to_ids(v) for v in DOMAINS[domain].values))
    texts = [t for t, label in zip(organism.agnostic_corpus, organism.agnostic_labels) if label == domain][:docs]
    sums = dict.fromkeys(MEASURES, 0.0)
    tokens = answer_tokens = 0
    for start in range(0, len(texts), batch):
        ids = [tokenizer(t)["input_ids"][:max_tokens] for t in texts[start:start + batch]]
        width = max(len(i) for i in ids)
        padded = torch.tensor([i + [0] * (width - len(i)) for i in ids])
        mask = torch.tensor([[True] * len(i) + [False] * (width - len(i)) for i in ids])
        with torch.no_grad():
            base_logits, base_cache = organism.base.run_with_cache(padded, names_filter=hook)
            edited_logits, edited_cache = organism.edited.run_with_cache(padded, names_filter=hook)
        base, edited = base_cache[hook][mask], edited_cache[hook][mask]
        sums["residual_change"] += (((edited - base) ** 2).sum(-1) / (base ** 2).sum(-1)).sum().item()
        base_lp, edited_lp = base_logits.log_softmax(-1), edited_logits.log_softmax(-1)
        sums["output_kl"] += (base_lp.exp() * (base_lp - edited_lp)).sum(-1)[mask].sum().item()
        following = torch.zeros_like(padded)
        following[:, :-1] = padded[:, 1:]
        at_answer = mask & torch.isin(following, answers)
        at_answer[:, -1] = False
        right = following[at_answer][:, None]
        sums["answer_logp_drop"] += (base_lp[at_answer].gather(1, right) - edited_lp[at_answer].gather(1, right)).sum().item()
        tokens += int(mask.sum())
        answer_tokens += int(at_answer.sum())
    return {"residual_change": sums["residual_change"] / tokens, "output_kl": sums["output_kl"] / tokens,
            "answer_logp_drop": sums["answer_logp_drop"] / max(answer_tokens, 1)}


def auroc(positive: pd.Series, negative: pd.Series) -> float:
    """P(a side effect's measure > a non-degraded domain's), ties counted half."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/validity"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--targets", nargs="+", default=["law", "biology", "security"], choices=sorted(DOMAINS))
    parser.add_argument("--docs", type=int, default=150, help="documents of each domain read (default 150)")
    args = parser.parse_args()
    if any(seed < 0 for seed in args.seeds) or args.docs < 1:
        parser.error(f"--seeds must be >= 0 and --docs >= 1 (got {args.seeds}, {args.docs}).")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file: give the validity grid's folder.")
    logging.basicConfig(level=logging.WARNING)
    pd.set_option("display.width", 250)
    rows = []
    for seed in args.seeds:
        for target in args.targets:
            organism = build_organism(seed, "rmu", target, out_dir=args.out / f"seed{seed}" / "organism", progress=False)
            for domain in DOMAINS:
                if domain != target:
                    rows.append({"seed": seed, "target": target, "domain": domain, "drop": organism.drop[domain],
                                 **domain_trace(organism, domain, args.docs)})
            print(pd.DataFrame(rows[-len(DOMAINS) + 1:]).round(3).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    degraded = table["drop"] > DROP_THRESHOLD
    print(f"\n{len(table)} (case, non-target domain) pairs over {len(args.seeds) * len(args.targets)} RMU cases: "
          f"{int(degraded.sum())} side effects (drop > {DROP_THRESHOLD}), {int((~degraded).sum())} not degraded")
    for measure in MEASURES:
        ranks = [int((table[(table.seed == r.seed) & (table.target == r.target)][measure] > r[measure]).sum()) + 1
                 for _, r in table[degraded].iterrows()]
        print(f"{measure:<17} AUROC {auroc(table[degraded][measure], table[~degraded][measure]):.2f}; "
              f"not degraded: median {table[~degraded][measure].median():.3f}, max {table[~degraded][measure].max():.3f}; "
              f"rank of each side effect among its case's {len(DOMAINS) - 1} domains: {ranks}")
    print("\nside effects:")
    print(table[degraded].round(3).to_string(index=False))


if __name__ == "__main__":
    main()
