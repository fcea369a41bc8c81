"""Configs of prediction and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

from mneme_plugin.attribution.config import classes_problem
from mneme_plugin.config import ConfigMixin, Seed, require

RULES = ("outlier_or_broad", "outlier_plus_broad", "outlier", "enrichment", "relative", "top_k", "min_score")
# One line per rule, for the CLI's help (``sideeffects.predict`` and ``sideeffects.shift`` hold the math).
RULE_SUMMARIES = {
    "outlier_or_broad": "the default: the outlier categories of a concentrated change, or every category changed "
                        "beyond a control run's share when the change is broad",
    "outlier_plus_broad": "as outlier_or_broad, and a concentrated change also names the categories changed "
                          "beyond the control's share (more recall, less precision)",
    "outlier": "categories whose score is a robust-z outlier (z >= outlier_z)",
    "enrichment": "categories whose share of changed latents beats their share of live latents (Fisher, BH)",
    "relative": "categories scoring at least relative_threshold x the top score",
    "top_k": "the k top-scoring categories",
    "min_score": "categories scoring at least min_score",
}
assert tuple(RULE_SUMMARIES) == RULES
# The rules that test the edit against a control run (``PredictConfig.control_run``) over the
# reference latents (``sideeffects.shift``).
# Which changed latents a prediction scores: those the edit weakened, those it strengthened, or both.
SIDES = ("both", "suppressed", "amplified")
CONTROL_RULES = ("outlier_or_broad", "outlier_plus_broad")
# The rules that read the uniform reference sample of live latents (`collect.reference_latents`); the
# control rules only with a control run (``PredictConfig.reads_reference``).
REFERENCE_RULES = ("enrichment", *CONTROL_RULES)
# Which changed latents remediation retrains on (``sideeffects.remediate.RemediateConfig.target``).
REMEDIATION_TARGETS = {
    "predicted": "the latents behind the categories the predict stage named (nothing predicted: nothing to do)",
    "changed": "every changed latent of the chosen classes, whatever the prediction",
}


@dataclass
class PredictConfig(ConfigMixin):
    """How category scores are built from latents, and which categories are predicted affected.

    Every latent of a class in ``suppressed_classes`` (``amplified_classes``) adds
    ``|attribution score| * similarity`` to the suppressed (amplified) score of each of its
    ``categories_per_latent`` nearest taxonomy entries (similarity from the mapping stage, only
    entries with similarity > 0 and >= ``min_similarity``). ``max_latents`` keeps the strongest latents
    per side (by |score|).

    Prediction ``rule`` on the score of ``side``: ``suppressed``, ``amplified``, or ``both`` (their
    sum; the default: a capability moved when the edit weakened its latents or pushed new
    directions into its text, as RMU does by steering the forget domain towards a random vector):
    ``outlier``: categories whose score stands out of the taxonomy's score distribution,
    robust z = (score - median) / (1.4826 MAD) >= ``outlier_z`` (most categories are unaffected by
    an edit, so their scores are the noise floor; scale-free, no fixed number of predictions);
    ``enrichment``: categories over-represented among the changed latents of a side, against
    their share among all live latents (the collect stage's uniform ``reference_latents``
    sample, or every mapped latent when there is none): a one-sided Fisher exact
    (hypergeometric) test per category and side, Benjamini-Hochberg corrected over all tests,
    predicted at false discovery rate ``alpha``. A calibrated null: it predicts nothing when the
    changed latents are spread over the categories as the live ones are, and as many categories
    as are significant otherwise; it counts latents and ignores ``min_score``;
    ``outlier_or_broad`` (default): the outlier rule when the edit's changed latents concentrate on some
    categories, and every category when the change is spread evenly over them and broader than a
    control's (the narrow fine-tuning that overwrites everything a model knew); nothing otherwise.
    Concentration: a permutation test (``permutations`` draws, ``seed``) that the share of changed
    latents is the same in every category, over the reference latents; breadth: Fisher's exact
    test of the edit's share of changed live latents against that of ``control_run``, a finished
    run directory whose crosscoder compares the base model with a benignly perturbed copy (e.g.
    fine-tuned briefly on general text), then the same test per category (BH-corrected), all at
    level ``alpha`` (``sideeffects.shift``). Without ``control_run`` it is the outlier rule;
    ``outlier_plus_broad``: the same, except that a concentrated edit that is also broader than the
    control gets, beside its outliers, every category that per-category test names (recall-leaning:
    on the organism's 56 RMU cases Eq. 4 accuracy 0.72 -> 0.82 at precision 0.93 -> 0.80, F1 0.77
    either way);
    ``relative``: categories scoring >= ``relative_threshold`` x the best category's score;
    ``top_k``: the ``k`` best; ``min_score``: score >= ``min_score``. Categories need at least
    ``min_latents`` supporting latents either way. Every test rejects its null when its p-value (or
    BH q-value) is at most ``alpha``.
    """

    suppressed_classes: tuple[str, ...] = ("base_only", "suppressed")
    amplified_classes: tuple[str, ...] = ("edited_only", "amplified")
    categories_per_latent: int = 1
    min_similarity: float = 0.0
    max_latents: int | None = 200
    side: str = "both"
    rule: str = "outlier_or_broad"
    outlier_z: float = 3.0
    alpha: float = 0.05
    relative_threshold: float = 0.5
    k: int = 3
    min_score: float = 0.0
    min_latents: int = 1
    control_run: str | None = None
    permutations: int = 2000
    seed: Seed = 0

    def __post_init__(self) -> None:
        self.suppressed_classes = tuple(self.suppressed_classes)
        self.amplified_classes = tuple(self.amplified_classes)
        for key in ("suppressed_classes", "amplified_classes"):  # a typo scored no latent on that side
            problem = classes_problem(getattr(self, key), key)
            require(problem is None, str(problem))
        require(self.rule in RULES, f"rule must be one of {RULES}, got {self.rule!r}.")
        require(self.side in SIDES, f"side must be one of {SIDES}, got {self.side!r}.")
        require(self.categories_per_latent >= 1, "categories_per_latent must be >= 1.")
        require(0.0 < self.relative_threshold <= 1.0, "relative_threshold must be in (0, 1].")
        require(self.k >= 1, "k must be >= 1.")
        require(0.0 < self.alpha < 1.0, f"alpha must be in (0, 1), got {self.alpha}.")
        require(self.min_latents >= 1, "min_latents must be >= 1.")
        require(self.permutations >= 100, f"permutations must be >= 100 (a p-value's resolution is 1 / permutations), "
                f"got {self.permutations}.")
        require(self.max_latents is None or self.max_latents >= 1, "max_latents must be None or >= 1.")

    def reads_reference(self) -> bool:
        """Whether the rule reads collect's uniform reference sample of live latents (``contexts.json``):
        ``enrichment`` (its null) and the control rules' concentration test, which runs only with a
        ``control_run`` (without one they are the outlier rule, which reads no contexts)."""
        return self.rule in REFERENCE_RULES and (self.rule not in CONTROL_RULES or self.control_run is not None)

    def side_classes(self) -> dict[str, tuple[str, ...]]:
        """The latent classes of each side, ``suppressed`` and ``amplified``."""
        return {"suppressed": self.suppressed_classes, "amplified": self.amplified_classes}

    def changed_classes(self) -> list[str]:
        """The latent classes the prediction reads: those of ``side`` (both sides' for ``both``)."""
        return [c for side, group in self.side_classes().items() if self.side in (side, "both") for c in group]


@dataclass
class EvaluateConfig(ConfigMixin):
    """Which categories count as degraded, and the baselines' settings.

    A category is degraded when its score drops by more than ``drop_threshold`` (absolute, in
    accuracy points: 0.02 = 2 points); with ``significance`` set, the drop must also be
    significant at that level (p-value at most ``significance``): the ground-truth table's own
    ``p_value`` where it has one (McNemar on paired answers, z on lm-eval's standard errors), else
    Fisher's one-sided exact test on the category's ``n`` questions; a category with neither is
    judged by the threshold alone.
    """

    drop_threshold: float = 0.02
    significance: float | None = None
    random_p: float = 0.5
    random_seeds: int = 1000
    seed: Seed = 0

    def __post_init__(self) -> None:
        require(self.drop_threshold >= 0, "drop_threshold must be >= 0.")
        require(self.significance is None or 0 < self.significance < 1, "significance must be in (0, 1).")
        require(0.0 <= self.random_p <= 1.0, "random_p must be in [0, 1].")
        require(self.random_seeds >= 1, "random_seeds must be >= 1.")
