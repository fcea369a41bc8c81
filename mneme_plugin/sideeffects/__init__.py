"""Side effects: predict affected categories from attributed latents, evaluate against ground truth."""

from mneme_plugin._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "mneme_plugin.sideeffects.config": ("REMEDIATION_TARGETS", "RULES", "EvaluateConfig", "PredictConfig"),
    "mneme_plugin.sideeffects.evaluate": (
        "Evaluation",
        "degraded_categories",
        "evaluate",
        "load_evaluation",
        "load_evaluations",
        "save_evaluation",
    ),
    "mneme_plugin.sideeffects.harmful": (
        "HarmfulIntersection", "harmful_intersection", "load_harmful_intersection", "save_harmful_intersection",
    ),
    "mneme_plugin.sideeffects.metrics": ("SetMetrics", "oracle_baseline", "random_baseline", "set_metrics"),
    "mneme_plugin.sideeffects.predict": ("Prediction", "load_prediction", "predict", "save_prediction"),
    "mneme_plugin.sideeffects.pool": ("pool_predictions",),
    "mneme_plugin.sideeffects.remediate": (
        "ControlledRemediation",
        "NothingToRemediate",
        "RemediateConfig",
        "RemediationResult",
        "corpus_windows",
        "load_controlled_remediation",
        "remediate",
        "remediate_run_with_control",
        "remediation_latents",
        "remediate_with_control",
        "save_controlled_remediation",
        "save_remediation",
        "select_samples",
    ),
    "mneme_plugin.sideeffects.steps": (
        "evaluate_run", "evaluate_tables", "naive_prediction", "predict_run", "prediction_folder",
    ),
})
