"""Post-training quantization: the no-training baseline that shows what QAT buys (e.g. PTQ 8-bit and 2-bit rows)."""
from __future__ import annotations

from typing import Tuple, Union

from mindspore import nn

from ms_nlp_compress.compress.quant.config import QuantConfig
from ms_nlp_compress.compress.quant.convert import convert
from ms_nlp_compress.compress.quant.prepare import prepare


def post_training_quantize(model: nn.Cell, config: Union[QuantConfig, str]) -> Tuple[nn.Cell, nn.Cell]:
    """(fake-quant model, deployable converted model) of a trained float `model`, with no training step.

    `config` is a QuantConfig or a W-E-A preset name ("8-8-8", "2-2-8", ...). Scales are recomputed from the
    weights (and, for activations, from each batch), so nothing needs calibrating. LAT without an optimizer state
    uses the identity preconditioner. `model` itself is prepared in place (it becomes the fake-quant model).
    """
    if isinstance(config, str):
        config = QuantConfig.preset(config)
    prepared = prepare(model, config)
    prepared.set_train(False)
    return prepared, convert(prepared)
