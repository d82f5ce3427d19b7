"""Extraction: any (width, depth) sub-network as a standalone, physically smaller NezhaForSequenceClassification.

The result is an ordinary model (fewer layers, fewer heads of the same size, narrower FFN: per-layer widths in its
NezhaConfig), so `save_model_dir` / `load_model_dir`, `msnc eval / predict / export / bench` take it like any other.
Its weights are exactly the leading slices the sub-network reads, so its outputs equal the sliced forward.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ms_nlp_compress.compress.dynabert.elastic import SlicedDense, build_subnetwork
from ms_nlp_compress.compress.dynabert.sizes import SubnetworkShape, subnetwork_config, subnetwork_shape
from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.models.checkpoint import is_run_state, load_weights
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification


def _warn_untrained(kind: str, value: float, trained: Optional[Sequence[float]]) -> None:
    if trained is not None and not any(abs(float(value) - float(t)) < 1e-9 for t in trained):
        warnings.warn(f"dynabert extract: {kind} {value} is not one of the trained {kind}s {list(trained)}; the "
                      f"sub-network still exists (leading units of the rewired model) but was never trained at this "
                      f"size, so its accuracy is unknown: evaluate it before use", UserWarning, stacklevel=3)


def subnetwork_weights(model: NezhaForSequenceClassification, shape: SubnetworkShape) -> Dict[str, np.ndarray]:
    """The sub-network's weights as named numpy copies, under the names of a model of its size."""
    sub = build_subnetwork(model, shape)
    weights = {}
    for cell_name, cell in sub.cells_and_names():
        for local_name, param in cell._params.items():  # pylint: disable=protected-access  (each once)
            name = f"{cell_name}.{local_name}" if cell_name else local_name
            if param is None or is_run_state(name):
                continue
            value = param.asnumpy()
            if isinstance(cell, SlicedDense):
                value = cell.sliced(local_name, value)
            weights[name] = np.ascontiguousarray(value).copy()  # copy: asnumpy shares the Parameter's memory
    return weights


def extraction_record(shape: SubnetworkShape) -> Dict[str, Any]:
    """What the model document records about where an extracted model came from (`save_model_dir(meta=...)`)."""
    return {"dynabert": {"width": shape.width, "depth": shape.depth, "layers": list(shape.layers),
                         "heads": list(shape.heads), "intermediate": list(shape.intermediate)}}


def extract(model: NezhaForSequenceClassification, width: float, depth: float,
            trained_widths: Optional[Sequence[float]] = None, trained_depths: Optional[Sequence[float]] = None
            ) -> Tuple[NezhaForSequenceClassification, NezhaConfig, SubnetworkShape]:
    """(smaller model, its NezhaConfig, its shape) for the (width, depth) sub-network of a trained DynaBERT model.

    Impossible values (a width keeping no head, a depth outside (0, 1] or keeping no layer) are ConfigErrors naming
    the value. Values outside `trained_widths` / `trained_depths` (when given) are allowed with a UserWarning.
    The returned model is in eval mode, without hidden-state outputs, like any loaded model.
    """
    if not isinstance(model, NezhaForSequenceClassification):
        raise ConfigError(f"dynabert extract needs a NezhaForSequenceClassification, got {type(model).__name__}")
    shape = subnetwork_shape(model.bert.config, width, depth)  # impossible values fail before any warning
    _warn_untrained("width", width, trained_widths)
    _warn_untrained("depth", depth, trained_depths)
    config = subnetwork_config(model.bert.config, shape)
    smaller = NezhaForSequenceClassification(config, model.num_labels)
    load_weights(smaller, subnetwork_weights(model, shape), strict=True, source=f"DynaBERT {shape.name}", fresh=())
    smaller.set_train(False)
    return smaller, config, shape
