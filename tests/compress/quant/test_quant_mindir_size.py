"""MindIR container accounting (checked against protobuf's own parse), shared graph functions (smaller file, same
values, reload equal to the fake-quant model), and the deployed activation quantizer equal to the training STE."""
import os
import sys
from collections import Counter

import numpy as np
import pytest

from mindspore import Tensor

sys.path.insert(0, os.path.dirname(__file__))
from test_quant_prepare import classifier  # noqa: E402

from ms_nlp_compress.compress.quant.config import QuantConfig  # noqa: E402
from ms_nlp_compress.compress.quant.convert import (_activation_body, convert, decode,  # noqa: E402
                                                    share_graph_functions)
from ms_nlp_compress.compress.quant.prepare import prepare  # noqa: E402
from ms_nlp_compress.compress.quant.size import mindir_container_breakdown, mindir_report  # noqa: E402
from ms_nlp_compress.compress.quant.ste import MinMaxQuantSTE, SymmetricQuantSTE  # noqa: E402
from ms_nlp_compress.config import NezhaConfig  # noqa: E402
from ms_nlp_compress.errors import CheckpointError, ConfigError  # noqa: E402
from ms_nlp_compress.export.mindir import export_mindir, inference_wrapper, verify_mindir  # noqa: E402
from ms_nlp_compress.models.nezha import NezhaForMaskedLM  # noqa: E402

import test_quant_export  # noqa: E402  (its padded input batches)


def micro():
    return NezhaConfig(vocab_size=500, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                       max_relative_position=4, hidden_dropout=0.0, attention_dropout=0.0)


def token_batches():
    return test_quant_export.inputs(vocab_size=500, seed=3)


def _string_field(text: str) -> int:
    """Encoded size of a string field with a field number below 16: one tag byte, a varint length, the bytes."""
    length = len(text.encode("utf-8"))
    return 1 + _varint_size(length) + length


def _varint_size(value: int) -> int:
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def _message_field(message) -> int:
    length = message.ByteSize()
    return 1 + _varint_size(length) + length


def _check_against_protobuf(path):
    """The wire-level breakdown against MindSpore's mind_ir_pb2 parse and protobuf's ByteSize (independent)."""
    from mindspore.train.mind_ir_pb2 import ModelProto

    model = ModelProto()
    model.ParseFromString(path.read_bytes())
    report, breakdown = mindir_report(path), mindir_container_breakdown(path)
    assert sum(report.groups.values()) == report.file_bytes
    assert breakdown.total == report.groups["container"]  # every non-tensor byte attributed exactly once
    nodes = model.graph.node
    assert breakdown.node_count == len(nodes)
    assert breakdown.constant_count == sum(node.op_type == "Constant" for node in nodes)
    assert breakdown.kinds["node_names"] == sum(_string_field(node.name) + sum(map(_string_field, node.output))
                                                for node in nodes)
    assert breakdown.kinds["node_inputs"] == sum(sum(map(_string_field, node.input)) for node in nodes)
    assert breakdown.kinds["node_scopes"] == sum(_string_field(node.domain) for node in nodes if node.domain)
    assert breakdown.kinds["op_types"] == sum(_string_field(node.op_type) for node in nodes)
    assert breakdown.kinds["constant_values"] == sum(sum(map(_message_field, node.attribute))
                                                     for node in nodes if node.op_type == "Constant")
    raw = sum(len(parameter.raw_data) for parameter in model.graph.parameter)
    assert breakdown.kinds["parameter_headers"] == sum(map(_message_field, model.graph.parameter)) - raw
    assert breakdown.kinds["functions"] == sum(map(_message_field, model.functions))
    assert breakdown.kinds["primitives"] == sum(map(_message_field, model.primitives))
    ops = Counter(node.op_type.split("::", 1)[-1].rsplit(":", 1)[0] for node in nodes)
    assert breakdown.op_counts == dict(ops)
    return model, report, breakdown


def test_container_breakdown_matches_protobuf_and_shared_functions_shrink_it(tmp_path):
    config = micro()
    prepared = prepare(classifier(config, seed=5), QuantConfig())
    deployed = convert(prepared)
    inlined_path = export_mindir(inference_wrapper(deployed, "classifier"), tmp_path / "inlined")
    share_graph_functions(deployed)
    shared_path = export_mindir(inference_wrapper(deployed, "classifier"), tmp_path / "shared")
    _, inlined, inlined_parts = _check_against_protobuf(inlined_path)
    shared_model, shared, shared_parts = _check_against_protobuf(shared_path)
    print("\n" + "\n".join(shared_parts.table(inlined_parts)))
    assert inlined_parts.kinds["functions"] == 0
    assert len(shared_model.functions) > 0 and shared_parts.kinds["functions"] > 0
    # Same tensors, byte for byte; only the graph differs, and it shrinks.
    assert {group: size for group, size in shared.groups.items() if group != "container"} == \
           {group: size for group, size in inlined.groups.items() if group != "container"}
    assert shared_parts.node_count < inlined_parts.node_count / 2
    assert shared.file_bytes < inlined.file_bytes
    # The shared file reloads (compiled once for dynamic shapes) equal to the fake-quant model on two shapes.
    check = verify_mindir(shared_path, inference_wrapper(prepared, "classifier"), token_batches(), atol=1e-5)
    assert check.worst <= 1e-5
    truncated = tmp_path / "truncated.mindir"
    truncated.write_bytes(shared_path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated.mindir: not a valid MindIR protobuf"):
        mindir_container_breakdown(truncated)


SHARED_RECIPES = {
    # packed position/type tables (8-bit) and a 4-bit symmetric group
    "2-2-8": {"preset": "2-2-8", "full_precision": ["classifier", "*.classifier"],
              "pooler": {"method": "sym", "bits": 4}},
    # min-max codes (a minimum tensor per row), log codes, min-max activations
    "mixed": {"encoder": {"method": "sym", "bits": 4}, "pooler": {"method": "log", "bits": 4},
              "embedding": {"method": "minmax", "bits": 2, "granularity": "row"}, "activation": {"method": "minmax"}},
}


def absolute_positions():
    return NezhaConfig(vocab_size=500, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                       position_embedding="absolute", max_position_embeddings=16, hidden_dropout=0.0,
                       attention_dropout=0.0)


@pytest.mark.parametrize("recipe", list(SHARED_RECIPES))
def test_shared_graph_functions_forward_equals_fake_quant_in_graph_mode(recipe, graph_mode):
    prepared = prepare(classifier(absolute_positions(), seed=6), QuantConfig.from_dict(SHARED_RECIPES[recipe]))
    prepared.set_train(False)
    deployed = share_graph_functions(convert(prepared))
    for batch in token_batches():  # two shapes: the shared functions recompile per shape in graph mode
        tensors = [Tensor(array) for array in batch]
        np.testing.assert_allclose(deployed(*tensors)[0].asnumpy(), prepared(*tensors)[0].asnumpy(), atol=1e-5)


def test_shared_graph_functions_keep_the_tied_mlm_decoder_and_decode_once(graph_mode):
    model = NezhaForMaskedLM(absolute_positions())
    model.set_train(False)
    prepared = prepare(model, QuantConfig())
    tensors = [Tensor(array) for array in token_batches()[1]]
    expected = prepared(*tensors)[0].asnumpy()
    deployed = share_graph_functions(convert(prepared))
    np.testing.assert_allclose(deployed(*tensors)[0].asnumpy(), expected, atol=1e-5)
    served = decode(share_graph_functions(convert(prepared)))  # decode before the first call (a compiled graph stays)
    np.testing.assert_allclose(served(*tensors)[0].asnumpy(), expected, atol=1e-5)


def test_share_graph_functions_refuses_a_model_without_packed_cells():
    with pytest.raises(ConfigError, match="has no packed cells"):
        share_graph_functions(classifier(micro(), seed=0))


@pytest.mark.parametrize("bits,clip", [(8, 2.5), (8, None), (4, 2.5)])
def test_deployed_symmetric_activation_quant_equals_the_training_ste_bit_for_bit(bits, clip):
    config = QuantConfig.from_dict({"activation": {"method": "symmetric", "bits": bits}, "activation_clip": clip})
    deployed, training = _activation_body(config), SymmetricQuantSTE(bits, False, clip)
    rng = np.random.default_rng(bits)
    samples = [rng.standard_normal((7, 33)) * scale for scale in (1e-3, 0.05, 1.0, 3.0, 40.0)]
    samples += [rng.standard_normal((2, 3, 5, 4)), np.zeros((4, 6)), np.full((3, 3), -2.5),
                rng.laplace(size=(64, 17)) * 2.0]
    for array in samples:
        x = Tensor(array.astype(np.float32))
        np.testing.assert_array_equal(deployed(x).asnumpy(), training(x).asnumpy())


def test_deployed_minmax_activation_quant_is_the_training_cells_maths():
    config = QuantConfig.from_dict({"activation": {"method": "minmax", "bits": 8}})
    x = Tensor((np.random.default_rng(1).standard_normal((9, 21)) * 2).astype(np.float32))
    np.testing.assert_array_equal(_activation_body(config)(x).asnumpy(), MinMaxQuantSTE(8, False, 2.5)(x).asnumpy())
    assert _activation_body(QuantConfig.from_dict({"activation": {"method": "none"}})) is None
