"""`msnc compress`: one command from a checkpoint to compressed, measured, exported models (see README.md here)."""
from ms_nlp_compress.pipeline.config import MeasureConfig, PipelineConfig, StageSpec
from ms_nlp_compress.pipeline.stages import StageKind, register_stage, stage_kind

__all__ = ["MeasureConfig", "PipelineConfig", "StageSpec", "StageKind", "register_stage", "stage_kind"]
