"""2 CPU ranks under msrun: the low-bit exchange equals a numpy simulation of both ranks' codes exactly, ranks
stay bit-identical through Trainer updates, and a rank that dies fails the launch instead of hanging."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import lowbit_twin as twin
from ms_nlp_compress.parallel.lowbit import GRADIENT_NOISE_SITE

WORKER = Path(__file__).resolve().parent / "lowbit_worker.py"
SIZES = [35, 13, 72, 1]  # lowbit_worker.SHAPES


def launch(tmp_path, *worker_args, port, timeout=420):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    command = [os.path.join(os.path.dirname(sys.executable), "msrun"), "--worker_num=2", "--local_worker_num=2",
               "--master_addr=127.0.0.1", f"--master_port={port}", f"--log_dir={tmp_path / 'logs'}", "--join=True",
               "--cluster_time_out=90", str(WORKER), *worker_args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def logs(tmp_path):
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in (tmp_path / "logs").glob("worker_*.log"))


def test_exchange_matches_twin_and_ranks_stay_identical(tmp_path):
    result = launch(tmp_path, str(tmp_path / "out"), "exchange", port=8241)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + logs(tmp_path)
    records = [dict(np.load(tmp_path / "out" / f"exchange_{rank}.npz")) for rank in (0, 1)]

    # reducer 1: 2-bit, one scale per tensor, clip 3 std, error feedback, three calls
    residuals = [np.zeros(sum(SIZES), np.float32) for _ in (0, 1)]
    for call in range(3):
        flats, scales, noises = [], [], []
        for rank, record in enumerate(records):
            flats.append(record[f"tensor2_grads_{call}"] + residuals[rank])
            scales.append(record[f"tensor2_scales_{call}"])
            np.testing.assert_allclose(scales[-1], twin.reference_scales(flats[-1], SIZES, 3.0), rtol=2e-6)
            noises.append(twin.stream_uniforms(0, rank, GRADIENT_NOISE_SITE, call + 1, sum(SIZES)))
        assert not np.array_equal(noises[0], noises[1])  # the ranks' rounding noise is independent
        expected, own = twin.exchange_mean(flats, scales, noises, SIZES, 2)
        for rank, record in enumerate(records):
            np.testing.assert_array_equal(record[f"tensor2_mean_{call}"], expected, err_msg=f"call {call} rank {rank}")
            residuals[rank] = flats[rank] - own[rank]

    # reducer 2: 3-bit (10 codes per word), buckets of 64 (121 entries -> 2 buckets, zero padded), no feedback
    padded = 128
    flats = [np.concatenate([r["bucket3_grads_0"], np.zeros(padded - 121, np.float32)]) for r in records]
    scales = [r["bucket3_scales_0"] for r in records]
    for flat, scale in zip(flats, scales):
        np.testing.assert_allclose(scale, twin.reference_scales(flat, [64, 64], 3.0), rtol=2e-6)
    # its stream is a new RandomStream at the same site: its first draw
    noises = [twin.stream_uniforms(0, rank, GRADIENT_NOISE_SITE, 1, padded) for rank in (0, 1)]
    expected, _ = twin.exchange_mean(flats, scales, noises, [64, 64], 3)
    for record in records:
        np.testing.assert_array_equal(record["bucket3_mean_0"], expected[:121])

    # scheme 2 (sharded): the owners' SGD on the exactly reproduced mean gradient, then TWN per 64-bucket
    shard_records = [dict(np.load(tmp_path / "out" / f"sharded_{rank}.npz")) for rank in (0, 1)]
    master = np.concatenate([shard_records[0]["initial"], np.zeros(padded - 121, np.float32)])
    for call in range(2):
        flats = [np.concatenate([r[f"grads_{call}"], np.zeros(padded - 121, np.float32)]) for r in shard_records]
        scales = [r[f"scales_{call}"] for r in shard_records]
        for flat, scale in zip(flats, scales):
            np.testing.assert_allclose(scale, twin.reference_scales(flat, [64, 64], 3.0), rtol=2e-6)
        noises = [twin.stream_uniforms(0, rank, GRADIENT_NOISE_SITE, call + 1, padded) for rank in (0, 1)]
        mean, _ = twin.exchange_mean(flats, scales, noises, [64, 64], 4)
        master = (master - np.float32(0.1) * mean).astype(np.float32)
        expected = twin.twn_buckets(master, 64)[:121]
        for rank, record in enumerate(shard_records):
            got = record[f"weights_{call}"]
            np.testing.assert_array_equal(got == 0, expected == 0, err_msg=f"TWN zeros, call {call} rank {rank}")
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0, err_msg=f"call {call} rank {rank}")
    for rank, record in enumerate(shard_records):  # each owner holds the fp32 master of its own bucket, exactly
        np.testing.assert_array_equal(record["master"], master[64 * rank:64 * (rank + 1)])
    np.testing.assert_array_equal(shard_records[0]["weights_1"], shard_records[1]["weights_1"])
    assert len(np.unique(np.abs(shard_records[0]["weights_1"][:64]))) == 2  # ternary: 0 and one alpha per bucket

    # Trainer with the low-bit reducer: the ranks hold bit-identical weights after 4 updates, which moved
    ranks = [dict(np.load(tmp_path / "out" / f"train_{rank}.npz")) for rank in (0, 1)]
    initial = dict(np.load(tmp_path / "out" / "initial_0.npz"))
    moved = 0
    for name in ranks[0]:
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=f"ranks differ on {name}")
        moved += np.abs(ranks[0][name] - initial[name]).max() > 1e-3
    assert moved >= len(ranks[0]) // 2
    stats = [json.loads((tmp_path / "out" / f"comm_{rank}.json").read_text()) for rank in (0, 1)]
    assert stats[0] == stats[1]
    assert stats[0]["comm_fp32_exchanges"] == 1 and stats[0]["comm_lowbit_exchanges"] == 3
    per_step = stats[0]["comm_bytes_per_lowbit_step"]
    assert per_step * 10 < stats[0]["comm_bytes_per_fp32_step"]  # 2-bit codes + a scale per 256 entries
    assert stats[0]["comm_bytes_sent"] == stats[0]["comm_bytes_per_fp32_step"] + 3 * per_step
    # the Trainer logs the exchange counters with each train record (rank 0 writes metrics.jsonl)
    logged = [json.loads(line) for line in (tmp_path / "out" / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [record for record in logged if record["type"] == "train"]
    assert [record["update"] for record in logged] == [4]  # log_every 10: the last update is logged
    assert logged[-1]["comm_exchanges"] == 4 and logged[-1]["comm_bytes_sent"] == stats[0]["comm_bytes_sent"]


def test_a_rank_dying_mid_exchange_fails_the_launch(tmp_path):
    started = time.time()
    result = launch(tmp_path, str(tmp_path / "out"), "die", port=8242, timeout=300)
    assert result.returncode != 0
    assert "rank 1 fails on purpose after exchange 1" in logs(tmp_path)
    assert not (tmp_path / "out" / "exchange_0.npz").exists()  # rank 0 never got past the broken exchange
    assert time.time() - started < 300
