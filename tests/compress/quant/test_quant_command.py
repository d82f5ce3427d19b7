"""`msnc quantize` end to end on a tiny task (graph mode): QAT with distillation -> best-dev convert -> packed model
directory -> MindIR reloaded and equal to the fake-quant model -> byte-exact size report; a kill -9 during QAT
resumes to identical files; a finished run is skipped; the PTQ baseline; config errors name the key.

References are independent of the package: stored codes are decoded with numpy bit arithmetic and compared with the
numpy twins of the quantizers (quant_twins.py) applied to the latent / teacher weights; the reloaded model
directory is compared with the fake-quant student rebuilt from its latent weights."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


sys.path.insert(0, os.path.dirname(__file__))
import quant_tiny  # noqa: E402
import quant_twins  # noqa: E402

from ms_nlp_compress.cli import main as msnc  # noqa: E402
from ms_nlp_compress.compress.quant.config import QuantConfig  # noqa: E402
from ms_nlp_compress.compress.quant.prepare import prepare  # noqa: E402
from ms_nlp_compress.compress.quant.run import run_ptq, run_quantize  # noqa: E402
from ms_nlp_compress.config import load_config  # noqa: E402
from ms_nlp_compress.data.glue import get_task  # noqa: E402
from ms_nlp_compress.data.tokenization import load_tokenizer  # noqa: E402
from ms_nlp_compress.models.checkpoint import (load_model_dir, load_weights, read_model_dir,  # noqa: E402
                                               read_safetensors)
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification  # noqa: E402
from ms_nlp_compress.train.finetune import encode, predict_logits  # noqa: E402

WORKER = Path(__file__).resolve().parent / "quant_worker.py"
QUIET = dict(log=lambda message: None)
LAYER0_QUERY = "bert.encoder.layers.0.attention.self_attention.query"
WORD = "bert.embeddings.word_embeddings"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quant")
    with quant_tiny.distill_tiny.teacher_in_graph_mode(folder, quant_tiny.TEACHER_MODEL):
        yield folder


def dev_columns(folder):
    tokenizer = load_tokenizer(folder / "vocab.txt", max_length=12)
    return encode(get_task("sst2").reader(folder / "sst2" / "dev.tsv"), tokenizer, 12, False)


def unpack_2bit(stored, cols):
    """numpy twin of the documented layout: code i of a row at bits 2*(i % 4) of byte i // 4, value = code - 1."""
    stored = stored.astype(np.int64)
    fields = np.stack([(stored >> (2 * k)) & 3 for k in range(4)], axis=-1).reshape(stored.shape[0], -1)
    return fields[:, :cols] - 1


def fake_quant_from_latent(folder, output, quant):
    teacher, _ = load_model_dir(folder / "teacher" / "best")
    model = prepare(NezhaForSequenceClassification(teacher.bert.config, 2), quant)
    latent = read_safetensors(folder / output / "qat" / "best_fake_quant.safetensors")
    load_weights(model, latent, source="latent", fresh=())
    return model, latent


def test_quantize_end_to_end_codes_export_sizes_and_skip(tiny):
    config = load_config(quant_tiny.quant_config(tiny, "twn"))
    report = run_quantize(config, **QUIET)
    out = tiny / "twn"
    # QAT ran through the Distiller: every TernaryBERT term logged, the dev metric selected a best update.
    records = [json.loads(line) for line in (out / "qat" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert {"loss_embedding", "loss_hidden", "loss_attention", "loss_prediction"} <= set(train[-1])
    assert report["stages"]["qat"]["updates"] == 12 and report["stages"]["qat"]["best_update"] in (4, 8, 12)

    # best/ holds integer codes (no float encoder / word weights) that decode to TWN of the latent weights.
    document, _, stored = read_model_dir(out / "best")
    assert document["architecture"] == "QuantizedNezhaForSequenceClassification"
    assert document["update"] == report["stages"]["qat"]["best_update"]
    assert f"{LAYER0_QUERY}.weight" not in stored and f"{WORD}.embedding_table" not in stored
    model, latent = fake_quant_from_latent(tiny, "twn", config.quant)
    query = latent[f"{LAYER0_QUERY}.weight"]
    codes = stored[f"{LAYER0_QUERY}.weight_codes"]
    assert codes.dtype == np.uint8 and codes.shape == (16, 4)
    decoded = unpack_2bit(codes, 16) * stored[f"{LAYER0_QUERY}.weight_scale"].reshape(-1, 1)
    np.testing.assert_allclose(decoded, quant_twins.twn(query), rtol=1e-5, atol=1e-6)
    table = latent[f"{WORD}.embedding_table"]
    decoded = unpack_2bit(stored[f"{WORD}.embedding_codes"], 16) * stored[f"{WORD}.embedding_scale"]
    np.testing.assert_allclose(decoded, quant_twins.twn(table, per_row=True), rtol=1e-5, atol=1e-6)

    # The directory reloaded (codes validated) computes what the fake-quant student computes on real dev rows.
    columns = dev_columns(tiny)
    loaded, _ = load_model_dir(out / "best")
    np.testing.assert_allclose(predict_logits(loaded, columns, 7), predict_logits(model, columns, 7), atol=1e-4)
    accuracy = float((predict_logits(loaded, columns, 7).argmax(-1) == columns["label"]).mean())
    assert report["dev"]["acc"] == pytest.approx(accuracy)

    # The MindIR keeps the integers: < 1/4 of the fp32 file, checked against the fake-quant model, every byte
    # accounted for.
    export = json.loads((out / "export.json").read_text())
    assert export["verify"]["max_abs_difference"] <= export["verify"]["atol"]
    for key in ("mindir", "model_dir_weights"):
        size = export["size"][key]
        assert sum(size["groups"].values()) == size["file_bytes"] == os.path.getsize(size["file"])
        assert sum(size["fp32_groups"].values()) == size["fp32_file_bytes"]
        assert size["file_bytes"] * 4 < size["fp32_file_bytes"], size
    mindir = export["size"]["mindir"]
    # the word table really is 2 bits per value + one float scale per row in the file
    assert mindir["groups"]["word_embedding"] == 60000 * 16 // 4 + 60000 * 4
    print(f"\ntiny 2-2-8 MindIR {mindir['file_bytes']:,} B vs fp32 {mindir['fp32_file_bytes']:,} B: "
          f"{mindir['ratio_to_fp32']}x")

    # A finished run is skipped stage by stage and reports the same model.
    stamp = (out / "best" / "model.safetensors").stat().st_mtime_ns
    again = run_quantize(config, **QUIET)
    assert again["stages"]["qat"]["skipped"] and again["export"]["skipped"]
    assert (out / "best" / "model.safetensors").stat().st_mtime_ns == stamp
    assert again["dev"] == report["dev"]


def run_worker(config, kill_after_checkpoint=False):
    environment = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]))
    if not kill_after_checkpoint:
        result = subprocess.run([sys.executable, str(WORKER), str(config)], env=environment, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return
    victim = subprocess.Popen([sys.executable, str(WORKER), str(config)], env=environment,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = Path(load_config(config).output_dir) / "qat" / "checkpoints" / "LATEST"
    deadline = time.time() + 300
    while not pointer.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)  # right after its first checkpoint
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the worker finished before it could be killed"


def test_kill_minus_nine_during_lat_qat_resumes_to_identical_files(tiny):
    """LAT (the preconditioner refreshed from Adam's second moment after each update) with dropout on: the run
    killed after its first checkpoint and restarted writes the same codes, scales, latent weights and
    preconditioners as an uninterrupted run."""
    lat = "{preset: 2-2-8, full_precision: [classifier], encoder: {method: lat}, embedding: {method: lat}}"
    reference = quant_tiny.quant_config(tiny, "lat_reference", lat, epochs=2)
    victim = quant_tiny.quant_config(tiny, "lat_victim", lat, epochs=2)
    run_worker(reference)
    run_worker(victim, kill_after_checkpoint=True)
    assert not (tiny / "lat_victim" / "qat" / "stage.json").exists()  # killed inside QAT
    run_worker(victim)
    first = json.loads((tiny / "lat_reference" / "qat" / "stage.json").read_text())
    second = json.loads((tiny / "lat_victim" / "qat" / "stage.json").read_text())
    assert second["resumed_from"] is not None and first["resumed_from"] is None
    assert second["best_update"] == first["best_update"] and second["updates"] == first["updates"] == 24
    for name in ("best/model.safetensors", "qat/best_fake_quant.safetensors"):
        expected = read_safetensors(tiny / "lat_reference" / name)
        actual = read_safetensors(tiny / "lat_victim" / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            np.testing.assert_array_equal(actual[key], expected[key], err_msg=f"{name}: {key}")
    latent = read_safetensors(tiny / "lat_reference" / "qat" / "best_fake_quant.safetensors")
    preconditioner = latent[f"{LAYER0_QUERY}.lat_preconditioner"]
    assert preconditioner.shape == (16, 16) and np.ptp(preconditioner) > 0  # refreshed from Adam, not identity
    assert (json.loads((tiny / "lat_victim" / "results.json").read_text())["dev"]
            == json.loads((tiny / "lat_reference" / "results.json").read_text())["dev"])


def test_ptq_baseline_8_and_2_bit(tiny):
    teacher_dir = tiny / "teacher" / "best"
    teacher_weights = read_model_dir(teacher_dir)[2]
    columns = dev_columns(tiny)
    teacher, _ = load_model_dir(teacher_dir)
    teacher_logits = predict_logits(teacher, columns, 7)
    reports = {}
    for preset in ("8-8-8", "2-2-8"):
        output = f"ptq{preset[0]}"
        config = load_config(quant_tiny.quant_config(tiny, output, f"{{preset: {preset}, full_precision: "
                                                                   "[classifier]}"))
        reports[preset] = run_ptq(config, **QUIET)
        assert not (tiny / output / "qat").exists()  # no training at all
        stored = read_model_dir(tiny / output / "best")[2]
        weight = teacher_weights[f"{LAYER0_QUERY}.weight"]
        codes = stored[f"{LAYER0_QUERY}.weight_codes"]
        scale = stored[f"{LAYER0_QUERY}.weight_scale"].reshape(-1, 1)
        decoded = codes.astype(np.float64) * scale if preset == "8-8-8" else unpack_2bit(codes, 16) * scale
        twin = quant_twins.sym(weight, 8) if preset == "8-8-8" else quant_twins.twn(weight)
        np.testing.assert_allclose(decoded, twin, rtol=1e-5, atol=1e-6)
        assert reports[preset]["export"]["verify"]["max_abs_difference"] <= 2e-3
    logits8 = predict_logits(load_model_dir(tiny / "ptq8" / "best")[0], columns, 7)
    assert np.abs(logits8 - teacher_logits).max() < 0.05  # 8-bit weights and activations: close to fp32
    assert (logits8.argmax(-1) == teacher_logits.argmax(-1)).mean() >= 0.95
    sizes = {preset: report["export"]["size"]["mindir"]["file_bytes"] for preset, report in reports.items()}
    assert sizes["2-2-8"] < sizes["8-8-8"] < reports["8-8-8"]["export"]["size"]["mindir"]["fp32_file_bytes"]
    # quant.export_graph: shared: the same codes, a smaller MindIR (each packed cell's ops stored once), which
    # reloads equal to the fake-quant model; the model directory is the same bytes.
    config = load_config(quant_tiny.quant_config(tiny, "ptq2_shared", "{preset: 2-2-8, full_precision: [classifier], "
                                                                      "export_graph: shared}"))
    shared = run_ptq(config, **QUIET)["export"]
    assert shared["graph"] == "shared" and reports["2-2-8"]["export"]["graph"] == "inlined"
    assert shared["verify"]["max_abs_difference"] <= 2e-3
    assert shared["size"]["mindir"]["file_bytes"] < sizes["2-2-8"]
    inlined_dir = reports["2-2-8"]["export"]["size"]["model_dir_weights"]
    assert shared["size"]["model_dir_weights"]["groups"] == inlined_dir["groups"]


def test_quantize_latency_times_every_serving_form_against_fp32(tiny, tmp_path, capsys):
    """msnc quantize-latency: fp32 / packed / decoded / weight-only / MindIR at each batch size, ratios to fp32."""
    config = load_config(quant_tiny.quant_config(tiny, "ptq2_latency", "{preset: 2-2-8, full_precision: [classifier]}"))
    run_ptq(config, **QUIET)
    out, saved = tiny / "ptq2_latency", tmp_path / "latency.json"
    assert msnc(["quantize-latency", "--model", str(out / "best"), "--reference", str(tiny / "teacher" / "best"),
                 "--mindir", str(out / "model.mindir"), "--batch-sizes", "1,3", "--seq", "8", "--repeat", "2",
                 "--save", str(saved)]) == 0
    result = json.loads(saved.read_text())
    kinds = ("fp32", "packed", "decoded", "weightonly", "mindir")
    assert set(result["cases"]) == {f"{kind}_b{batch}" for kind in kinds for batch in (1, 3)}
    for name, ratio in result["ratio_to_fp32"].items():
        fp32 = result["cases"][f"fp32_{name.rsplit('_', 1)[1]}"]["median_ms"]
        assert ratio == pytest.approx(result["cases"][name]["median_ms"] / fp32, rel=2e-3)
    assert "weightonly_b3" in capsys.readouterr().out
    teacher = str(tiny / "teacher" / "best")  # an fp32 directory is not a quantized model: exit 2, named
    assert msnc(["quantize-latency", "--model", teacher, "--reference", teacher]) == 2
    assert "not a quantized model" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("quant.encoder.method=ternary", r"quant\.encoder\.method: must be one of"),
    ("quant.encoder.bits=3", r"quant\.encoder\.bits: method 'twn' needs 2"),
    ("quant.activation.bits=1", r"quant\.activation\.bits: must be an integer in \[2, 16\]"),
    ("quant.preset=3-3-8", r"quant\.preset: unknown preset '3-3-8'"),
    ("quant.export_graph=fused", r"quant\.export_graph: must be inlined or shared, got 'fused'"),
    ("distill.teacher=/nonexistent/teacher", r"distill\.teacher: teacher /nonexistent/teacher does not exist"),
    ("data.task=stsb", r"data\.task: stsb is a regression task"),
])
def test_config_errors_name_the_key(tiny, override, message, capsys):
    config = quant_tiny.quant_config(tiny, "bad", "{preset: 2-2-8}")
    status = msnc(["quantize", "--config", str(config), "--set", override])
    assert status == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not (tiny / "bad" / "best").exists()
