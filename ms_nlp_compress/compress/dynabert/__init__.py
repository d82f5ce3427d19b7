"""DynaBERT: importance scores and network rewiring."""
from ms_nlp_compress.compress.dynabert.importance import ffn_importance, head_importance
from ms_nlp_compress.compress.dynabert.rewire import (head_row_indices, order_by_importance, permute_ffn,
                                                      permute_heads)

__all__ = ["ffn_importance", "head_importance", "head_row_indices", "order_by_importance", "permute_ffn",
           "permute_heads"]
