"""MindIR export round trips (export -> ms.load + GraphCell -> compare), file-name and read-only handling, the
tolerance check failing when it must, the Lite converter files, `msnc export` end to end, and the real MiniLM."""
import argparse
import os
import stat
import subprocess

import numpy as np
import pytest

import mindspore as ms

from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.export import ExportError, commands, lite
from ms_nlp_compress.export.mindir import (DEFAULT_VERIFY_SHAPES, INPUT_NAMES, ClassifierForExport, export_mindir,
                                           inference_wrapper, max_abs_difference, mindir_input_names,
                                           validate_file_name, verify_mindir)
from ms_nlp_compress.models.checkpoint import cell_weights, load_weights, save_model_dir
from ms_nlp_compress.models.dropout import set_dropout_seed
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification, NezhaModel

VOCAB_SIZE = 40
TOLERANCE = 1e-5  # tiny fp32 models: the reloaded graph and the eager Cell agree far below the command's 1e-4


def tiny_config(position_embedding):
    # Dropout is on: if export left the Cell in training mode, dropout would be compiled in and parity would fail.
    return NezhaConfig(vocab_size=VOCAB_SIZE, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24,
                       max_position_embeddings=64, max_relative_position=4, position_embedding=position_embedding,
                       hidden_dropout=0.1, attention_dropout=0.1)


def tiny_classifier(position_embedding="relative", seed=0):
    ms.set_seed(seed)
    set_dropout_seed(seed)
    return NezhaForSequenceClassification(tiny_config(position_embedding), num_labels=3)


def random_inputs(shapes=DEFAULT_VERIFY_SHAPES, seed=0):
    """Token batches with ragged padding (row lengths 1..L) and a second segment, like real pair inputs."""
    rng = np.random.default_rng(seed)
    batches = []
    for batch, length in shapes:
        lengths = rng.integers(1, length + 1, batch)
        lengths[0] = length  # one full row per batch
        positions = np.arange(length)[None, :]
        mask = (positions < lengths[:, None]).astype(np.int32)
        ids = rng.integers(5, VOCAB_SIZE, (batch, length)).astype(np.int32) * mask
        types = ((positions >= lengths[:, None] // 2) & (mask == 1)).astype(np.int32)
        batches.append((ids, mask, types))
    return batches


@pytest.fixture(scope="module")
def exported_relative_classifier(tmp_path_factory):
    model = tiny_classifier("relative")
    wrapper = inference_wrapper(model, "classifier")
    path = export_mindir(wrapper, tmp_path_factory.mktemp("relative") / "classifier")
    return model, wrapper, path


def test_relative_classifier_reloads_with_parity_on_three_shapes(exported_relative_classifier):
    model, wrapper, path = exported_relative_classifier
    assert path.name == "classifier.mindir" and stat.S_IMODE(path.stat().st_mode) == 0o400
    report = verify_mindir(path, wrapper, random_inputs(), atol=TOLERANCE)
    assert set(report.max_differences) == set(DEFAULT_VERIFY_SHAPES)
    assert report.worst <= TOLERANCE
    assert report.output_shapes == {(1, 7): (1, 3), (4, 23): (4, 3), (3, 64): (3, 3)}
    # The file is the fp32 parameters plus a small graph.
    assert report.parameter_bytes <= report.file_bytes <= report.parameter_bytes + 200_000
    names = mindir_input_names(path)
    assert [name.rsplit(":", 1)[-1] for name in names] == list(INPUT_NAMES)


def test_absolute_encoder_hidden_state_reloads_with_parity(tmp_path):
    backbone = NezhaModel(tiny_config("absolute"))
    wrapper = inference_wrapper(backbone, "encoder", "last_hidden_state")
    path = export_mindir(wrapper, tmp_path / "encoder.mindir")  # a stem given with its suffix names the same file
    assert path == tmp_path / "encoder.mindir"
    report = verify_mindir(path, wrapper, random_inputs(seed=1), atol=TOLERANCE)
    assert report.worst <= TOLERANCE
    assert report.output_shapes[(4, 23)] == (4, 23, 16)


def test_re_export_over_a_read_only_file_replaces_it(tmp_path):
    first = inference_wrapper(tiny_classifier(seed=1), "classifier")
    second = inference_wrapper(tiny_classifier(seed=2), "classifier")
    stem = tmp_path / "model"
    path = export_mindir(first, stem)
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert export_mindir(second, stem) == path
    inputs = random_inputs(((2, 9),))
    verify_mindir(path, second, inputs, atol=TOLERANCE)  # the new weights are in the file
    with pytest.raises(ExportError):
        verify_mindir(path, first, inputs, atol=TOLERANCE)
    with pytest.raises(ExportError, match="already exists"):
        export_mindir(second, stem, overwrite=False)


def test_tolerance_failure_names_the_difference_and_the_shape(exported_relative_classifier):
    model, _, path = exported_relative_classifier
    perturbed = tiny_classifier("relative", seed=0)
    weights = cell_weights(model)
    weights["classifier.weight"] = weights["classifier.weight"] + 0.05
    load_weights(perturbed, weights)
    with pytest.raises(ExportError) as error:
        verify_mindir(path, ClassifierForExport(perturbed), random_inputs(), atol=1e-4)
    message = str(error.value)
    assert str(path) in message and "max |diff|" in message and "> atol 0.0001" in message
    for shape in DEFAULT_VERIFY_SHAPES:
        assert f"input shape {shape}" in message


def test_differences_treat_nan_and_shape_mismatch_as_failures():
    ones = np.ones((2, 3), np.float32)
    assert max_abs_difference(ones, ones + 0.5) == pytest.approx(0.5)
    assert max_abs_difference(ones, np.full((2, 3), np.nan, np.float32)) == float("inf")
    assert max_abs_difference(np.full((2, 3), np.nan, np.float32), np.full((2, 3), np.nan, np.float32)) == float("inf")
    assert max_abs_difference(ones, np.ones((3, 2), np.float32)) == float("inf")


@pytest.mark.parametrize("name, character, part", [
    ("out/my model", "' '", "file name"),
    ("模型/model", "'模'", "directory"),
    ("out/model\n", "'\\n'", "file name"),
])
def test_bad_file_names_are_rejected_before_export(tmp_path, name, character, part):
    with pytest.raises(ExportError) as error:
        export_mindir(ClassifierForExport(tiny_classifier()), str(tmp_path) + "/" + name)
    message = str(error.value)
    assert character in message and f"in the {part}" in message
    assert not any(tmp_path.iterdir())  # nothing written
    assert validate_file_name("out/model-1.2_x@y") == "out/model-1.2_x@y"


def test_lite_files_use_the_documented_flags(tmp_path):
    names = ["graph_7:input_ids", "graph_7:attention_mask", "graph_7:token_type_ids"]
    files = lite.write_lite_files(tmp_path / "m.mindir", names, quant="dynamic8", npu_shape=(2, 32),
                                  notes=["max |diff| 0"])
    assert files.config.read_text() == ("[cpu_option_cfg_param]\narchitecture=ARM64\ninstruction=SIMD_DOT\n\n"
                                        "[common_quant_param]\nquant_type=DYNAMIC_QUANT\nbit_num=8\n")
    script = files.converter_script.read_text()
    assert ("converter_lite --fmk=MINDIR --modelFile=m.mindir --outputFile=m_cpu --optimize=general "
            "--configFile=m.lite.cfg\n") in script
    assert ("converter_lite --fmk=MINDIR --modelFile=m.mindir --outputFile=m_npu --optimize=general "
            "'--inputShape=graph_7:input_ids:2,32;graph_7:attention_mask:2,32;graph_7:token_type_ids:2,32'\n"
            ) in script
    assert os.access(files.converter_script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(files.converter_script)]).returncode == 0
    # Without converter_lite the script stops with a pointer to the docs instead of a bare "command not found".
    run = subprocess.run(["bash", str(files.converter_script)], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 1 and "converter_lite not found" in run.stderr
    notes = files.deploy_notes.read_text()
    for expected in ("./benchmark --device=CPU --modelFile=m_cpu.ms", "./benchmark --device=NPU --modelFile=m_npu.ms",
                     "static shapes", "max |diff| 0", "DYNAMIC_QUANT"):
        assert expected in notes
    assert files.config.name == "m.lite.cfg" and files.deploy_notes.name == "m.DEPLOY.md"

    plain = lite.write_lite_files(tmp_path / "m.mindir", names)
    assert "[common_quant_param]" not in plain.config.read_text()
    with pytest.raises(ExportError, match="lite quantization"):
        lite.write_lite_files(tmp_path / "m.mindir", names, quant="int4")


def run_command(argv):
    parser = argparse.ArgumentParser(prog="msnc")
    commands.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_export_command_on_a_saved_classifier_directory(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model = tiny_classifier()
    save_model_dir(model, model_dir, tiny_config("relative"))
    words = ["the", "film", "was", "a", "model", "story", "phone", "今", "天"]
    (model_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    assert run_command(["export", "--model", str(model_dir), "--output", str(tmp_path / "out" / "tiny"),
                        "--lite-quant", "dynamic8"]) == 0
    output = capsys.readouterr().out
    assert "(classifier;" in output and "file size" in output and "fp32 parameters" in output
    for shape in ("(1, 7)", "(4, 23)", "(3, 64)"):
        assert f"input {shape}" in output
    for name in ("tiny.mindir", "tiny.converter.sh", "tiny.lite.cfg", "tiny.DEPLOY.md"):
        assert (tmp_path / "out" / name).is_file()
    assert "DYNAMIC_QUANT" in (tmp_path / "out" / "tiny.lite.cfg").read_text()
    assert "max |diff| reloaded file vs Cell" in (tmp_path / "out" / "tiny.DEPLOY.md").read_text()

    # Again over the read-only file, unchecked: the summary and DEPLOY.md must say the check was skipped.
    assert run_command(["export", "--model", str(model_dir), "--output", str(tmp_path / "out" / "tiny"),
                        "--no-verify", "--npu-shape", "1,32"]) == 0
    assert "not checked (--no-verify)" in capsys.readouterr().out
    notes = (tmp_path / "out" / "tiny.DEPLOY.md").read_text()
    assert "reload check skipped" in notes and "max |diff|" not in notes
    assert ":1,32'" in (tmp_path / "out" / "tiny.converter.sh").read_text()
    assert "[common_quant_param]" not in (tmp_path / "out" / "tiny.lite.cfg").read_text()


def test_export_command_refuses_impossible_requests_before_exporting(tmp_path):
    backbone_dir = tmp_path / "backbone"
    save_model_dir(NezhaModel(tiny_config("relative")), backbone_dir, tiny_config("relative"))
    with pytest.raises(ExportError, match="kind classifier needs a NezhaForSequenceClassification"):
        commands.export_model(backbone_dir, tmp_path / "out", kind="classifier")
    with pytest.raises(ExportError, match="no vocab.txt or spm.model"):
        commands.export_model(backbone_dir, tmp_path / "out")
    with pytest.raises(ExportError, match="character ' '"):
        commands.export_model(backbone_dir, tmp_path / "my model")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["backbone"]


def test_real_minilm_encoder_export_reproduces_the_model(minilm_path, tmp_path):
    summary = commands.export_model(minilm_path, tmp_path / "minilm", log=lambda message: None)
    assert summary.kind == "encoder"
    assert set(summary.verify.max_differences) == set(DEFAULT_VERIFY_SHAPES)
    assert summary.verify.worst <= 1e-4, summary.verify.max_differences
    assert summary.verify.output_shapes[(3, 64)] == (3, 384)
    # fp32 MiniLM: 22.7M parameters, 90.9 MB; the graph adds well under 1 MB.
    assert 90_000_000 < summary.parameter_bytes <= summary.file_bytes < summary.parameter_bytes + 1_000_000
