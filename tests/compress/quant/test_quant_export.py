"""A 2-bit model exported to MindIR keeps its integers (file < 1/4 of fp32) and reloads equal to the fake-quant model."""
import os
import sys

import numpy as np
import pytest

from mindspore import Tensor

sys.path.insert(0, os.path.dirname(__file__))
from test_quant_prepare import classifier  # noqa: E402

from ms_nlp_compress.compress.quant.config import QuantConfig  # noqa: E402
from ms_nlp_compress.compress.quant.convert import convert  # noqa: E402
from ms_nlp_compress.compress.quant.prepare import prepare  # noqa: E402
from ms_nlp_compress.compress.quant.size import mindir_report, safetensors_report  # noqa: E402
from ms_nlp_compress.config import NezhaConfig  # noqa: E402
from ms_nlp_compress.export import ExportError  # noqa: E402
from ms_nlp_compress.export.mindir import export_mindir, inference_wrapper, verify_mindir  # noqa: E402
from ms_nlp_compress.models.checkpoint import save_model_dir  # noqa: E402


def small():
    return NezhaConfig(vocab_size=8000, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256,
                       max_relative_position=8, hidden_dropout=0.0, attention_dropout=0.0)


def inputs(vocab_size: int = 8000, seed: int = 0):
    """Two (ids, mask, types) batches, 1 x 7 and 3 x 12, the last row of each padded by 3 tokens."""
    rng = np.random.default_rng(seed)
    batches = []
    for size, length in ((1, 7), (3, 12)):
        ids = rng.integers(0, vocab_size, (size, length)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[-1, length - 3:] = 0
        batches.append((ids, mask, np.zeros_like(ids)))
    return batches


def test_2bit_mindir_is_under_a_quarter_of_fp32_and_reloads_equal_to_fake_quant(tmp_path, capsys):
    config = small()
    fp32 = classifier(config, seed=1)
    fp32_path = export_mindir(inference_wrapper(fp32, "classifier"), tmp_path / "fp32")
    prepared = prepare(classifier(config, seed=1), QuantConfig())
    deployed = convert(prepared)
    packed_path = export_mindir(inference_wrapper(deployed, "classifier"), tmp_path / "q2")
    report = verify_mindir(packed_path, inference_wrapper(prepared, "classifier"), inputs(), atol=1e-4)
    assert report.worst <= 1e-4
    fp32_report, packed_report = mindir_report(fp32_path), mindir_report(packed_path)
    save_model_dir(fp32, tmp_path / "fp32_dir", config)
    save_model_dir(deployed, tmp_path / "q2_dir", config)
    dir_report, fp32_dir = safetensors_report(tmp_path / "q2_dir"), safetensors_report(tmp_path / "fp32_dir")
    with capsys.disabled():
        print("\nMindIR 2-2-8 vs fp32 (tiny config):\n  " + "\n  ".join(packed_report.table(fp32_report)))
        print("model dir 2-2-8 vs fp32 (tiny config):\n  " + "\n  ".join(dir_report.table(fp32_dir)))
    assert packed_report.file_bytes * 4 < fp32_report.file_bytes
    assert dir_report.file_bytes * 4 < fp32_dir.file_bytes
    for report_ in (fp32_report, packed_report, dir_report, fp32_dir):
        assert sum(report_.groups.values()) == report_.file_bytes  # byte-exact accounting
    # The word embedding really is stored at 2 bits (+ one float scale per row) in the file.
    assert packed_report.groups["word_embedding"] == 8000 * 128 // 4 + 8000 * 4
    assert packed_report.groups["encoder_weights"] < fp32_report.groups["encoder_weights"] / 10


def test_reload_check_fails_loudly_when_the_file_differs_from_the_fake_quant_model(tmp_path):
    config = small()
    prepared = prepare(classifier(config, seed=1), QuantConfig())
    deployed = convert(prepared)
    path = export_mindir(inference_wrapper(deployed, "classifier"), tmp_path / "q2")
    other = prepare(classifier(config, seed=2), QuantConfig())  # different weights
    with pytest.raises(ExportError, match="does not reproduce"):
        verify_mindir(path, inference_wrapper(other, "classifier"), inputs(), atol=1e-4)
