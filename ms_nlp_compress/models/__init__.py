"""Backbones (NEZHA / BERT), task heads and checkpoint import."""
from ms_nlp_compress.models.checkpoint import (LoadReport, load_model_dir, load_pretrained, pretrained_config,
                                               read_hf_checkpoint, save_model_dir)
from ms_nlp_compress.models.nezha import (NezhaForMaskedLM, NezhaForSequenceClassification, NezhaModel,
                                          SentenceEncoder)

__all__ = ["LoadReport", "NezhaForMaskedLM", "NezhaForSequenceClassification", "NezhaModel", "SentenceEncoder",
           "load_model_dir", "load_pretrained", "pretrained_config", "read_hf_checkpoint", "save_model_dir"]
