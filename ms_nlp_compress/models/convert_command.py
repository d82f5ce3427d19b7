"""`msnc convert SRC OUT`: any supported checkpoint form -> our model directory (safetensors), with a report.

    msnc convert bert-base-uncased/ runs/bert-base-msnc            # BertForPreTraining -> NezhaForMaskedLM
    msnc convert nezha-cn-base/ runs/nezha-base --architecture NezhaModel
    msnc convert SRC OUT --list                                     # every checkpoint tensor and where it went

SRC is anything `pretrained:` accepts (models/checkpoint.py): our model directory, a Hugging Face / Google BERT /
NEZHA folder with config.json or bert_config.json and model.safetensors or pytorch_model.bin (the latter through
torch.load(weights_only=True), so torch must be installed for it). The architecture, unless given, follows the
checkpoint: a classifier head -> NezhaForSequenceClassification, an MLM head -> NezhaForMaskedLM (continued
pre-training and MLM augmentation need it; fine-tuning from it starts a fresh pooler), otherwise NezhaModel (with
the checkpoint's pooler when it has one). Tensors the architecture has no place for are reported as skipped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List

from ms_nlp_compress.errors import CheckpointError

ARCHITECTURE_CHOICES = ("auto", "NezhaModel", "NezhaForMaskedLM", "NezhaForSequenceClassification")


def _choose_architecture(checkpoint, requested: str) -> str:
    from ms_nlp_compress.models.checkpoint import CLASSIFIER, MLM_HEAD

    if requested != "auto":
        return requested
    if checkpoint.architecture is not None:
        return checkpoint.architecture
    if checkpoint.has(CLASSIFIER):
        return "NezhaForSequenceClassification"
    if checkpoint.has(MLM_HEAD):
        return "NezhaForMaskedLM"
    return "NezhaModel"


def _check_output(source: Path, output: Path, force: bool) -> None:
    from ms_nlp_compress.models.checkpoint import is_model_dir

    if output.resolve() == source.resolve() or source.resolve() in output.resolve().parents:
        raise CheckpointError(f"{output}: the output must be outside the source checkpoint {source}")
    if output.exists():
        if not output.is_dir() or not is_model_dir(output):
            if output.is_file() or any(output.iterdir()):
                raise CheckpointError(f"{output}: exists and is not an ms_nlp_compress model directory; choose "
                                      "another OUT")
        elif not force:
            raise CheckpointError(f"{output}: a model directory already exists; pass --force to replace it")


def convert_checkpoint(source, output, architecture: str = "auto", force: bool = False, list_all: bool = False,
                       log: Callable[[str], None] = print) -> Dict:
    """Read SRC, load it strictly into the chosen architecture, save OUT; report what was mapped and skipped."""
    from ms_nlp_compress.models.checkpoint import (CLASSIFIER, POOLER, build_model, load_checkpoint, part_of,
                                                   read_checkpoint, save_model_dir)

    source, output = Path(source), Path(output)
    if architecture not in ARCHITECTURE_CHOICES:
        raise CheckpointError(f"--architecture {architecture!r}: one of {ARCHITECTURE_CHOICES}")
    _check_output(source, output, force)
    checkpoint = read_checkpoint(source)
    name = _choose_architecture(checkpoint, architecture)
    document = dict(checkpoint.document or {})
    if checkpoint.document is None or checkpoint.architecture != name:
        if name == "NezhaModel":
            document["add_pooler"] = checkpoint.has(POOLER)
        if name == "NezhaForSequenceClassification":
            if not checkpoint.has(CLASSIFIER):
                raise CheckpointError(f"{source}: no classifier.weight: --architecture "
                                      "NezhaForSequenceClassification needs a fine-tuned classifier")
            document["num_labels"] = int(checkpoint.mapped.weights["classifier.weight"].shape[0])
    cell = build_model(name, checkpoint.config, document)
    report = load_checkpoint(cell, checkpoint, strict=True, fresh=(), log=None)

    counts: Dict[str, int] = {}
    for tensor in report.loaded:
        counts[part_of(tensor)] = counts.get(part_of(tensor), 0) + 1
    log(f"read {checkpoint.weights_file}")
    log(f"mapped {len(report.loaded)} tensors into {name}: "
        + ", ".join(f"{part} {count}" for part, count in counts.items()))
    if list_all:
        for tensor in report.loaded:
            log(f"  {report.checkpoint_name(tensor)} -> {tensor}")
    skipped: List[str] = []
    if report.unused:
        skipped.append(report.unused_groups())
        log(f"skipped (no place in {name}): {report.unused_groups()}")
        if list_all:
            for tensor in report.unused:
                log(f"  {report.checkpoint_name(tensor)} -> skipped")
        if name == "NezhaForMaskedLM" and any(part_of(t) == POOLER for t in report.unused):
            log("  (NezhaForMaskedLM has no pooler: fine-tuning from the output starts a fresh one; "
                "--architecture NezhaModel keeps it)")
    if report.ignored:
        log(f"ignored (not weights, or the tied decoder that is the word-embedding table): "
            f"{', '.join(report.ignored)}")
    meta = {"converted_from": str(source.resolve()), "converted_weights": checkpoint.weights_file.name}
    tokenizer_dir = source if source.is_dir() else source.parent
    save_model_dir(cell, output, checkpoint.config, meta=meta, tokenizer_dir=tokenizer_dir)
    written = sorted(p.name for p in output.iterdir())
    log(f"wrote {output} ({', '.join(written)}); use it with --set pretrained={output}")
    return {"architecture": name, "mapped": len(report.loaded), "skipped": skipped, "ignored": list(report.ignored),
            "output": str(output)}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert a BERT / NEZHA checkpoint (Hugging Face, Google, "
                                                   "NEZHA-PyTorch; safetensors or pytorch_model.bin) into a "
                                                   "model directory")
    parser.add_argument("source", help="checkpoint folder or weights file")
    parser.add_argument("output", help="model directory to write")
    parser.add_argument("--architecture", default="auto", choices=ARCHITECTURE_CHOICES,
                        help="auto: classifier if the checkpoint has one, else MLM model if it has an MLM head, "
                             "else backbone")
    parser.add_argument("--list", dest="list_all", action="store_true", help="print every tensor's mapping")
    parser.add_argument("--force", action="store_true", help="replace an existing model directory at OUTPUT")

    def convert_command(args):
        convert_checkpoint(args.source, args.output, args.architecture, args.force, args.list_all)
        return 0

    parser.set_defaults(func=convert_command)
