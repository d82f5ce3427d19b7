"""`msnc export`: MindIR with dynamic (batch, length), a reload check on real sentences, and Lite converter files.

    msnc export --model DIR --output STEM [--kind classifier|encoder] [--encoder-output sentence|hidden]
                [--atol 1e-4] [--no-verify] [--lite-quant none|dynamic8] [--npu-shape 1,128]
                [--precision fp32|O1|O2|O3] [--amp-dtype float16|bfloat16]

DIR is one of our model directories (`save_model_dir`: a fine-tuned classifier exports its logits by default) or a
Hugging Face BERT / NEZHA folder (a backbone: exported as an encoder). The reload check tokenizes real sentences
with the vocabulary found in DIR, so the ids reaching the graph are the ones the model will see on the phone.

`--precision O1|O2|O3` exports the mixed-precision graph (`runtime.apply_precision`: float16 compute, the float32
weights stored with casts, so the file is no smaller) for serving the MindIR where float16 is fast (Ascend, GPU).
The reload check then compares the file with that mixed-precision Cell, and the summary also states how far its
outputs are from the float32 model's. For the phone keep the default fp32 export: the Lite converter picks float16
kernels per device itself (docs/mindspore.md 4.8).

MindSpore is imported inside the command, so `msnc --help` stays fast.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from ms_nlp_compress.export import ExportError
from ms_nlp_compress.export.lite import DEFAULT_NPU_SHAPE, LITE_QUANT_CHOICES, LiteFiles

MEGABYTE = 1_000_000  # sizes are printed in MB = 10^6 bytes
KINDS = ("classifier", "encoder")
EXPORT_PRECISIONS = ("fp32", "O1", "O2", "O3")
# Command-line spelling -> EncoderForExport output.
ENCODER_OUTPUT_CHOICES = {"sentence": "sentence_embedding", "hidden": "last_hidden_state"}


@dataclass
class ExportSummary:
    """Everything `msnc export` did: paths, sizes in bytes, seconds, and the reload check (None with --no-verify)."""

    mindir: Path
    kind: str
    file_bytes: int
    parameter_bytes: int
    export_seconds: float
    input_names: List[str]
    verify: Optional[object] = None  # mindir.VerifyReport (mindir imports MindSpore, so not imported here)
    precision: str = "fp32"
    # With a mixed precision: max |diff| of the exported graph's outputs vs the float32 model, per input shape.
    float32_differences: dict = field(default_factory=dict)
    lite: Optional[LiteFiles] = None
    notes: List[str] = field(default_factory=list)


def find_vocab(directory: Path) -> Optional[Path]:
    """The tokenizer file saved with a model: vocab.txt (WordPiece) or spm.model (SentencePiece)."""
    return next((directory / name for name in ("vocab.txt", "spm.model") if (directory / name).is_file()), None)


def load_model_for_export(path: Path):
    """(model, architecture name) from our model directory or a Hugging Face folder (loaded as a NezhaModel)."""
    from ms_nlp_compress.models.checkpoint import (CONFIG_FILES, is_model_dir, load_model_dir, load_pretrained,
                                                   pretrained_config)
    import ms_nlp_compress.compress.quant.convert  # noqa: F401  registers the quantized architectures
    from ms_nlp_compress.models.nezha import NezhaModel

    if not path.is_dir():
        raise ExportError(f"{path}: model directory not found")
    if is_model_dir(path):
        model, document = load_model_dir(path)
        return model, document.get("architecture", type(model).__name__)
    if not any((path / name).is_file() for name in CONFIG_FILES):
        raise ExportError(f"{path}: neither an ms_nlp_compress model directory nor a Hugging Face folder "
                          f"(no {' or '.join(CONFIG_FILES)})")
    model = NezhaModel(pretrained_config(path))
    load_pretrained(model, path)
    return model, "huggingface"


def verify_shapes(config, shapes) -> Tuple[Tuple[int, int], ...]:
    """The check's (batch, length) shapes; an absolute-position model cannot go past its position table."""
    if config.position_embedding != "absolute":
        return tuple(shapes)
    return tuple((batch, min(length, config.max_position_embeddings)) for batch, length in shapes)


def export_model(model_path: Path, output: Path, kind: Optional[str] = None, encoder_output: str = "sentence",
                 atol: float = 1e-4, verify: bool = True, lite_quant: str = "none",
                 npu_shape: Tuple[int, int] = DEFAULT_NPU_SHAPE, log: Callable[[str], None] = print,
                 precision: str = "fp32", amp_dtype: str = "float16") -> ExportSummary:
    """Load, wrap, export, reload-check and write the Lite files. Raises ExportError on any failure.

    `precision` O1-O3 exports the mixed-precision copy of the wrapper (see the module docstring).
    """
    from ms_nlp_compress.data.tokenization import load_tokenizer
    from ms_nlp_compress.export import lite, mindir
    from ms_nlp_compress.models.nezha import NezhaForSequenceClassification

    model_path, output = Path(model_path), Path(output)
    mindir.validate_file_name(mindir.mindir_path(output))  # before minutes of loading, not after
    if lite_quant not in LITE_QUANT_CHOICES:
        raise ExportError(f"--lite-quant {lite_quant!r}: expected one of {LITE_QUANT_CHOICES}")
    if encoder_output not in ENCODER_OUTPUT_CHOICES:
        raise ExportError(f"encoder output {encoder_output!r}: expected one of {list(ENCODER_OUTPUT_CHOICES)}")
    model, architecture = load_model_for_export(model_path)
    if kind is None:
        kind = "classifier" if isinstance(model, NezhaForSequenceClassification) else "encoder"
    if kind == "classifier" and architecture == "huggingface":
        raise ExportError(f"{model_path}: a Hugging Face folder holds a backbone, not a fine-tuned "
                                 "classifier; use --kind encoder")
    wrapper = mindir.inference_wrapper(model, kind, ENCODER_OUTPUT_CHOICES[encoder_output])
    float32_wrapper = wrapper
    if precision != "fp32":
        wrapper = mixed_precision_wrapper(wrapper, precision, amp_dtype)
    config = getattr(model, "bert", model).config  # classifiers and MLM models hold the backbone as .bert

    inputs_list = None
    if verify:
        vocab = find_vocab(model_path)
        if vocab is None:
            raise ExportError(f"{model_path}: no vocab.txt or spm.model to tokenize the check sentences "
                                     "(copy the tokenizer into the model directory, or pass --no-verify)")
        shapes = verify_shapes(config, mindir.DEFAULT_VERIFY_SHAPES)
        tokenizer = load_tokenizer(vocab, max_length=max(length for _, length in shapes))
        inputs_list = mindir.sample_inputs(tokenizer, shapes)
        largest = max(int(batch[0].max()) for batch in inputs_list)
        if largest >= config.vocab_size:
            raise ExportError(f"{vocab}: token id {largest} is outside the model's vocabulary "
                                     f"(vocab_size {config.vocab_size}); is this the vocabulary it was trained with?")

    started = time.perf_counter()
    path = mindir.export_mindir(wrapper, output)
    export_seconds = time.perf_counter() - started
    summary = ExportSummary(mindir=path, kind=kind, file_bytes=path.stat().st_size,
                            parameter_bytes=mindir.parameter_bytes(wrapper), export_seconds=export_seconds,
                            input_names=mindir.mindir_input_names(path), precision=precision)
    summary.notes.append(f"{path.name}: {summary.file_bytes / MEGABYTE:.2f} MB; fp32 parameters "
                         f"{summary.parameter_bytes / MEGABYTE:.2f} MB; exported in {export_seconds:.1f} s "
                         f"({kind}{', ' + encoder_output if kind == 'encoder' else ''})")
    if verify:
        log(f"exported {path} in {export_seconds:.1f} s; checking the reloaded file on shapes "
            f"{[tuple(batch[0].shape) for batch in inputs_list]}")
        summary.verify = mindir.verify_mindir(path, wrapper, inputs_list, atol)
        differences = ", ".join(f"{shape}: {difference:.2g}"
                                for shape, difference in summary.verify.max_differences.items())
        summary.notes.append(f"max |diff| reloaded file vs Cell on real sentences (atol {atol:g}): {differences}")
        if precision != "fp32":
            summary.float32_differences = float32_deviation(path, float32_wrapper, inputs_list)
            deviations = ", ".join(f"{shape}: {difference:.2g}"
                                   for shape, difference in summary.float32_differences.items())
            summary.notes.append(f"precision {precision} ({amp_dtype} compute): max |diff| reloaded file vs the "
                                 f"float32 model: {deviations}")
    else:
        summary.notes.append("reload check skipped (--no-verify): the file has not been compared with the Cell")
    summary.lite = lite.write_lite_files(path, summary.input_names, lite_quant, npu_shape, summary.notes)
    return summary


def mixed_precision_wrapper(wrapper, precision: str, amp_dtype: str):
    """`runtime.apply_precision` of the export wrapper on the current device, its errors as ExportErrors."""
    from ms_nlp_compress.errors import ConfigError
    from ms_nlp_compress.runtime import apply_precision, device_of_context

    if precision not in EXPORT_PRECISIONS:
        raise ExportError(f"--precision {precision!r}: expected one of {EXPORT_PRECISIONS}")
    try:
        mixed = apply_precision(wrapper, precision, device_of_context(), amp_dtype)
    except ConfigError as err:
        raise ExportError(f"--precision {precision} --amp-dtype {amp_dtype}: {err}") from None
    mixed.set_train(False)
    return mixed


def float32_deviation(path: Path, float32_cell, inputs_list) -> dict:
    """max |diff| of the file's outputs vs the float32 Cell per input shape: what the mixed precision costs."""
    import mindspore as ms
    from mindspore import Tensor, nn

    from ms_nlp_compress.export import mindir

    graph = nn.GraphCell(ms.load(str(path)))
    float32_cell.set_train(False)
    differences = {}
    for inputs in inputs_list:
        tensors = [Tensor(array) for array in inputs]
        expected = float32_cell(*tensors).asnumpy()  # the wrappers return one tensor
        differences[tuple(inputs[0].shape)] = mindir.max_abs_difference(expected, graph(*tensors).asnumpy())
    return differences


def format_summary(summary: ExportSummary) -> List[str]:
    lines = [f"MindIR      {summary.mindir}  ({summary.kind}; inputs int32 [batch, length] x3, both dynamic; "
             f"precision {summary.precision})",
             f"file size   {summary.file_bytes / MEGABYTE:.2f} MB   fp32 parameters "
             f"{summary.parameter_bytes / MEGABYTE:.2f} MB   export {summary.export_seconds:.1f} s"]
    if summary.verify is None:
        lines.append("reload      not checked (--no-verify)")
    else:
        lines.append(f"reload      ms.load + GraphCell vs Cell, atol {summary.verify.atol:g} "
                     f"({summary.verify.seconds:.1f} s):")
        for shape, difference in summary.verify.max_differences.items():
            lines.append(f"            input {shape} -> output {summary.verify.output_shapes[shape]}: "
                         f"max |diff| {difference:.3g}")
    if summary.float32_differences:
        lines.append(f"precision   {summary.precision} vs the float32 model: " + ", ".join(
            f"input {shape} max |diff| {difference:.3g}" for shape, difference in summary.float32_differences.items()))
    if summary.lite is not None:
        lines += [f"Lite        {summary.lite.converter_script}",
                  f"            {summary.lite.config}",
                  f"            {summary.lite.deploy_notes}"]
    return lines


def _static_shape(text: str) -> Tuple[int, int]:
    try:
        batch, length = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCH,LENGTH such as 1,128, got {text!r}") from None
    if batch < 1 or length < 1:
        raise argparse.ArgumentTypeError(f"batch and length must be >= 1, got {text!r}")
    return batch, length


def run_export(args: argparse.Namespace) -> int:
    summary = export_model(args.model, args.output, kind=args.kind, encoder_output=args.encoder_output,
                           atol=args.atol, verify=not args.no_verify, lite_quant=args.lite_quant,
                           npu_shape=args.npu_shape, log=lambda message: print(message, flush=True),
                           precision=args.precision, amp_dtype=args.amp_dtype)
    for line in format_summary(summary):
        print(line)
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export a model to MindIR (dynamic batch/length), check the reload, write Lite files",
        description="Export to <STEM>.mindir with three int32 (batch, length) inputs, reload it with ms.load + "
                    "nn.GraphCell and compare with the model on real sentences (fails above --atol), then write "
                    "<STEM>.converter.sh, <STEM>.lite.cfg and <STEM>.DEPLOY.md for MindSpore Lite (Arm CPU, Kirin "
                    "NPU).")
    parser.add_argument("--model", required=True, type=Path,
                        help="our model directory (config.json + model.safetensors) or a Hugging Face BERT folder")
    parser.add_argument("--output", required=True, type=Path,
                        help="output file stem: out/minilm writes out/minilm.mindir (letters, digits, @ _ - . : /)")
    parser.add_argument("--kind", choices=KINDS, default=None,
                        help="classifier: logits; encoder: the backbone's output (default: classifier for a "
                             "fine-tuned classifier directory, else encoder)")
    parser.add_argument("--encoder-output", choices=sorted(ENCODER_OUTPUT_CHOICES), default="sentence",
                        help="encoder kind only: sentence = masked-mean L2-normalised embedding (batch, hidden); "
                             "hidden = last hidden state (batch, length, hidden)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed max |diff| in the reload check")
    parser.add_argument("--no-verify", action="store_true", help="skip the reload check")
    parser.add_argument("--lite-quant", choices=LITE_QUANT_CHOICES, default="none",
                        help="dynamic8: add DYNAMIC_QUANT bit_num=8 to the Lite CPU config")
    parser.add_argument("--precision", choices=EXPORT_PRECISIONS, default="fp32",
                        help="O1/O2/O3: export the mixed-precision graph (float16 compute, float32 weights), for "
                             "Ascend/GPU serving; keep fp32 for the phone (the Lite converter chooses float16 itself)")
    parser.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default="float16",
                        help="low-precision type of --precision O1-O3 (bfloat16: Ascend only)")
    parser.add_argument("--npu-shape", type=_static_shape, default=DEFAULT_NPU_SHAPE, metavar="BATCH,LENGTH",
                        help="static input shape of the Kirin NPU model (default 1,128)")
    parser.set_defaults(func=run_export)
