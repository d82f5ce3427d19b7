"""DynaBERT: importance, rewiring, elastic width/depth sub-networks, the summed-gradient loss, extraction.

    elastic = dynabert.prepare(model, importance_batches)            # importance on held-out TRAINING rows, rewire
    loss = dynabert.build_loss(elastic, DynaBertConfig(...), teacher) # one loss Cell over every sub-network
    ... the ordinary Trainer / TrainStep on `loss`, optimizing and saving elastic.model ...
    small, config, shape = dynabert.extract(elastic.model, width=0.5, depth=0.75)
"""
from ms_nlp_compress.compress.dynabert.config import DynaBertConfig
from ms_nlp_compress.compress.dynabert.elastic import ElasticModel, SlicedDense, build_subnetwork, names_kept
from ms_nlp_compress.compress.dynabert.extract import extract, extraction_record, subnetwork_weights
from ms_nlp_compress.compress.dynabert.importance import (Importance, ImportanceScorer, ffn_importance,
                                                          head_importance, held_out_rows)
from ms_nlp_compress.compress.dynabert.loss import DynaBertLoss, build_loss, stage2_teacher
from ms_nlp_compress.compress.dynabert.prepare import PreparedModel, prepare
from ms_nlp_compress.compress.dynabert.rewire import (head_row_indices, order_by_importance, permute_ffn,
                                                      permute_heads, rewire_model)
from ms_nlp_compress.compress.dynabert.sizes import (SubnetworkShape, depth_layer_mapping, heads_kept,
                                                     intermediate_kept, kept_layers, subnetwork_config,
                                                     subnetwork_shape)

__all__ = ["DynaBertConfig", "DynaBertLoss", "ElasticModel", "Importance", "ImportanceScorer", "PreparedModel",
           "SlicedDense", "SubnetworkShape", "build_loss", "build_subnetwork", "depth_layer_mapping", "extract",
           "extraction_record", "ffn_importance", "head_importance", "head_row_indices", "heads_kept",
           "held_out_rows", "intermediate_kept", "kept_layers", "names_kept", "order_by_importance", "permute_ffn",
           "permute_heads", "prepare", "rewire_model", "stage2_teacher", "subnetwork_config", "subnetwork_shape",
           "subnetwork_weights"]
