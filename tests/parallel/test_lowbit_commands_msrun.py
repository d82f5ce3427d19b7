"""`msnc distill task` and `msnc quantize` on 2 msrun ranks with a `comm:` section (one launch, three commands,
through tests/parallel/lowbit_commands_worker.py which only records).

- `msnc quantize` with LAT and `comm.scheme: sharded`: refused on both ranks with a ConfigError naming
  `comm.scheme`, before any update (LAT reads Adam's second moments, which the sharded owners keep).
- `msnc distill task` (stage 1 then stage 2, 3 updates each) with the sharded scheme, 4-bit gradients, buckets of
  64, fp32 weights: both ranks end each stage with bit-identical students equal to rank 0's checkpoint, the frozen
  teacher is bit for bit the fine-tuned file, the logged byte counters equal the packed sizes of the scheme's
  formula for the trained parameter count (computed here from the checkpointed tensors), the student moved.
- `msnc quantize` (2-2-8 TWN) with the all-gather scheme, 4-bit gradients: best/, model.mindir and a passed
  reload check in export.json; ranks bit-identical and equal to rank 0's checkpoint; the teacher untouched; the
  byte counters equal the all-gather reducer's packed sizes.
- `msnc quantize` (2-2-8 TWN) with the sharded scheme (4-bit gradients, buckets of 64, fp32 masters gathered): the
  same checks, the bytes from the sharded formula; the owners' AdamW replaces the command's optimizer.

The tiny teacher is distill_tiny's (2 layers of 16, 17-word vocabulary), fine-tuned in this process first.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "compress" / "distill"))
sys.path.insert(0, str(TESTS / "compress" / "quant"))
import distill_tiny  # noqa: E402
import quant_tiny  # noqa: E402

from ms_nlp_compress.models.checkpoint import read_model_dir, read_safetensors  # noqa: E402

WORKER = Path(__file__).resolve().parent / "lowbit_commands_worker.py"
BUCKET, BITS = 64, 4
STAGE_UPDATES, QAT_UPDATES = 3, 4
SHARDED = f"comm: {{scheme: sharded, gradient_bits: {BITS}, bucket_size: {BUCKET}, weight_bits: null}}"
ALLGATHER = f"comm: {{scheme: allgather, gradient_bits: {BITS}}}"


def distill_config(folder: Path) -> Path:
    path = folder / "distill_sharded.yaml"
    path.write_text(f"""
output_dir: {folder / 'distill_sharded'}
{distill_tiny.RUNTIME}
data: {{task: sst2, data_dir: {folder / 'sst2'}, max_length: 12, batch_size: 8, eval_batch_size: 7}}
train: {{learning_rate: 0.01, warmup_ratio: 0.1, log_every: 1}}
distill:
  teacher: {folder / 'teacher' / 'best'}
  student: null
  student_model: {distill_tiny.STUDENT_MODEL}
  student_init: teacher_layers
  intermediate_train: {{max_steps: {STAGE_UPDATES}, save_every: 1, learning_rate: 0.01}}
  prediction_train: {{max_steps: {STAGE_UPDATES}, save_every: 1, eval_every: {STAGE_UPDATES}, learning_rate: 0.01}}
{SHARDED}
""")
    return path


def msrun(root: Path, commands, port: int):
    """msrun with 2 ranks of the recording worker; `commands` are msnc argument lists (run one after another)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    arguments = []
    for command in commands:
        arguments += (["::"] if arguments else []) + list(command) + ["--set", "parallel.world_size=2"]
    command = [os.path.join(os.path.dirname(sys.executable), "msrun"), "--worker_num=2", "--local_worker_num=2",
               "--master_addr=127.0.0.1", f"--master_port={port}", f"--log_dir={root / 'logs'}",
               "--join=True", "--cluster_time_out=90", str(WORKER), str(root / "record"), *arguments]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    logs = "\n".join(p.read_text(errors="replace")[-4000:] for p in (root / "logs").glob("worker_*.log"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + logs
    return logs


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """The fine-tuned tiny teacher, then ONE launch of four commands: quantize with LAT + sharded (refused),
    distill task with the sharded scheme, quantize (TWN) with the all-gather scheme, then with the sharded one."""
    with distill_tiny.teacher_in_graph_mode(tmp_path_factory.mktemp("lowbit_commands")) as root:
        lat = quant_tiny.quant_config(root, "quant_lat", quant="{preset: 2-2-8, encoder: {method: lat}}",
                                      extra=SHARDED)
        twn = quant_tiny.quant_config(root, "quant_allgather", extra=ALLGATHER)
        twn_sharded = quant_tiny.quant_config(root, "quant_sharded", extra=SHARDED)
        msrun(root, [["quantize", "--config", str(lat)],
                     ["distill", "task", "--config", str(distill_config(root))],
                     ["quantize", "--config", str(twn), "--set", f"train.max_steps={QAT_UPDATES}",
                      "--set", "train.log_every=1"],
                     ["quantize", "--config", str(twn_sharded), "--set", f"train.max_steps={QAT_UPDATES}",
                      "--set", "train.log_every=1"]], port=8291)
        yield root


def recorded(root: Path, command: int, name: str):
    return [dict(np.load(root / "record" / str(command) / f"{name}_{rank}.npz")) for rank in (0, 1)]


def status(root: Path, command: int):
    return [json.loads((root / "record" / str(command) / f"status_{rank}.json").read_text()) for rank in (0, 1)]


def assert_identical(first, second, what):
    assert first.keys() == second.keys(), what
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=f"{what}: {name}")


def train_records(path: Path):
    return [entry for entry in map(json.loads, path.read_text().splitlines()) if entry["type"] == "train"]


def weights(tensors, prefix: str = ""):
    """The float tensors (the weights; the dropout streams' int counters are not) named without `prefix`."""
    assert all(name.startswith(prefix) for name in tensors), (prefix, sorted(tensors)[:3])
    return {name[len(prefix):]: value for name, value in tensors.items() if value.dtype.kind == "f"}


def assert_teacher_untouched(root: Path, command: int, fit: int):
    """The distiller's frozen teacher after the fit, on both ranks, is the fine-tuned file bit for bit."""
    saved = read_model_dir(root / "teacher" / "best")[2]
    for rank, teacher in enumerate(recorded(root, command, f"fit{fit}_teacher")):
        assert_identical(weights(teacher, "teacher.cell."), saved, f"teacher rank {rank}")


def sharded_bytes(total: int) -> int:
    """One update of the sharded scheme at 2 ranks, 4-bit gradients, buckets of 64, fp32 weights."""
    groups = -(-total // (2 * BUCKET)) * 2  # whole buckets per owner rank
    padded = groups * BUCKET
    gradient = 4 * -(-padded // (32 // BITS)) + 4 * groups  # int32 words of 4-bit codes + one scale a bucket
    weight = 4 * padded // 2  # each owner's fp32 master shard (weight_bits null)
    return gradient + weight + 8  # + the 2-float overflow-verdict all-reduce


def test_lat_with_sharded_scheme_is_refused_naming_comm_scheme(launch):
    """Refused on both ranks alike (neither hangs), as a ConfigError (exit status 2) naming comm.scheme, before
    any Trainer.fit."""
    for rank, answer in enumerate(status(launch, 0)):
        assert answer["status"] == 2, answer
        assert "msnc: error: comm.scheme: with scheme sharded" in answer["stderr"], answer["stderr"]
        assert "LAT" in answer["stderr"]
    assert not list((launch / "record" / "0").glob("fit*"))
    assert not (launch / "quant_lat" / "qat" / "checkpoints").exists()


def test_distill_task_sharded_ranks_agree_teacher_frozen_bytes_match(launch):
    root, out = launch, launch / "distill_sharded"
    assert [answer["status"] for answer in status(root, 1)] == [0, 0]
    for fit, stage in enumerate(("stage1_intermediate", "stage2_prediction")):
        initial = [weights(tensors, "student.") for tensors in recorded(root, 1, f"fit{fit}_initial")]
        finals = [weights(tensors, "student.") for tensors in recorded(root, 1, f"fit{fit}_final")]
        assert_identical(finals[0], finals[1], f"{stage} ranks")
        # rank 0 checkpointed what both ranks hold: the student (stage 1: cell 0 of the student and its
        # hidden-state projection)
        checkpoint = weights(read_safetensors(out / stage / "checkpoints" / f"step-{STAGE_UPDATES:07d}" /
                                              "model.safetensors"))
        student = {name.split(".", 1)[1] if fit == 0 else name: value for name, value in checkpoint.items()
                   if fit == 1 or name.startswith("0.")}
        assert_identical(finals[1], student, f"{stage} rank 1 vs rank 0's checkpoint")
        assert (len(checkpoint) > len(student)) == (fit == 0)  # stage 1 also trains the projection
        moved = max(float(np.abs(finals[0][name] - initial[0][name]).max()) for name in initial[0])
        assert moved > 1e-3, (stage, moved)
        assert_teacher_untouched(root, 1, fit)

        # bytes: the scheme's formula for the trained parameter count (every checkpointed weight is trained)
        per_update = sharded_bytes(sum(value.size for value in checkpoint.values()))
        logged = train_records(out / stage / "metrics.jsonl")
        assert [entry["update"] for entry in logged] == list(range(1, STAGE_UPDATES + 1))
        for entry in logged:
            assert entry["comm_bytes_sent"] == entry["update"] * per_update, (stage, entry)
            assert entry["comm_lowbit_exchanges"] == entry["update"] and entry["comm_fp32_exchanges"] == 0
    assert (out / "best").is_dir() and (out / "results.json").is_file()


@pytest.mark.parametrize("scheme", ["allgather", "sharded"])
def test_quantize_exports_and_ranks_agree(launch, scheme):
    command = {"allgather": 2, "sharded": 3}[scheme]
    root, out = launch, launch / f"quant_{scheme}"
    assert [answer["status"] for answer in status(root, command)] == [0, 0]
    assert (out / "best" / "model.safetensors").is_file()
    export = json.loads((out / "export.json").read_text())
    mindir = Path(export["size"]["mindir"]["file"])
    assert mindir.name == "model.mindir" and mindir.is_file() and mindir.parent == out
    assert export["verify"]["max_abs_difference"] <= export["verify"]["atol"], export["verify"]
    initial = [weights(tensors, "student.") for tensors in recorded(root, command, "fit0_initial")]
    finals = [weights(tensors, "student.") for tensors in recorded(root, command, "fit0_final")]
    assert_identical(finals[0], finals[1], "quantize ranks")  # the latent (fake-quant) weights
    checkpoint = weights(read_safetensors(out / "qat" / "checkpoints" / f"step-{QAT_UPDATES:07d}" /
                                          "model.safetensors"))
    assert_identical(finals[1], checkpoint, "rank 1 vs rank 0's checkpoint")
    moved = max(float(np.abs(finals[0][name] - initial[0][name]).max()) for name in initial[0])
    assert moved > 1e-4, moved
    assert_teacher_untouched(root, command, 0)
    trained = list(checkpoint.values())
    total = sum(value.size for value in trained)
    if scheme == "allgather":  # one scale per gradient tensor (bucket_size 0), 4-bit codes 8 per word, no padding
        per_update = 4 * -(-total // (32 // BITS)) + 4 * len(trained)
    else:
        per_update = sharded_bytes(total)
    logged = train_records(out / "qat" / "metrics.jsonl")
    assert [entry["update"] for entry in logged] == list(range(1, QAT_UPDATES + 1))
    for entry in logged:
        assert entry["comm_bytes_sent"] == entry["update"] * per_update, entry
