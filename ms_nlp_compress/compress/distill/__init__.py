"""Distillation losses and teacher/student layer mappings."""
from ms_nlp_compress.compress.distill.losses import (MASKED_SCORE_THRESHOLD, attention_mse, hidden_mse, logits_mse,
                                                     soft_cross_entropy)
from ms_nlp_compress.compress.distill.mapping import LayerMapping, depth_mapping, explicit_mapping, uniform_mapping

__all__ = ["MASKED_SCORE_THRESHOLD", "attention_mse", "hidden_mse", "logits_mse", "soft_cross_entropy",
           "LayerMapping", "depth_mapping", "explicit_mapping", "uniform_mapping"]
