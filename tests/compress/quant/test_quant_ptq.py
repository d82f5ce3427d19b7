"""PTQ baseline: no training; 2-bit deviates more than 8-bit from the float model; deployed == fake-quant."""
import os
import sys

import numpy as np

from mindspore import Tensor

sys.path.insert(0, os.path.dirname(__file__))
from test_quant_prepare import batch, classifier, tiny  # noqa: E402

from ms_nlp_compress.compress.quant.convert import QuantizedNezhaForSequenceClassification  # noqa: E402
from ms_nlp_compress.compress.quant.ptq import post_training_quantize  # noqa: E402


def test_ptq_8_and_2_bit(graph_mode):
    arrays = [Tensor(a) for a in batch()]
    reference = classifier(tiny(), seed=5)(*arrays)[0].asnumpy()
    deviation = {}
    for preset in ("8-8-8", "2-2-8"):
        prepared, deployed = post_training_quantize(classifier(tiny(), seed=5), preset)
        assert isinstance(deployed, QuantizedNezhaForSequenceClassification)
        fake = prepared(*arrays)[0].asnumpy()
        np.testing.assert_allclose(deployed(*arrays)[0].asnumpy(), fake, atol=1e-5)
        deviation[preset] = float(np.abs(fake - reference).max())
    # Both presets clip activations at 2.5 (the reference's clip), so 8-bit is not near-lossless on these random
    # weights; what must hold is the ordering: fewer weight bits, larger deviation.
    assert 0 < deviation["8-8-8"] < deviation["2-2-8"]
