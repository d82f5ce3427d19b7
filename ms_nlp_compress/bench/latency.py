"""`msnc bench`: MindSpore graph-mode inference latency and train-step time against PyTorch eager, in one run.

Both engines get the same weights (the real MiniLM teacher when cached, else random ones of the MiniLM-L6 shape)
and the same inputs. Measurements are interleaved: each repeat times every case on MindSpore and on PyTorch back to
back (alternating which goes first), so load from other processes on a shared machine hits both alike; the report
gives medians and the MindSpore / PyTorch ratio. Nothing here asserts on time: it reports.

    msnc bench --batch-sizes 1,32 --seq 128 --train --repeat 5 --threads 2 --fusion on --output json

Threads and graph kernel fusion are process-wide MindSpore settings, so each setting is one run; `--variants`
builds several MindSpore models in the same run (kernel formulations of models/kernels.py) for ablations.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

# What a `--variants` entry builds: NezhaConfig.kernels and the CPU components it may use (models/kernels.py).
VARIANTS = {
    "fused": ("fused", ()),  # MindSpore's own kernels (ops.erf GELU, nn.LayerNorm): the baseline
    "gelu": ("cpu", ("gelu",)),  # + rational-erf exact GELU
    "layer_norm": ("cpu", ("layer_norm",)),  # + GEMM-statistics LayerNorm
    "cpu": ("cpu", ("gelu", "layer_norm")),  # both
    "auto": ("auto", ("gelu", "layer_norm")),  # the default config on this device
}

MINILM_SHAPE = dict(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                    max_position_embeddings=512, type_vocab_size=2, position_embedding="absolute",
                    layer_norm_eps=1e-12, hidden_act="gelu")


def random_hf_weights(shape: Dict, seed: int = 0) -> Dict[str, np.ndarray]:
    """HF-named random float32 weights of a BERT shape (with pooler), scaled like a trained model."""
    rng = np.random.default_rng(seed)
    hidden, inner = shape["hidden_size"], shape["intermediate_size"]

    def normal(*dims, scale=0.02):
        return (rng.standard_normal(dims) * scale).astype(np.float32)

    weights = {
        "embeddings.word_embeddings.weight": normal(shape["vocab_size"], hidden),
        "embeddings.position_embeddings.weight": normal(shape["max_position_embeddings"], hidden),
        "embeddings.token_type_embeddings.weight": normal(shape["type_vocab_size"], hidden),
        "embeddings.LayerNorm.weight": np.ones(hidden, np.float32),
        "embeddings.LayerNorm.bias": np.zeros(hidden, np.float32),
        "pooler.dense.weight": normal(hidden, hidden), "pooler.dense.bias": np.zeros(hidden, np.float32),
    }
    for layer in range(shape["num_layers"]):
        p = f"encoder.layer.{layer}."
        shapes = {"attention.self.query": (hidden, hidden), "attention.self.key": (hidden, hidden),
                  "attention.self.value": (hidden, hidden), "attention.output.dense": (hidden, hidden),
                  "intermediate.dense": (inner, hidden), "output.dense": (hidden, inner)}
        for name, (out_dim, in_dim) in shapes.items():
            weights[p + name + ".weight"] = normal(out_dim, in_dim)
            weights[p + name + ".bias"] = normal(out_dim)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            weights[p + name + ".weight"] = np.ones(hidden, np.float32)
            weights[p + name + ".bias"] = np.zeros(hidden, np.float32)
    return weights


def _weights(source: str) -> tuple:
    """(HF-named weights, description): the cached MiniLM teacher for 'real' or 'auto' when present, else random."""
    if source in ("real", "auto"):
        from ms_nlp_compress.models.checkpoint import read_safetensors
        from ms_nlp_compress.paths import minilm_dir

        path = minilm_dir() / "model.safetensors"
        if path.is_file():
            return read_safetensors(path), f"real MiniLM-L6 ({path})"
        if source == "real":
            from ms_nlp_compress.errors import MsncError
            raise MsncError(f"{path} not found: run `msnc data fetch --only minilm` or use --weights random")
    return random_hf_weights(MINILM_SHAPE), "random, MiniLM-L6 shape"


class _Timer:
    """Median seconds of `fn()` over all recorded calls."""

    def __init__(self, fn: Callable[[], None]):
        self.fn = fn
        self.samples: List[float] = []

    def run(self, calls: int) -> None:
        for _ in range(calls):
            start = time.perf_counter()
            self.fn()
            self.samples.append(time.perf_counter() - start)

    def summary(self) -> Dict:
        ms_samples = sorted(s * 1000.0 for s in self.samples)
        return {"median_ms": round(statistics.median(ms_samples), 2), "min_ms": round(ms_samples[0], 2),
                "max_ms": round(ms_samples[-1], 2), "samples": len(ms_samples)}


def forward_latency_ms(model, batch_size: int, sequence_length: int, vocab_size: int, repeat: int = 5,
                       warmup: int = 2, seed: int = 0) -> float:
    """Median milliseconds of one inference call of a loaded classifier / encoder `model` on a seeded random
    (batch_size, sequence_length) batch, after `warmup` calls (graph mode: the first compiles). The timer of
    `msnc dynabert select` and of `msnc compress`'s measurements."""
    from mindspore import Tensor

    ids = np.random.default_rng(seed).integers(1, vocab_size, (batch_size, sequence_length)).astype(np.int32)
    inputs = (Tensor(ids), Tensor(np.ones_like(ids)), Tensor(np.zeros_like(ids)))
    model.set_train(False)

    def forward():
        outputs = model(*inputs)
        (outputs[0] if isinstance(outputs, tuple) else outputs).asnumpy()  # wait for the result

    _Timer(forward).run(warmup)
    timer = _Timer(forward)
    timer.run(repeat)
    return float(timer.summary()["median_ms"])


def best_within_budget(items: Sequence, budget_ms: float, latency: Callable, accuracy: Callable,
                       size: Optional[Callable] = None):
    """The deploy rule shared by `msnc dynabert select` and `msnc compress --latency-ms`: of the `items` whose
    `latency(item)` is within `budget_ms`, the one with the best `accuracy(item)`; ties go to the faster, then to the
    smaller (`size(item)`). None when nothing fits."""
    fits = [item for item in items if latency(item) <= budget_ms]
    if not fits:
        return None
    return max(fits, key=lambda item: (accuracy(item), -latency(item), -(size(item) if size else 0)))


def _mindspore_cases(weights, variant: str, batch_sizes: Sequence[int], seq: int, train: bool, seed: int,
                     dropout_impl: str) -> Dict[str, Callable[[], None]]:
    from mindspore import Tensor

    from ms_nlp_compress.config import NezhaConfig
    from ms_nlp_compress.models.checkpoint import hf_to_native, load_weights
    from ms_nlp_compress.models.kernels import only_cpu_kernels
    from ms_nlp_compress.models.nezha import NezhaForSequenceClassification, NezhaModel
    from ms_nlp_compress.train.losses import SequenceClassificationLoss
    from ms_nlp_compress.train.optim import AdamW
    from ms_nlp_compress.train.step import TrainStep

    kernels, components = VARIANTS[variant]
    config = NezhaConfig(**MINILM_SHAPE, kernels=kernels, dropout_impl=dropout_impl)
    native, _, _ = hf_to_native(weights)
    backbone_weights = {k[len("bert."):]: v for k, v in native.items() if k.startswith("bert.")}
    rng = np.random.default_rng(seed)
    cases = {}
    with only_cpu_kernels(*components):
        model = NezhaModel(config)
        load_weights(model, backbone_weights, source="bench")
        model.set_train(False)
        for batch in batch_sizes:
            ids = rng.integers(1, config.vocab_size, (batch, seq)).astype(np.int32)
            inputs = (Tensor(ids), Tensor(np.ones_like(ids)), Tensor(np.zeros_like(ids)))

            def infer(inputs=inputs):
                model(*inputs)[0].asnumpy()
            cases[f"infer_b{batch}"] = infer
        if train:
            classifier = NezhaForSequenceClassification(config, num_labels=2)
            load_weights(classifier.bert, backbone_weights, source="bench")
            loss_cell = SequenceClassificationLoss(classifier)
            optimizer = AdamW(classifier.trainable_params(), learning_rate=2e-5, weight_decay=0.01, eps=1e-6)
            step = TrainStep(loss_cell, optimizer, max_grad_norm=1.0)
            step.set_train(True)
            batch = 32
            ids = rng.integers(1, config.vocab_size, (batch, seq)).astype(np.int32)
            labels = rng.integers(0, 2, (batch,)).astype(np.int32)
            train_inputs = (Tensor(ids), Tensor(np.ones_like(ids)), Tensor(np.zeros_like(ids)), Tensor(labels))

            def train_step():
                step(*train_inputs)
            cases["train_b32"] = train_step
    return cases


def _torch_cases(weights, config_shape: Dict, batch_sizes: Sequence[int], seq: int, train: bool,
                 seed: int) -> Dict[str, Callable[[], None]]:
    import torch

    from ms_nlp_compress.bench.torch_reference import build_torch_bert, torch_adamw

    rng = np.random.default_rng(seed)
    model = build_torch_bert(weights, config_shape["num_layers"], config_shape["num_heads"],
                             config_shape["layer_norm_eps"]).eval()
    cases = {}
    for batch in batch_sizes:
        ids = torch.from_numpy(rng.integers(1, config_shape["vocab_size"], (batch, seq)).astype(np.int64))
        inputs = (ids, torch.ones_like(ids), torch.zeros_like(ids))

        def infer(inputs=inputs):
            with torch.inference_mode():
                model(*inputs).numpy()
        cases[f"infer_b{batch}"] = infer
    if train:
        classifier = build_torch_bert(weights, config_shape["num_layers"], config_shape["num_heads"],
                                      config_shape["layer_norm_eps"], num_labels=2).train()
        optimizer = torch_adamw(classifier)
        ids = torch.from_numpy(rng.integers(1, config_shape["vocab_size"], (32, seq)).astype(np.int64))
        labels = torch.from_numpy(rng.integers(0, 2, (32,)).astype(np.int64))
        batch_inputs = (ids, torch.ones_like(ids), torch.zeros_like(ids))

        def train_step():
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(classifier(*batch_inputs), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(classifier.parameters(), 1.0)
            optimizer.step()
            loss.item()
        cases["train_b32"] = train_step
    return cases


def time_interleaved(engines: Dict[str, Dict[str, Callable[[], None]]], repeat: int,
                     calls: Callable[[str], int], log: Callable[[str], None] = lambda message: None) -> tuple:
    """Warm every case of every engine up (two calls; the first compiles), then `repeat` rounds: per case, each
    engine runs `calls(case)` timed calls back to back, the engine order reversed every other round so load from
    other processes hits all alike. Every engine must have the same cases. Returns ({engine: {case: first-call
    seconds}}, {case: {engine: summary}})."""
    case_names = list(next(iter(engines.values())))
    timers = {engine: {case: _Timer(fn) for case, fn in cases.items()} for engine, cases in engines.items()}
    compile_seconds: Dict[str, Dict[str, float]] = {}
    for engine, cases in engines.items():
        for case, fn in cases.items():
            start = time.perf_counter()
            fn()  # MindSpore: compile + first run
            compile_seconds.setdefault(engine, {})[case] = round(time.perf_counter() - start, 2)
            fn()
            log(f"warmed up {engine} {case} (first call {compile_seconds[engine][case]} s)")
    order = list(engines)
    for round_index in range(repeat):
        for case in case_names:
            for engine in (order if round_index % 2 == 0 else order[::-1]):
                timers[engine][case].run(calls(case))
        log(f"round {round_index + 1}/{repeat} done")
    return compile_seconds, {case: {engine: timers[engine][case].summary() for engine in engines}
                             for case in case_names}


def run_benchmark(batch_sizes: Sequence[int] = (1, 32), seq: int = 128, train: bool = False, repeat: int = 5,
                  threads: Optional[int] = None, fusion: bool = False, variants: Sequence[str] = ("auto",),
                  weights: str = "auto", dropout_impl: str = "stateless", use_torch: bool = True,
                  seed: int = 0, log: Callable[[str], None] = lambda message: None) -> Dict:
    """Time MindSpore graph mode (each of `variants`) and PyTorch eager on the MiniLM-L6 shape; return a dict.

    Per repeat: `infer_b1`-like cases run 10 calls per engine, batch >= 8 and `train_b32` run 1 (after 2 warm-up
    calls, the first of which compiles). Result: {"settings", "weights", "torch", "cases": {case: {engine:
    summary}}, "ratios": {case: {variant: MindSpore median / PyTorch median}}}.
    """
    import mindspore as ms

    from ms_nlp_compress.bench.torch_reference import torch_available
    from ms_nlp_compress.config import RuntimeConfig
    from ms_nlp_compress.runtime import setup_runtime

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; one of {sorted(VARIANTS)}")
    setup_runtime(RuntimeConfig(device="cpu", mode="graph", cpu_threads=threads, graph_kernel_fusion=fusion,
                                seed=seed))
    hf_weights, description = _weights(weights)
    torch_version = torch_available() if use_torch else None
    engines: Dict[str, Dict[str, Callable[[], None]]] = {}
    for variant in variants:
        log(f"building MindSpore model ({variant})")
        engines[f"mindspore:{variant}"] = _mindspore_cases(hf_weights, variant, batch_sizes, seq, train, seed,
                                                           dropout_impl)
    torch_threads = None
    if torch_version:
        import torch
        if threads:
            torch.set_num_threads(threads)
        torch_threads = torch.get_num_threads()
        engines["torch"] = _torch_cases(hf_weights, MINILM_SHAPE, batch_sizes, seq, train, seed)
    compile_seconds, cases_out = time_interleaved(
        engines, repeat, lambda case: 10 if case.startswith("infer_b") and int(case[len("infer_b"):]) < 8 else 1,
        log)
    case_names = list(cases_out)
    ratios = {}
    if torch_version:
        for case in case_names:
            reference = cases_out[case]["torch"]["median_ms"]
            ratios[case] = {engine.split(":", 1)[1]: round(cases_out[case][engine]["median_ms"] / reference, 2)
                            for engine in engines if engine != "torch"}
    return {
        "settings": {"batch_sizes": list(batch_sizes), "seq": seq, "train": train, "repeat": repeat,
                     "mindspore_threads": threads if threads else "default (25)", "torch_threads": torch_threads,
                     "graph_kernel_fusion": fusion, "variants": list(variants), "dropout_impl": dropout_impl,
                     "device_target": str(ms.get_context("device_target"))},
        "versions": {"mindspore": ms.__version__, "torch": torch_version},
        "weights": description,
        "torch": torch_version is not None,
        "first_call_s": compile_seconds,
        "cases": cases_out,
        "ratios": ratios,
    }


def format_table(result: Dict) -> str:
    """A Markdown table: one row per case, one column per engine (median ms), then the ratios to PyTorch."""
    engines = list(next(iter(result["cases"].values())))
    ms_engines = [e for e in engines if e != "torch"]
    header = ["case"] + [f"{e} ms" for e in engines] + [f"{e.split(':', 1)[1]} / torch" for e in ms_engines
                                                        if result["torch"]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case, by_engine in result["cases"].items():
        row = [case] + [f"{by_engine[e]['median_ms']:.1f}" for e in engines]
        if result["torch"]:
            row += [f"{result['ratios'][case][e.split(':', 1)[1]]:.2f}x" for e in ms_engines]
        lines.append("| " + " | ".join(row) + " |")
    settings = result["settings"]
    notes = (f"MindSpore {result['versions']['mindspore']} graph mode, threads {settings['mindspore_threads']}, "
             f"graph kernel fusion {'on' if settings['graph_kernel_fusion'] else 'off'}, seq {settings['seq']}, "
             f"dropout {settings['dropout_impl']}; weights: {result['weights']}; ")
    if result["torch"]:
        notes += f"PyTorch {result['versions']['torch']} eager, {settings['torch_threads']} threads."
    else:
        notes += "PyTorch is not installed: MindSpore numbers only (pip install torch to compare)."
    return "\n".join(lines) + "\n\n" + notes


def int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _variant_list(text: str) -> List[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in VARIANTS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"variants must be among {sorted(VARIANTS)}, got {text!r}")
    return values


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `msnc bench` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "bench", help="MindSpore vs PyTorch latency and train-step time on the MiniLM-L6 shape",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 32], help="inference batch sizes (1,32)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length (128)")
    parser.add_argument("--train", action="store_true", help="also time the train step (batch 32, AdamW)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="MindSpore op threads and torch threads (default: each engine's own default)")
    parser.add_argument("--fusion", choices=("on", "off"), default="off", help="MindSpore graph kernel fusion")
    parser.add_argument("--variants", type=_variant_list, default=["auto"],
                        help=f"MindSpore kernel variants to time in this run, among {sorted(VARIANTS)} (auto)")
    parser.add_argument("--weights", choices=("auto", "real", "random"), default="auto",
                        help="auto: the cached MiniLM teacher if present, else random weights of its shape")
    parser.add_argument("--dropout-impl", choices=("stateless", "native"), default="stateless",
                        help="MindSpore dropout in the train step (NezhaConfig.dropout_impl)")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    parser.add_argument("--models", default=None, metavar="NAME=DIR,NAME=DIR",
                        help="time saved model directories against the first one instead (bench/models.py): "
                             "e.g. teacher=runs/vader_sst2_cpu/best,student=runs/tinybert_vader_cpu/best")
    parser.add_argument("--seqs", type=int_list, default=None,
                        help="with --models: sequence lengths (default: --seq)")
    parser.add_argument("--distill", action="store_true",
                        help="with --models TEACHER,STUDENT: time the fine-tune and distillation updates")
    parser.add_argument("--train-batch", type=int, default=32, help="with --distill: the update's batch (32)")
    parser.add_argument("--no-infer", action="store_true", help="with --models: skip the inference cases")
    parser.add_argument("--output", choices=("table", "json"), default="table")
    parser.add_argument("--save", type=Path, default=None, help="also write the JSON result to this file")
    parser.set_defaults(func=run_command)
    return parser


def run_command(args) -> int:
    log = (lambda message: print(f"[bench] {message}", file=sys.stderr, flush=True))
    if args.models is not None:
        return _run_models_command(args, log)
    from ms_nlp_compress.bench.torch_reference import torch_available
    if not args.no_torch and torch_available() is None:
        log("PyTorch is not installed: reporting MindSpore numbers only (pip install torch to compare)")
    result = run_benchmark(args.batch_sizes, args.seq, args.train, args.repeat, args.threads, args.fusion == "on",
                           args.variants, args.weights, args.dropout_impl, use_torch=not args.no_torch, log=log)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) if args.output == "json" else format_table(result))
    return 0


def _run_models_command(args, log) -> int:
    from ms_nlp_compress.bench.models import format_model_table, parse_models, run_model_benchmark

    if args.train_batch <= 0:
        from ms_nlp_compress.errors import ConfigError
        raise ConfigError(f"--train-batch: must be positive, got {args.train_batch}")
    result = run_model_benchmark(parse_models(args.models), args.batch_sizes, args.seqs or [args.seq], args.repeat,
                                 args.threads, args.fusion == "on", args.distill, args.train_batch,
                                 infer=not args.no_infer, log=log)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) if args.output == "json" else format_model_table(result))
    return 0


def main(argv=None) -> int:
    """`python -m ms_nlp_compress.bench.latency ...`: the same as `msnc bench ...`."""
    parser = argparse.ArgumentParser(prog="msnc")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench"] + list(sys.argv[1:] if argv is None else argv))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
