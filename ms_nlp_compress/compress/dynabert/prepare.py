"""`prepare`: the DynaBERT verb before training (compress_design.md): importance -> rewiring -> elastic model."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np

from ms_nlp_compress.compress.dynabert.elastic import ElasticModel
from ms_nlp_compress.compress.dynabert.importance import Importance, ImportanceScorer
from ms_nlp_compress.compress.dynabert.rewire import rewire_model
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification


class PreparedModel(ElasticModel):
    """An ElasticModel that remembers the importance it was rewired by and the permutations applied."""

    def __init__(self, model: NezhaForSequenceClassification, importance: Importance, head_orders, neuron_orders):
        super().__init__(model)
        self.importance = importance
        self.head_orders = head_orders
        self.neuron_orders = neuron_orders

    def rewiring_record(self):
        """For the model document: which old head / neuron each new position holds, per layer."""
        return {"dynabert_rewiring": {"head_orders": [np.asarray(o).tolist() for o in self.head_orders],
                                      "neuron_orders": [np.asarray(o).tolist() for o in self.neuron_orders],
                                      "importance_batches": self.importance.batches}}


def prepare(model: NezhaForSequenceClassification, importance_batches: Iterable,
            reduce: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> PreparedModel:
    """Score heads and FFN neurons of the fine-tuned `model` on `importance_batches` (a held-out slice of the
    TRAINING data: `held_out_rows`), rewire it in place (its function is unchanged), and return the elastic view
    whose width-w sub-networks keep the most important units. `reduce`: see `ImportanceScorer`."""
    importance = ImportanceScorer(model, reduce)(importance_batches)
    head_orders, neuron_orders = rewire_model(model, importance.heads, importance.neurons)
    return PreparedModel(model, importance, head_orders, neuron_orders)
