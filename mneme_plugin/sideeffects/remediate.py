"""Remediation: retrain the edited model on the corpus samples that most activate the changed latents.

The paper reports that this partly reverses the side effects. Samples are the collected top
contexts (``mneme collect``) of the changed latents behind the predicted side effects (by default:
the latents whose evidence supports a category the predict stage named, of every changed class,
ranked by |score|; or every changed latent: see ``RemediateConfig``); training is plain next-token
loss with a small learning rate, through LoRA when ``peft`` is installed and the model is a HF model.

``remediate_with_control`` measures it: the same training (steps, lr, batch size, number of
samples) once on those top contexts and once on random windows of the run's task-agnostic corpus,
each on its own copy of the edited model, and reports per degraded category the share of the lost
accuracy each arm recovered.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mneme_plugin.attribution.config import BASE_LEANING, CLASSES, EDITED_LEANING, classes_problem
from mneme_plugin.config import ConfigMixin, Seed, require
from mneme_plugin.errors import ConfigError
from mneme_plugin.files import atomic_directory, atomic_write, atomic_write_text, read_json
from mneme_plugin.sideeffects.config import REMEDIATION_TARGETS

logger = logging.getLogger("mneme_plugin")

# In a remediation's output folder (``save_remediation``): the retrained model, and its scores when measured.
REMEDIATED_MODEL = "model"
REMEDIATION_CSV = "remediation.csv"

Evaluator = Callable[[Any], Mapping[str, float]]


class NothingToRemediate(ConfigError):
    """The run predicted no side effect, so ``target: predicted`` has no latent to retrain on."""


CONTROLLED_JSON = "remediation_vs_control.json"
CONTROLLED_CSV = "remediation_vs_control.csv"
CONTROLLED_FORMAT = "mneme-remediation-vs-control"


@dataclass
class RemediateConfig(ConfigMixin):
    """Which samples, and how the edited model is retrained on them.

    ``target``: ``predicted`` (default) retrains on the top contexts of the latents whose evidence
    supports the categories the predict stage named (``Prediction.latents_behind``), so a run that
    predicts nothing has nothing to remediate; ``changed`` on those of every changed latent (the
    earlier behaviour). On the organism's validity grid the predicted latents' contexts recover more
    than as many random windows, all changed latents' less (README, "Remediation").
    ``classes``: whose top contexts to retrain on. The default takes every changed class, not only
    the lost (base-leaning) ones: after broad fine-tuning most changed latents are amplified or
    redirected, and the suppressed ones alone cover only part of the damaged material (on the
    organism's narrow fine-tuning the suppressed latents' contexts hold 5 of the 23 sports facts a
    random sample of the same size holds; README, "Remediation").
    ``max_latents``: how many latents (strongest |score| first) give top contexts;
    ``max_samples``: the sample budget, spread over the chosen latents (each gives up to
    ceil(max_samples / latents) of its top contexts, in rank order, as many as were collected: at least
    ``samples_per_latent`` when the budget reaches latents x ``samples_per_latent``) and never exceeded;
    None takes exactly ``samples_per_latent`` per latent. Only the latents that gave a sample count as its source.
    """

    target: str = "predicted"
    classes: tuple[str, ...] = BASE_LEANING + EDITED_LEANING
    max_latents: int = 50
    samples_per_latent: int = 8
    max_samples: int | None = 400
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 8
    lora: bool = False
    lora_rank: int = 8
    seed: Seed = 0

    def __post_init__(self) -> None:
        problem = classes_problem(self.classes, "classes")  # the one message predict and collect give
        require(problem is None, str(problem))
        self.classes = tuple(self.classes)
        require(bool(self.classes), f"classes is empty: name attribution classes among {list(CLASSES)}.")
        require(self.target in REMEDIATION_TARGETS,
                f"target must be one of {list(REMEDIATION_TARGETS)}, got {self.target!r}.")
        require(self.max_latents >= 1 and self.samples_per_latent >= 1, "max_latents and samples_per_latent must be >= 1.")
        require(self.max_samples is None or self.max_samples >= self.samples_per_latent,
                f"max_samples must be None or >= samples_per_latent ({self.samples_per_latent}), got {self.max_samples}.")
        require(self.steps >= 1 and self.batch_size >= 1, "steps and batch_size must be >= 1.")
        require(self.lr > 0, "lr must be > 0.")


@dataclass
class RemediationResult:
    model: Any
    n_samples: int
    latents: list[int]
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    out_dir: Path | None = None

    def table(self) -> pd.DataFrame:
        cats = sorted(set(self.before) | set(self.after))
        return pd.DataFrame({"category": cats, "before_remediation": [self.before.get(c) for c in cats],
                             "after_remediation": [self.after.get(c) for c in cats]})


def select_samples(contexts: Any, attribution: pd.DataFrame, config: RemediateConfig,
                   latents: Collection[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Token rows (n, ctx) of the top contexts of the collected latents of ``config.classes`` that
    changed most (largest |score|: base-leaning latents score > 0, edited-leaning ones < 0), among
    ``latents`` when given (``remediation_latents``); each row once, at most ``config.max_samples``.
    Returns the rows and the latents that gave at least one of them, strongest first."""
    chosen = attribution[attribution["latent_class"].isin(config.classes)]
    chosen = chosen[chosen["latent"].isin(contexts.latents)]
    if latents is not None:
        chosen = chosen[chosen["latent"].isin(set(latents))]
    chosen = chosen.loc[chosen["score"].abs().sort_values(ascending=False, kind="stable").index].head(config.max_latents)
    picked = chosen["latent"].astype(int).tolist()
    if not picked:
        among = "" if latents is None else f" among the {len(latents)} latents behind the prediction"
        raise ConfigError(
            f"No collected latent of class {list(config.classes)}{among}: collect contexts for latents of those "
            f"classes first (mneme collect --classes {','.join(config.classes)})."
        )
    budget = config.max_samples
    per_latent = config.samples_per_latent if budget is None else math.ceil(budget / len(picked))
    rows: list[int] = []
    taken: set[int] = set()
    contributed: list[int] = []
    for latent in picked:
        if budget is not None and len(rows) >= budget:
            break
        new = []
        for r in contexts.per_latent[contexts.index_of(latent)]["top_rows"][:per_latent]:
            if int(r) not in taken:
                taken.add(int(r))
                new.append(int(r))
        if budget is not None:
            new = new[: budget - len(rows)]
        if new:
            rows += new
            contributed.append(latent)
    return contexts.tokens[rows], contributed


def check_edited_for_run(run_dir: str | os.PathLike[str], edited: str, tokenizer: Any) -> None:
    """Before retraining ``edited`` (a model spec, with its ``tokenizer``) on a run's top contexts: they are token
    ids of the run's tokenizer (``collect`` saved it in ``contexts/tokenizer``), so a model whose tokenizer reads
    those ids as other tokens would train on other text: refused (ConfigError). Another model than the run's
    edited one (config.yaml's ``models.edited``) is warned about: the side effects were found in that one."""
    from mneme_plugin.activations.models import same_model
    from mneme_plugin.interpret.files import TOKENIZER_DIR
    from mneme_plugin.interpret.explain import load_tokenizer
    from mneme_plugin.interventions.step import EDITED_BY_RUN
    from mneme_plugin.layout import RunLayout
    from mneme_plugin.pipeline.config import load_run_config

    layout = RunLayout(Path(run_dir))
    if (layout.contexts / TOKENIZER_DIR).is_dir():
        ours = {i: t for t, i in load_tokenizer(layout.contexts).get_vocab().items()}
        theirs = {i: t for t, i in tokenizer.get_vocab().items()}
        if ours != theirs:
            differing = sorted(i for i in ours.keys() | theirs.keys() if ours.get(i) != theirs.get(i))
            example = f" (token id {differing[0]} is {ours.get(differing[0])!r} for the run, {theirs.get(differing[0])!r} for it)"
            raise ConfigError(
                f"{edited} has another tokenizer than the run{example}: the top contexts are the run's token ids, which "
                f"it would read as other text. Give the edited model the run was made with (--edited).")
    if layout.config.is_file():
        config = load_run_config(layout.root)
        expected = str(layout.edited_model) if config.models.edited == EDITED_BY_RUN else config.models.edited
        if not same_model(edited, expected):
            logger.warning("Remediating %s, but the run found its side effects in %s (models.edited): retraining "
                           "another model than that one.", edited, expected)


def remediation_latents(run_dir: str | os.PathLike[str], config: RemediateConfig) -> list[int] | None:
    """The latents ``config.target`` allows in a finished run: those behind its prediction
    (``predicted``; read through the predict stage's loader) or None for every changed one.
    Raises ``NothingToRemediate`` when the prediction named no category."""
    if config.target == "changed":
        return None
    from mneme_plugin.layout import RunLayout
    from mneme_plugin.sideeffects.predict import load_prediction

    prediction = load_prediction(RunLayout(Path(run_dir)).prediction)
    if not prediction.predicted:
        raise NothingToRemediate(
            f"The prediction in {run_dir} names no affected category, so there is nothing to remediate "
            "(`--target changed`, or remediate.target: changed, retrains on the top contexts of every changed latent "
            "instead)."
        )
    return prediction.latents_behind()


def _lm_loss(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "hook_dict"):  # TransformerLens HookedTransformer / TransformerBridge
        return model(tokens, return_type="loss")
    return model(input_ids=tokens, labels=tokens).loss


def _with_lora(model: Any, config: RemediateConfig) -> Any:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        logger.warning("lora: true but peft is not installed; fine-tuning all weights instead.")
        return model
    if hasattr(model, "hook_dict"):
        logger.warning("LoRA applies to HF models; this TransformerLens model is fine-tuned in full.")
        return model
    return get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def remediate(edited: Any, samples: torch.Tensor, config: RemediateConfig | None = None,
              evaluator: Evaluator | None = None, latents: list[int] | None = None,
              progress: bool = True) -> RemediationResult:
    """Fine-tune ``edited`` (in place) on ``samples`` (n, ctx) token rows; evaluate before and after."""
    from tqdm.auto import tqdm

    cfg = config or RemediateConfig()
    if samples.ndim != 2 or len(samples) == 0:
        raise ConfigError(f"Expected (n, ctx) token rows to remediate on, got shape {tuple(samples.shape)}.")
    before = dict(evaluator(edited)) if evaluator else {}
    model = _with_lora(edited, cfg) if cfg.lora else edited
    if model is edited:  # full fine-tuning (no LoRA wrapper): every weight trains
        for p in model.parameters():
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device
    model.train()
    for _ in tqdm(range(cfg.steps), desc="remediate", disable=not progress):
        idx = torch.randint(0, len(samples), (min(cfg.batch_size, len(samples)),), generator=gen)
        loss = _lm_loss(model, samples[idx].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    if cfg.lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    after = dict(evaluator(model)) if evaluator else {}
    return RemediationResult(model=model, n_samples=len(samples), latents=list(latents or []), before=before, after=after)


def save_remediation(result: RemediationResult, out_dir: str | os.PathLike[str], save_model: Callable[[Any, Path], None] | None = None,
                     tokenizer: Any = None) -> Path:
    """The model (HF ``save_pretrained`` or ``save_model``; with ``tokenizer``, saved beside it, so the folder
    loads as a model like the edited one) and, when an evaluator measured them, the before / after scores
    (``remediation.csv``; without one, as `mneme remediate` runs, no table: nothing was measured)."""
    out = Path(out_dir)
    table = result.table()
    if len(table):
        atomic_write(out / REMEDIATION_CSV, lambda tmp: table.to_csv(tmp, index=False))
    else:
        (out / REMEDIATION_CSV).unlink(missing_ok=True)  # an earlier remediation's scores describe another model
    model_dir = out / REMEDIATED_MODEL
    if save_model is None and not hasattr(result.model, "save_pretrained"):
        raise ConfigError("Pass save_model to save a TransformerLens model.")
    # Whole or not at all: a crash while saving leaves no model folder that looks complete.
    def write(tmp: Path) -> None:
        save_model(result.model, tmp) if save_model is not None else result.model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    atomic_directory(model_dir, write, overwrite=True)
    logger.info("Remediated model written to %s%s.", model_dir,
                f", before/after scores to {out / REMEDIATION_CSV}" if len(table) else
                " (no evaluator: measure it with your benchmark, e.g. lm-eval on the ground truth's tasks)")
    result.out_dir = out
    return out


def load_remediation_scores(out_dir: str | os.PathLike[str]) -> pd.DataFrame | None:
    """The before / after scores ``save_remediation`` wrote (category, before_remediation, after_remediation);
    None when it wrote none (no evaluator measured them)."""
    path = Path(out_dir) / REMEDIATION_CSV
    return pd.read_csv(path) if path.is_file() else None


# ----------------------------------------------------------------------------- remediation vs control


def corpus_windows(corpus: Any, tokenizer: Any, harvest: Any, ctx_len: int) -> torch.Tensor:
    """Every ``ctx_len``-token piece (rows, ctx_len) of the corpus windows as ``collect`` read them.

    ``harvest`` is the reading ``HarvestConfig`` (the collected contexts record it in their meta);
    pieces holding padding are left out, so every row is real corpus text.
    """
    from mneme_plugin.activations.corpus import iter_windows

    if harvest.context_length % ctx_len:
        raise ConfigError(f"The windows' context_length ({harvest.context_length}) is not a multiple of {ctx_len}.")
    pieces = []
    for window in iter_windows(corpus, tokenizer, harvest.context_length, harvest.max_tokens, harvest.text_field,
                               harvest.messages_field, harvest.append_eos):
        tokens, mask = window.tokens.view(-1, ctx_len), window.mask.view(-1, ctx_len)
        pieces.append(tokens[mask.all(dim=1)])
    return torch.cat(pieces)


@dataclass
class ControlledRemediation:
    """Per-category accuracy of the base, the edited model, the edited model retrained on the suppressed
    latents' top contexts (``remediated``) and retrained the same way on random corpus windows (``control``)."""

    base: dict[str, float]
    edited: dict[str, float]
    remediated: dict[str, float]
    control: dict[str, float]
    degraded: list[str]
    n_samples: int  # rows each arm trained on
    steps: int  # optimizer steps of each arm
    latents: list[int] = field(default_factory=list)
    control_rows: list[int] = field(default_factory=list)  # rows of the corpus-window pool the control drew
    config: dict[str, Any] = field(default_factory=dict)
    remediated_model: Any = None  # in memory only (never saved)
    control_model: Any = None

    ARMS = ("remediated", "control")

    def recovered(self, arm: str) -> dict[str, float]:
        """Per degraded category: (arm - edited) / (base - edited), the share of the lost accuracy won back."""
        if arm not in self.ARMS:
            raise ConfigError(f"arm must be one of {self.ARMS}, got {arm!r}.")
        scores = getattr(self, arm)
        out = {}
        for c in self.degraded:
            lost = self.base[c] - self.edited[c]
            out[c] = (scores[c] - self.edited[c]) / lost if lost > 0 else math.nan
        return out

    def mean_recovered(self, arm: str) -> float:
        values = [v for v in self.recovered(arm).values() if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    def table(self) -> pd.DataFrame:
        cats = list(self.base)
        rem, ctl = self.recovered("remediated"), self.recovered("control")
        return pd.DataFrame({
            "category": cats, "base": [self.base[c] for c in cats], "edited": [self.edited[c] for c in cats],
            "remediated": [self.remediated[c] for c in cats], "control": [self.control[c] for c in cats],
            "degraded": [c in self.degraded for c in cats],
            "recovered_remediated": [rem.get(c, math.nan) for c in cats],
            "recovered_control": [ctl.get(c, math.nan) for c in cats],
        })

    def to_dict(self) -> dict[str, Any]:
        return {"format": CONTROLLED_FORMAT, "version": 1, "base": self.base, "edited": self.edited,
                "remediated": self.remediated, "control": self.control, "degraded": self.degraded,
                "n_samples": self.n_samples, "steps": self.steps, "latents": self.latents,
                "control_rows": self.control_rows, "config": self.config,
                "mean_recovered": {arm: self.mean_recovered(arm) for arm in self.ARMS}}


def remediate_with_control(edited: Any, samples: torch.Tensor, pool: torch.Tensor, evaluator: Evaluator,
                           base_scores: Mapping[str, float], degraded: list[str],
                           config: RemediateConfig | None = None, latents: list[int] | None = None,
                           progress: bool = True) -> ControlledRemediation:
    """Retrain two copies of ``edited`` with the same ``config``: one on ``samples`` (the top contexts of the
    chosen latents, ``select_samples``), one on as many rows drawn uniformly (seeded, without replacement) from ``pool`` (the
    task-agnostic corpus windows, ``corpus_windows``); evaluate both. ``edited`` itself is left untouched. ``evaluator`` runs three times: on ``edited`` (the
    scores before, shared by both arms, whose copies start from it unchanged) and on each retrained copy."""
    cfg = config or RemediateConfig()
    if pool.ndim != 2 or pool.shape[1] != samples.shape[1]:
        raise ConfigError(f"The control pool must hold rows of {samples.shape[1]} tokens like the samples, "
                          f"got shape {tuple(pool.shape)}.")
    if len(pool) < len(samples):
        raise ConfigError(f"The corpus gives {len(pool)} windows, fewer than the {len(samples)} samples to match: "
                          "use a larger task-agnostic corpus or fewer samples (max_latents / samples_per_latent).")
    unknown = sorted(set(degraded) - set(base_scores))
    if unknown:
        raise ConfigError(f"Degraded categories {unknown} have no base score.")
    rows = torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed))[: len(samples)]
    before = dict(evaluator(edited))
    if set(before) - set(base_scores):
        raise ConfigError(f"Categories {sorted(set(before) - set(base_scores))} of the evaluator have no base score.")
    unscored = sorted(set(degraded) - set(before))
    if unscored:
        raise ConfigError(f"Degraded categories {unscored} are not scored by the evaluator (it scores "
                          f"{sorted(before)}): no recovery can be measured there; give an evaluator that scores "
                          "them or leave them out of degraded.")
    arms = {}
    for arm, data in (("remediated", samples), ("control", pool[rows])):
        # No evaluator inside: each arm's copy is the unmodified edited model, already measured (``before``).
        result = remediate(copy.deepcopy(edited), data, cfg, latents=latents, progress=progress)
        result.before, result.after = dict(before), dict(evaluator(result.model))
        for p in result.model.parameters():
            p.requires_grad_(False)
        arms[arm] = result
    return ControlledRemediation(
        base={c: float(base_scores[c]) for c in before}, edited=before,
        remediated=arms["remediated"].after, control=arms["control"].after, degraded=list(degraded),
        n_samples=len(samples), steps=cfg.steps, latents=list(latents or []), control_rows=rows.tolist(),
        config=cfg.to_dict(), remediated_model=arms["remediated"].model, control_model=arms["control"].model)


def remediate_run_with_control(run_dir: str | os.PathLike[str], edited: Any, corpus: Any, evaluator: Evaluator,
                               base_scores: Mapping[str, float], degraded: list[str],
                               config: RemediateConfig | None = None, progress: bool = True) -> ControlledRemediation:
    """``remediate_with_control`` on a run: samples from its contexts + attribution, the control from
    ``corpus`` (the run's task-agnostic corpus) read in the windows the contexts were collected from."""
    from mneme_plugin.activations.config import HarvestConfig
    from mneme_plugin.attribution import load_attribution
    from mneme_plugin.interpret.contexts import load_contexts
    from mneme_plugin.layout import RunLayout

    cfg = config or RemediateConfig()
    layout = RunLayout(Path(run_dir))
    contexts = load_contexts(layout.contexts)
    samples, latents = select_samples(contexts, load_attribution(layout.attribution).table, cfg,
                                      remediation_latents(run_dir, cfg))
    harvest = HarvestConfig.from_dict(contexts.meta["config"]["harvest"])
    pool = corpus_windows(corpus, edited.tokenizer, harvest, contexts.ctx_len)
    return remediate_with_control(edited, samples, pool, evaluator, base_scores, degraded, cfg, latents, progress)


def save_controlled_remediation(result: ControlledRemediation, out_dir: str | os.PathLike[str]) -> Path:
    """``remediation_vs_control.json`` (the record ``load_controlled_remediation`` reads) and ``.csv`` (the table)."""
    out = Path(out_dir)
    table = result.table()
    atomic_write(out / CONTROLLED_CSV, lambda tmp: table.to_csv(tmp, index=False))
    atomic_write_text(out / CONTROLLED_JSON, json.dumps(result.to_dict(), indent=2))
    return out / CONTROLLED_JSON


def load_controlled_remediation(path: str | os.PathLike[str]) -> ControlledRemediation:
    """Read what ``save_controlled_remediation`` wrote (``path``: the folder or the JSON file)."""
    from mneme_plugin.errors import CheckpointError

    path = Path(path)
    path = path / CONTROLLED_JSON if path.is_dir() else path
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: run the remediation first.")
    blob = read_json(path, "run the remediation again")
    if not isinstance(blob, dict) or blob.get("format") != CONTROLLED_FORMAT:
        raise CheckpointError(f"{path} is not a remediation-vs-control record (format {CONTROLLED_FORMAT!r}).")
    keys = ("base", "edited", "remediated", "control", "degraded", "n_samples", "steps", "latents", "control_rows",
            "config")
    missing = [k for k in keys if k not in blob]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: rerun the remediation.")
    return ControlledRemediation(**{k: blob[k] for k in keys})
