"""``mneme run``: the whole MNEME pipeline from one YAML config."""

from mneme_plugin._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "mneme_plugin.pipeline.config": (
        "CorpusConfig",
        "ModelsConfig",
        "RunConfig",
        "load_run_config",
        "save_run_config",
    ),
    "mneme_plugin.pipeline.dry_run": ("ConfigCheck", "check_config", "format_plan"),
    "mneme_plugin.pipeline.run": ("StageMarker", "plan", "read_stage_markers", "run_pipeline"),
    "mneme_plugin.pipeline.stage": ("PipelineContext", "Stage"),
    "mneme_plugin.pipeline.stages": ("STAGES", "config_problems"),
})
