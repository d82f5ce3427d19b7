"""`msnc quantize` (TernaryBERT / 8-bit, compress/quant/run.py) and `msnc quantize-latency`.

    msnc quantize --config X.yaml [--set k=v ...] [--no-resume] [--atol 2e-3]   QAT + distillation -> packed model
    msnc quantize --ptq --config X.yaml [--set quant.preset=8-8-8]              post-training baseline, no training
    msnc quantize-latency --model RUN/best --reference TEACHER_DIR [--mindir RUN/model.mindir]
                          [--batch-sizes 1,32] [--seq 64] [--repeat 5] [--threads N]

`quantize-latency` times, interleaved in one process (so the ratios compare like with like on a shared machine),
the fp32 reference classifier, the packed model (codes unpacked in the graph on every call), the same model decoded
once at load (`convert.decode`: fp32 weights, activation quantizers kept: the same outputs), the weight-only serving
form (`decode(activations=False)`: the fp32 graph over the decoded weights, other outputs) and, with --mindir, the
exported file run through `nn.GraphCell`. Timing is `bench.latency`'s median of interleaved rounds after a warm-up
(compile) call.
MindSpore is imported inside the commands, so `msnc --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ms_nlp_compress.bench.latency import int_list
from ms_nlp_compress.errors import ConfigError


def run_quantize_command(args: argparse.Namespace) -> int:
    from ms_nlp_compress.compress.quant.run import run_ptq, run_quantize
    from ms_nlp_compress.config import load_config

    config = load_config(args.config, args.overrides)
    if args.ptq:
        report = run_ptq(config, atol=args.atol)
    else:
        report = run_quantize(config, resume=not args.no_resume, atol=args.atol)
    print(json.dumps({key: report.get(key) for key in ("kind", "dev", "test", "best_dir")}, indent=2))
    return 0


def latency_cases(model_dir: Path, reference_dir: Path, mindir: Optional[Path], batch_sizes: Sequence[int],
                  seq: int, seed: int = 0) -> Dict[str, object]:
    """{case name: () -> None} for fp32 / packed / decoded / weightonly (/ MindIR) at each batch size, on the same
    token ids. weightonly: decoded without the activation quantizers (`convert.decode(activations=False)`)."""
    import mindspore as ms
    from mindspore import Tensor, nn

    import ms_nlp_compress.compress.quant.convert as convert_module
    from ms_nlp_compress.export.mindir import dynamic_input_specs
    from ms_nlp_compress.models.checkpoint import load_model_dir

    packed, document = load_model_dir(model_dir)
    if "quant" not in document:
        raise ConfigError(f"--model: {model_dir} holds a {document.get('architecture')}, not a quantized model "
                          "(msnc quantize writes one to <output_dir>/best)")
    decoded = convert_module.decode(load_model_dir(model_dir)[0])
    weight_only = convert_module.decode(load_model_dir(model_dir)[0], activations=False)
    reference, _ = load_model_dir(reference_dir)
    models = {"fp32": reference, "packed": packed, "decoded": decoded, "weightonly": weight_only}
    if mindir is not None:
        if not mindir.is_file():
            raise ConfigError(f"--mindir: {mindir} is not a file")
        graph = nn.GraphCell(ms.load(str(mindir)))
        graph.set_inputs(*dynamic_input_specs())  # one compile for every shape (needed by shared-function files)
        models["mindir"] = graph
    config = packed.bert.config
    rng = np.random.default_rng(seed)
    cases = {}
    for name, model in models.items():
        model.set_train(False)
    for batch in batch_sizes:
        ids = rng.integers(1, config.vocab_size, (batch, seq)).astype(np.int32)
        inputs = (Tensor(ids), Tensor(np.ones_like(ids)), Tensor(np.zeros_like(ids)))
        for name, model in models.items():
            def call(model=model, inputs=inputs):
                output = model(*inputs)
                (output[0] if isinstance(output, (tuple, list)) else output).asnumpy()
            cases[f"{name}_b{batch}"] = call
    return cases


def run_latency(model_dir: Path, reference_dir: Path, mindir: Optional[Path] = None,
                batch_sizes: Sequence[int] = (1, 32), seq: int = 64, repeat: int = 5,
                threads: Optional[int] = None, log=print) -> Dict:
    """Median ms per case over `repeat` interleaved rounds (one warm-up call each first) and ratios to fp32."""
    import mindspore as ms

    from ms_nlp_compress.bench.latency import _Timer

    ms.set_context(mode=ms.GRAPH_MODE)
    if threads:
        ms.device_context.cpu.op_tuning.threads_num(threads)
    cases = latency_cases(model_dir, reference_dir, mindir, batch_sizes, seq)
    timers = {name: _Timer(call) for name, call in cases.items()}
    for name, call in cases.items():
        log(f"warm-up (compile) {name}")
        call()
    for _ in range(repeat):
        for timer in timers.values():
            timer.run(1)
    result = {"model": str(model_dir), "reference": str(reference_dir), "seq": seq, "repeat": repeat,
              "threads": threads, "cases": {name: timer.summary() for name, timer in timers.items()}}
    ratios = {}
    for name, summary in result["cases"].items():
        kind, batch = name.rsplit("_", 1)
        if kind != "fp32":
            ratios[name] = round(summary["median_ms"] / result["cases"][f"fp32_{batch}"]["median_ms"], 3)
    result["ratio_to_fp32"] = ratios
    return result


def format_latency(result: Dict) -> str:
    lines = [f"{'case':<16}{'median ms':>11}{'min':>9}{'max':>9}{'x fp32':>9}"]
    for name, summary in result["cases"].items():
        ratio = result["ratio_to_fp32"].get(name)
        lines.append(f"{name:<16}{summary['median_ms']:>11.2f}{summary['min_ms']:>9.2f}{summary['max_ms']:>9.2f}"
                     f"{(f'{ratio:.2f}' if ratio is not None else '1.00'):>9}")
    return "\n".join(lines)


def run_latency_command(args: argparse.Namespace) -> int:
    from ms_nlp_compress.train.finetune import resolve_path

    result = run_latency(resolve_path(args.model), resolve_path(args.reference),
                         resolve_path(args.mindir) if args.mindir else None, args.batch_sizes, args.seq,
                         args.repeat, args.threads, log=lambda message: print(message, file=sys.stderr))
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(result, indent=2))
    print(format_latency(result))
    return 0


def add_parser(subparsers) -> None:
    from ms_nlp_compress.compress.quant.run import EXPORT_ATOL

    text = ("TernaryBERT / 8-bit: distillation-aware quantization-aware training of a fine-tuned classifier "
            "(distill.teacher) with the quant: recipe, best-dev selection, conversion to integer codes "
            "(<output_dir>/best), MindIR export checked against the fake-quant model, size report (results.json)")
    parser = subparsers.add_parser("quantize", help="TernaryBERT / 8-bit quantization (QAT + KD, or --ptq)",
                                   description=text)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--ptq", action="store_true",
                        help="post-training quantization of the teacher (no training): the baseline")
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints and finished stages")
    parser.add_argument("--atol", type=float, default=EXPORT_ATOL,
                        help=f"max |logit diff| of the reloaded MindIR vs the fake-quant model ({EXPORT_ATOL:g})")
    parser.set_defaults(func=run_quantize_command)

    latency = subparsers.add_parser(
        "quantize-latency", help="latency of a quantized model (packed, decoded, MindIR) vs its fp32 reference",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    latency.add_argument("--model", required=True, help="a quantized model directory (<output_dir>/best)")
    latency.add_argument("--reference", required=True, help="the fp32 classifier model directory")
    latency.add_argument("--mindir", default=None, help="also time this exported file (<output_dir>/model.mindir)")
    latency.add_argument("--batch-sizes", type=int_list, default=[1, 32])
    latency.add_argument("--seq", type=int, default=64)
    latency.add_argument("--repeat", type=int, default=5, help="interleaved rounds (5)")
    latency.add_argument("--threads", type=int, default=None, help="MindSpore CPU op threads")
    latency.add_argument("--save", type=Path, default=None, help="also write the JSON result to this file")
    latency.set_defaults(func=run_latency_command)
