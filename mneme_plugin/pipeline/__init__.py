"""``mneme run``: the whole MNEME pipeline from one YAML config."""

from mneme_plugin.pipeline.config import SECTIONS, CorpusConfig, GroundTruthConfig, ModelsConfig, RunConfig
from mneme_plugin.pipeline.dry_run import ConfigCheck, check_config, format_plan
from mneme_plugin.pipeline.run import PipelineContext, Stage, plan, run_pipeline

__all__ = [
    "SECTIONS",
    "ConfigCheck",
    "CorpusConfig",
    "GroundTruthConfig",
    "ModelsConfig",
    "PipelineContext",
    "RunConfig",
    "Stage",
    "check_config",
    "format_plan",
    "plan",
    "run_pipeline",
]
