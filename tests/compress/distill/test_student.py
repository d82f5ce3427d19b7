"""Student construction: presets on the teacher's settings, slicing teacher layers (numpy twin by reshapes, and an
exact round trip at equal shape), and initialisation from a saved general-distilled student."""
import dataclasses

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from ms_nlp_compress.compress.distill.config import DistillConfig
from ms_nlp_compress.compress.distill.student import (build_student, preset_config, resolve_student_config,
                                                      weights_from_teacher_layers)
from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.models.checkpoint import cell_weights, save_model_dir
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification, NezhaModel

TEACHER = NezhaConfig(vocab_size=40, hidden_size=16, num_layers=4, num_heads=4, intermediate_size=32,
                      max_relative_position=4, position_embedding="absolute", max_position_embeddings=20)


def test_tinybert_presets_take_the_teachers_vocabulary_and_settings():
    minilm_like = NezhaConfig(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                              position_embedding="absolute", hidden_act="gelu", layer_norm_eps=1e-12)
    student = preset_config("tinybert4", minilm_like)
    assert (student.num_layers, student.hidden_size, student.intermediate_size, student.num_heads) == (4, 312, 1200, 12)
    assert student.attention_head_size == 26
    assert student.vocab_size == 30522 and student.position_embedding == "absolute"
    six = preset_config("tinybert6", minilm_like)
    assert (six.num_layers, six.hidden_size, six.intermediate_size, six.attention_head_size) == (6, 768, 3072, 64)
    with pytest.raises(ConfigError, match="unknown preset 'tinybert3'"):
        preset_config("tinybert3", minilm_like)


def twin_slice(teacher_weights, layers, hidden, heads, head_dim, ffn, teacher_heads, teacher_head_dim):
    """Independent twin: each teacher tensor reshaped to (heads, head_dim) blocks where it has a head axis, then
    leading blocks cut by plain slicing."""
    def heads_rows(matrix):  # (N_T * D_T, ...) -> (N_S * D_S, ...)
        blocks = matrix.reshape(teacher_heads, teacher_head_dim, *matrix.shape[1:])
        return blocks[:heads, :head_dim].reshape(heads * head_dim, *matrix.shape[1:])

    expected = {"embeddings.word_embeddings.embedding_table": teacher_weights[
        "embeddings.word_embeddings.embedding_table"][:, :hidden]}
    for student_layer, teacher_layer in enumerate(layers):
        t = f"encoder.layers.{teacher_layer - 1}."
        s = f"encoder.layers.{student_layer}."
        for part in ("query", "key", "value"):
            weight = teacher_weights[t + f"attention.self_attention.{part}.weight"]
            expected[s + f"attention.self_attention.{part}.weight"] = heads_rows(weight)[:, :hidden]
            expected[s + f"attention.self_attention.{part}.bias"] = heads_rows(
                teacher_weights[t + f"attention.self_attention.{part}.bias"])
        output = teacher_weights[t + "attention.output.dense.weight"]
        expected[s + "attention.output.dense.weight"] = heads_rows(output.T).T[:hidden]
        expected[s + "ffn.intermediate.weight"] = teacher_weights[t + "ffn.intermediate.weight"][:ffn, :hidden]
        expected[s + "ffn.output.weight"] = teacher_weights[t + "ffn.output.weight"][:hidden, :ffn]
        expected[s + "ffn.layer_norm.gamma"] = teacher_weights[t + "ffn.layer_norm.gamma"][:hidden]
    return expected


def test_narrower_student_takes_head_wise_leading_slices():
    ms.set_seed(1)
    teacher = NezhaModel(TEACHER)
    teacher_weights = cell_weights(teacher)
    student_config = dataclasses.replace(TEACHER, num_layers=2, hidden_size=8, num_heads=2, head_dim=3,
                                         intermediate_size=12)
    student = NezhaModel(student_config)
    sliced = weights_from_teacher_layers(teacher_weights, TEACHER, student, student_config, [2, 4])
    assert set(sliced) == set(cell_weights(student))
    expected = twin_slice(teacher_weights, [2, 4], hidden=8, heads=2, head_dim=3, ffn=12, teacher_heads=4,
                          teacher_head_dim=4)
    for name, value in expected.items():
        np.testing.assert_array_equal(sliced[name], value, err_msg=name)
    # Q rows of head 1 are teacher rows 4..6 (head 1 starts at row 4 in the teacher, at row 3 in the student).
    np.testing.assert_array_equal(sliced["encoder.layers.0.attention.self_attention.query.weight"][3],
                                  teacher_weights["encoder.layers.1.attention.self_attention.query.weight"][4, :8])
    wider = dataclasses.replace(student_config, hidden_size=20, head_dim=3)
    with pytest.raises(ConfigError, match="cannot be wider"):
        weights_from_teacher_layers(teacher_weights, TEACHER, NezhaModel(wider), wider, [2, 4])


def test_full_shape_init_from_all_teacher_layers_reproduces_the_teacher():
    """Round trip: a student with the teacher's shape, initialised from layers 1..T, computes the teacher."""
    ms.set_seed(2)
    teacher = NezhaForSequenceClassification(TEACHER, 3)
    config = DistillConfig(student=None, student_model=TEACHER, student_init="teacher_layers")
    student, _ = build_student(config, TEACHER, num_labels=3, teacher_weights=cell_weights(teacher))
    teacher.set_train(False)
    student.set_train(False)
    ids = Tensor(np.random.default_rng(0).integers(1, 40, (2, 9)).astype(np.int32))
    np.testing.assert_array_equal(student(ids)[0].asnumpy(), teacher(ids)[0].asnumpy())


def test_build_student_from_teacher_layers_uses_mapping_and_config_layers():
    ms.set_seed(3)
    teacher_weights = cell_weights(NezhaForSequenceClassification(TEACHER, 2))
    small = dataclasses.replace(TEACHER, num_layers=2, hidden_size=8, num_heads=4, intermediate_size=12)
    by_mapping = DistillConfig(student=None, student_model=small, student_init="teacher_layers")
    student, _ = build_student(by_mapping, TEACHER, num_labels=2, teacher_weights=teacher_weights)
    weights = cell_weights(student)
    np.testing.assert_array_equal(weights["bert.encoder.layers.0.ffn.output.bias"],
                                  teacher_weights["bert.encoder.layers.1.ffn.output.bias"][:8])  # uniform: 2, 4
    np.testing.assert_array_equal(weights["classifier.weight"], teacher_weights["classifier.weight"][:, :8])
    chosen = dataclasses.replace(by_mapping, student_init_layers=[1, 3])
    weights = cell_weights(build_student(chosen, TEACHER, num_labels=2, teacher_weights=teacher_weights)[0])
    np.testing.assert_array_equal(weights["bert.encoder.layers.1.ffn.output.bias"],
                                  teacher_weights["bert.encoder.layers.2.ffn.output.bias"][:8])
    with pytest.raises(ConfigError, match=r"distill\.student_init_layers: entry for student layer 2 is 5, outside"):
        build_student(dataclasses.replace(by_mapping, student_init_layers=[1, 5]), TEACHER, 2, teacher_weights)


def test_pretrained_student_round_trip_and_shape_check(tmp_path):
    ms.set_seed(4)
    general = dataclasses.replace(TEACHER, num_layers=2, hidden_size=8, num_heads=4, intermediate_size=12)
    saved = NezhaModel(general, add_pooler=False)  # a general-distilled backbone has no pooler
    save_model_dir(saved, tmp_path / "general", general)
    config = DistillConfig(student=None, student_init="pretrained", student_init_path=str(tmp_path / "general"))
    student, student_config = build_student(config, TEACHER, num_labels=2)
    assert student_config.hidden_size == 8 and student_config.num_layers == 2
    loaded = cell_weights(student.bert)
    for name, value in cell_weights(saved).items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    mismatched = dataclasses.replace(config, student="tinybert4")
    with pytest.raises(ConfigError, match=r"distill\.student: the pretrained student .* has shape .*'hidden_size': 8"
                                          r".* but the config asks for .*'hidden_size': 312"):
        resolve_student_config(mismatched, TEACHER, student_config)
