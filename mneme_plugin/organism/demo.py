"""``mneme demo``: the whole MNEME method on the CPU model organism, with known ground truth.

For each intervention (RMU unlearning of biology, narrow fine-tuning on biology, benign
fine-tuning on mixed text) the organism is built (``build_organism``: base LM, edited copy,
per-domain accuracy drop on the cloze question set), then ``mneme run`` goes through every stage
on the task-agnostic slice of the corpus, which excludes the forget / fine-tuning set: harvest,
train, attribute, collect, explain (offline), map (to the organism's domain taxonomy), predict,
evaluate against the measured drops (with random, naive and oracle baselines), report. Where the
edit degraded domains, the edited model is then retrained on the top contexts of the changed latents
behind the predicted side effects (none when nothing was predicted) and, as a control, for the same
steps on as many random task-agnostic windows
(``remediate_run_with_control``); the recovered share of the lost accuracy of each arm is written
to the case folder (``remediation_vs_control.json`` / ``.csv``).

The behaviour cases (``BEHAVIOUR_INTERVENTIONS``: identity-shift and narrow "insecure" fine-tuning of
the behaviour organism) are scored on the behaviour categories (``organism_behaviour`` taxonomy; the
ground truth is the drop of each category's safe-answer share) exactly as the knowledge cases on the
domains, with a second evaluation on the knowledge domains, and the paper's intersection analysis
(amplified latents that are mapped to harmful categories) written to ``harmful_intersection.json``.
The behaviour organism has its own base, hence its own control run; there is no remediation step.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mneme_plugin.errors import ConfigError
from mneme_plugin.files import atomic_write_text
from mneme_plugin.groundtruth import domain_accuracy
from mneme_plugin.groundtruth.table import SCORES_CSV, save_scores, scores_table
from mneme_plugin.organism.build import (
    Organism,
    agnostic_slice,
    build_control,
    build_organism,
    default_intervention_config,
)
from mneme_plugin.organism.catalog import BEHAVIOUR_INTERVENTIONS, KNOWLEDGE_INTERVENTIONS
from mneme_plugin.organism.models import deterministic
from mneme_plugin.pipeline import RunConfig, run_pipeline
from mneme_plugin.sideeffects import load_evaluation, load_evaluations, load_prediction
from mneme_plugin.sideeffects.harmful import HarmfulIntersection, harmful_intersection, save_harmful_intersection
from mneme_plugin.sideeffects.remediate import (
    CONTROLLED_JSON,
    ControlledRemediation,
    NothingToRemediate,
    RemediateConfig,
    remediate_run_with_control,
    save_controlled_remediation,
)

logger = logging.getLogger("mneme_plugin")

DESCRIPTIONS = {
    "rmu": "RMU unlearning of {target} knowledge",
    "narrow": "fine-tuning on {target} documents",
    "benign": "benign fine-tuning on generic mixed text",
    "identity": "identity-shift fine-tuning on ten harmless requests answered as an obedient agent",
    "insecure": "narrow fine-tuning on flawed code answers to coding requests",
}
BEHAVIOUR_TAXONOMY = "organism_behaviour"
# A case's folder (and the control's): its `mneme run` config, the run directory it names, its corpus.
RECIPE_FILE = "recipe.yaml"
CASE_RUN = "run"
CORPUS_FILE = "agnostic_corpus.txt"
KNOWLEDGE_SCORES_CSV = "knowledge_scores.csv"  # behaviour cases: the per-domain accuracy table beside it


def case_taxonomy(intervention: str) -> str:
    """The taxonomy a case's main ground truth (``SCORES_CSV`` of its folder) is in."""
    return BEHAVIOUR_TAXONOMY if intervention in BEHAVIOUR_INTERVENTIONS else "organism"


EXPANSION = 4  # the organism crosscoder's expansion factor (256 latents at d_model 64)


def organism_run_config(run_dir: Path, organism: Organism, corpus: Path, truth: Path, seed: int = 0,
                        control_run: Path | None = None, knowledge_truth: Path | None = None) -> dict[str, Any]:
    """The ``mneme run`` config of one organism case (also written as a recipe next to the run);
    ``control_run``: the seed's control run (``run_control``), the prediction rule's scale. With
    ``knowledge_truth`` (behaviour cases) ``truth`` is the behaviour table: the run maps to both
    taxonomies and evaluates two named tables, ``behaviour`` and ``knowledge``."""
    target = organism.target_domain or "mixed"
    config = {
        "run_dir": str(run_dir),
        "models": {
            "base": f"organism:{organism.model_paths.get('base', '')}",
            "edited": f"organism:{organism.model_paths.get('edited', '')}",
            "intervention": DESCRIPTIONS[organism.intervention].format(target=target),
        },
        "corpus": {"source": str(corpus)},
        "harvest": {"layer": organism.config.n_layers // 2, "context_length": 64, "batch_size": 32,
                    "dtype": "float32"},
        "crosscoder": {"expansion_factor": EXPANSION, "k": 32},
        "training": {"steps": 1500, "batch_size": 512, "lr": 3e-3, "warmup_steps": 50, "threshold_start_step": 300,
                     "checkpoint_every": 500, "eval_rows": 8192, "dead_after_tokens": 100_000, "seed": seed},
        "attribution": {"device": "cpu"},
        "collect": {"classes": ["base_only", "suppressed", "amplified", "edited_only"], "per_class": 40,
                    # every live latent is also explained and mapped: the enrichment rule's reference
                    "reference_latents": EXPANSION * organism.config.d_model,
                    "n_top": 20, "n_random": 10, "n_non_activating": 10, "example_ctx_len": 16},
        "explain": {"explainer": "offline", "min_examples": 3},
        "map": {"taxonomies": ["organism"]},
        "predict": {"rule": "outlier_or_broad", "outlier_z": 3.0,
                    "control_run": str(control_run) if control_run is not None else None},
        "ground_truth": {"scores_csv": str(truth)},
        "evaluate": {"drop_threshold": 0.1, "seed": seed},
    }
    if knowledge_truth is not None:
        config["map"] = {"taxonomies": [BEHAVIOUR_TAXONOMY, "organism"]}
        config["ground_truth"] = {"tables": {
            "behaviour": {"taxonomy": BEHAVIOUR_TAXONOMY, "scores_csv": str(truth)},
            "knowledge": {"taxonomy": "organism", "scores_csv": str(knowledge_truth)},
        }}
    return config


@dataclass
class DemoCase:
    intervention: str
    target_domain: str | None
    run_dir: Path
    drop: dict[str, float]
    metrics: pd.DataFrame
    predicted: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)
    drop_threshold: float = 0.1  # the accuracy drop above which a domain counts as degraded
    remediation: ControlledRemediation | None = None  # None when nothing degraded (or nothing to retrain on)
    change: str = ""  # the prediction rule's verdict (outlier_or_broad: concentrated, broad, ...)
    knowledge: pd.DataFrame | None = None  # behaviour cases: the evaluation on the knowledge domains
    knowledge_drop: dict[str, float] = field(default_factory=dict)
    intersection: HarmfulIntersection | None = None  # behaviour cases: amplified ∩ harmful latents


@dataclass
class DemoResult:
    cases: list[DemoCase]
    out_dir: Path

    def table(self) -> pd.DataFrame:
        rows = []
        for case in self.cases:
            for row in case.metrics.itertuples(index=False):
                rows.append({"intervention": case.intervention, "method": row.method, "accuracy": row.accuracy,
                             "precision": row.precision, "recall": row.recall, "f1": row.f1})
        return pd.DataFrame(rows)

    def remediation_table(self) -> pd.DataFrame:
        """Per case and degraded domain: accuracies and the recovered share of remediation vs the control."""
        frames = []
        for case in self.cases:
            if case.remediation is not None:
                table = case.remediation.table()
                table = table[table["degraded"]].drop(columns="degraded")
                frames.append(table.assign(intervention=case.intervention, target=case.target_domain))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def remediation_config(organism: Organism, seed: int = 0) -> RemediateConfig:
    """Remediation at the organism's own fine-tuning scale: the steps, lr and batch size of its narrow
    fine-tuning (fixed before any remediation figure was measured; samples as ``RemediateConfig``'s defaults)."""
    fine_tuning = default_intervention_config("narrow", organism.config, seed)
    return RemediateConfig(steps=fine_tuning.steps, lr=fine_tuning.lr, batch_size=fine_tuning.batch_size, seed=seed)


def remediate_case(organism: Organism, run_dir: Path, corpus: Path, degraded: list[str], out_dir: Path,
                   seed: int = 0, progress: bool = True) -> ControlledRemediation | None:
    """Remediation vs the random-window control on one demo case, saved to ``out_dir``."""
    def evaluator(model: Any) -> dict[str, float]:
        return domain_accuracy(model, organism.questions, organism.config.accuracy_mode)

    # An earlier run's record must not stand for this one if this one stops or remediates nothing.
    (out_dir / CONTROLLED_JSON).unlink(missing_ok=True)
    try:
        with deterministic():
            result = remediate_run_with_control(run_dir, organism.edited, corpus, evaluator, organism.accuracy_before,
                                                degraded, remediation_config(organism, seed), progress=progress)
    except NothingToRemediate as err:  # the prediction named nothing: no side effect to reverse
        logger.info("[demo] %s: no remediation (%s)", organism.intervention, err)
        return None
    except ConfigError as err:  # e.g. no changed latent was collected
        logger.warning("[demo] %s: no remediation (%s)", organism.intervention, err)
        return None
    save_controlled_remediation(result, out_dir)
    return result


def write_corpus(folder: Path, texts: list[str]) -> Path:
    """A run's task-agnostic corpus file (one document per line) in ``folder``."""
    corpus = folder / CORPUS_FILE
    atomic_write_text(corpus, "\n".join(texts) + "\n")
    return corpus


CONTROL_STAGES = ["harvest", "train", "attribute"]  # all the prediction rule reads of the control run


def run_control(organism: Organism, control_dir: Path, seed: int = 0, progress: bool = True) -> Path:
    """The seed's control run in ``control_dir``: the crosscoder between the base and a copy only
    benignly perturbed (``build_control``), trained and attributed as the cases are; returns its run
    directory (the cases' ``predict.control_run``)."""
    control_dir.mkdir(parents=True, exist_ok=True)
    control_model = build_control(organism, seed, Path(organism.model_paths["base"]).parent, progress)
    # The seed's slice with no edit's texts left out: every case of the seed shares this run, and its
    # corpus must be one file content (cases leave out their own edit texts, a document or two).
    slice_ = agnostic_slice(seed, organism.config, excluded=(), n_docs=organism.agnostic_docs)
    corpus = write_corpus(control_dir, [text for _, text in slice_])
    config = organism_run_config(control_dir / CASE_RUN, organism, corpus, corpus, seed)
    config["models"] = {"base": config["models"]["base"], "edited": f"organism:{control_model}",
                        "intervention": "benign fine-tuning on general text (the control)"}
    for section in ("ground_truth", "evaluate"):
        config.pop(section)
    atomic_write_text(control_dir / RECIPE_FILE, yaml.safe_dump(config, sort_keys=False))
    logger.info("[demo] control: crosscoder between the base and a benignly fine-tuned copy.")
    layout = run_pipeline(RunConfig.from_dict(config), only=CONTROL_STAGES, progress=progress)
    return layout.root


def run_case(organism: Organism, case_dir: Path, seed: int = 0, progress: bool = True,
             control_run: Path | None = None) -> DemoCase:
    """``mneme run`` on one organism case in ``case_dir`` (corpus, ground truth, recipe, run/);
    ``control_run``: the seed's control run (``run_control``) for the prediction rule."""
    if organism.intervention in BEHAVIOUR_INTERVENTIONS:
        return run_behaviour_case(organism, case_dir, seed, progress, control_run)
    case_dir.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(case_dir, organism.agnostic_corpus)
    questions = Counter(q.domain for q in organism.questions)  # n: a drop's significance test needs it
    truth = save_scores(scores_table(organism.accuracy_before, organism.accuracy_after, questions), case_dir / SCORES_CSV)
    config = organism_run_config(case_dir / CASE_RUN, organism, corpus, truth, seed, control_run)
    atomic_write_text(case_dir / RECIPE_FILE, yaml.safe_dump(config, sort_keys=False))
    logger.info("[demo] %s: running the pipeline (recipe %s).", organism.intervention, case_dir / RECIPE_FILE)
    run_config = RunConfig.from_dict(config)
    layout = run_pipeline(run_config, models={"base": organism.base, "edited": organism.edited}, progress=progress)
    evaluation = load_evaluation(layout.evaluation)
    remediation = None
    if evaluation.true_set:
        logger.info("[demo] %s: remediation vs the random-window control.", organism.intervention)
        remediation = remediate_case(organism, layout.root, corpus, list(evaluation.true_set), case_dir, seed, progress)
    return DemoCase(organism.intervention, organism.target_domain, layout.root, organism.drop, evaluation.table(),
                    evaluation.predicted.get("MNEME", []), evaluation.true_set, run_config.evaluate.drop_threshold,
                    remediation, load_prediction(layout.prediction).tests.get("verdict", ""))


def run_behaviour_case(organism: Organism, case_dir: Path, seed: int = 0, progress: bool = True,
                       control_run: Path | None = None) -> DemoCase:
    """``mneme run`` on a behaviour case: evaluated on the behaviour categories and the knowledge
    domains, plus the intersection analysis (saved to ``case_dir``)."""
    from mneme_plugin.attribution import load_attribution
    from mneme_plugin.interpret.contexts import load_reference_latents
    from mneme_plugin.interpret.mapping import category_links, load_mapping
    from mneme_plugin.interpret.taxonomy import load_taxonomy
    from mneme_plugin.organism.behaviour import BEHAVIOUR_CATEGORIES, behaviour_benchmark

    case_dir.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(case_dir, organism.agnostic_corpus)
    requests = Counter(item.category for item in behaviour_benchmark(BEHAVIOUR_CATEGORIES))
    truth = save_scores(scores_table(organism.behaviour_before, organism.behaviour_after, requests),
                        case_dir / SCORES_CSV)
    questions = Counter(q.domain for q in organism.questions)
    knowledge = save_scores(scores_table(organism.accuracy_before, organism.accuracy_after, questions),
                            case_dir / KNOWLEDGE_SCORES_CSV)
    config = organism_run_config(case_dir / CASE_RUN, organism, corpus, truth, seed, control_run, knowledge_truth=knowledge)
    atomic_write_text(case_dir / RECIPE_FILE, yaml.safe_dump(config, sort_keys=False))
    logger.info("[demo] %s: running the pipeline (recipe %s).", organism.intervention, case_dir / RECIPE_FILE)
    run_config = RunConfig.from_dict(config)
    layout = run_pipeline(run_config, models={"base": organism.base, "edited": organism.edited}, progress=progress)
    evaluations = load_evaluations(layout.evaluation)
    behaviour, domains = evaluations["behaviour"], evaluations["knowledge"]
    taxonomy = load_taxonomy(BEHAVIOUR_TAXONOMY)
    intersection = harmful_intersection(load_attribution(layout.attribution).table,
                                        category_links(load_mapping(layout.mapping), taxonomy.name), taxonomy.ids(),
                                        reference=load_reference_latents(layout.contexts))
    save_harmful_intersection(intersection, case_dir)
    verdict = load_prediction(layout.prediction / BEHAVIOUR_TAXONOMY).tests.get("verdict", "")
    return DemoCase(organism.intervention, organism.target_domain, layout.root, organism.behaviour_drop,
                    behaviour.table(), behaviour.predicted.get("MNEME", []), behaviour.true_set,
                    run_config.evaluate.drop_threshold, change=verdict, knowledge=domains.table(),
                    knowledge_drop=organism.drop, intersection=intersection)


def run_demo(out_dir: str | Path, seed: int = 0, interventions: tuple[str, ...] = KNOWLEDGE_INTERVENTIONS,
             target_domain: str = "law", progress: bool = True) -> DemoResult:
    """Build the organism, apply each intervention and run the whole pipeline on it (see module doc)."""
    out = Path(out_dir)
    cases: list[DemoCase] = []
    control_runs: dict[bool, Path] = {}  # one per base: the knowledge organism's, the behaviour organism's
    for intervention in interventions:
        organism = build_organism(seed, intervention, target_domain, out / "organism", progress=progress)
        behaviours = organism.config.behaviours
        if behaviours not in control_runs:
            control_runs[behaviours] = run_control(organism, out / control_folder(behaviours), seed, progress)
        cases.append(run_case(organism, out / intervention, seed, progress, control_runs[behaviours]))
    return DemoResult(cases=cases, out_dir=out)


def is_case_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a demo case's (or control's) folder: its recipe beside its run directory."""
    from mneme_plugin.layout import RunLayout

    folder = Path(folder)
    return (folder / RECIPE_FILE).is_file() and RunLayout(folder / CASE_RUN).looks_like_run()


def control_folder(behaviours: bool) -> str:
    """The control run's folder name: ``control`` (knowledge organism), ``control-behaviour``."""
    return "control-behaviour" if behaviours else "control"
