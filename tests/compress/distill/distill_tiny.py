"""A tiny sentiment task, corpus, vocabulary and fine-tuned teacher for the `msnc distill` tests and their kill -9
worker (distill_worker.py). Everything is written under a folder given by the test."""
import contextlib
from pathlib import Path

import numpy as np

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "movie", "was", "a", "plot", "very"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
RUNTIME = "runtime: {device: cpu, mode: graph, cpu_threads: 1}"
# The teacher: 2 layers of 16 with 2 heads. The student: 1 layer of 8 with 2 heads (equal head counts, as the
# attention term needs), a fifth of the teacher's encoder FLOPs.
TEACHER_MODEL = ("{vocab_size: 17, hidden_size: 16, num_layers: 2, num_heads: 2, intermediate_size: 32, "
                 "max_relative_position: 8, hidden_dropout: 0.1, attention_dropout: 0.1}")
STUDENT_MODEL = ("{vocab_size: 17, hidden_size: 8, num_layers: 1, num_heads: 2, intermediate_size: 16, "
                 "max_relative_position: 8, hidden_dropout: 0.1, attention_dropout: 0.0}")


def sentences(rows, seed):
    """(text, label): label 1 when the cue word is positive; the other four words are filler."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        label = int(rng.integers(0, 2))
        cue = rng.choice(WORDS[:3] if label else WORDS[3:6])
        filler = list(rng.choice(WORDS[6:], 4))
        filler.insert(int(rng.integers(0, 5)), cue)
        out.append((" ".join(filler), label))
    return out


def write_assets(folder: Path) -> None:
    (folder / "sst2").mkdir(parents=True, exist_ok=True)
    for split, rows, seed in (("train", 96, 0), ("dev", 30, 1), ("test", 30, 2)):
        lines = ["sentence\tlabel"] + [f"{text}\t{label}" for text, label in sentences(rows, seed)]
        (folder / "sst2" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    # the "augmented" set: the training sentences again plus relabelled-free variants (a different seed)
    lines = ["sentence\tlabel"] + [f"{text}\t{label}" for text, label in sentences(96, 0) + sentences(64, 7)]
    (folder / "train_aug.tsv").write_text("\n".join(lines) + "\n")
    (folder / "corpus.txt").write_text("\n".join(text for text, _ in sentences(120, 3)) + "\n")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")


def teacher_config(folder: Path, model: str = TEACHER_MODEL) -> Path:
    path = folder / "teacher.yaml"
    path.write_text(f"""
output_dir: {folder / 'teacher'}
{RUNTIME}
model: {model}
data: {{task: sst2, data_dir: {folder / 'sst2'}, vocab: {folder / 'vocab.txt'}, max_length: 12, batch_size: 8,
        eval_batch_size: 7}}
train: {{learning_rate: 0.03, epochs: 5, warmup_ratio: 0.1, eval_every: 0, log_every: 4}}
""")
    return path


def train_teacher(folder: Path, model: str = TEACHER_MODEL) -> Path:
    """Fine-tune the teacher (`model`: a NezhaConfig in YAML flow style) into folder/teacher/best."""
    from ms_nlp_compress.config import load_config
    from ms_nlp_compress.train.finetune import run_finetune

    report = run_finetune(load_config(teacher_config(folder, model)), log=lambda message: None)
    assert report["best_dev"]["acc"] >= 0.9, report  # the teacher the students are measured against
    return folder / "teacher" / "best"


@contextlib.contextmanager
def teacher_in_graph_mode(folder: Path, model: str = TEACHER_MODEL):
    """The body of the command tests' module fixtures: the assets and a fine-tuned teacher in `folder`, MindSpore in
    graph mode while the tests run, PyNative again after them."""
    import mindspore as ms

    write_assets(folder)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        train_teacher(folder, model)
        yield folder
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def task_config(folder: Path, output: str, extra: str = "", init: str = "teacher_layers") -> Path:
    """Task distillation of the teacher into the student; stage 1 checkpoints every 4 of its 36 updates."""
    path = folder / f"{output}.yaml"
    path.write_text(f"""
output_dir: {folder / output}
{RUNTIME}
data: {{task: sst2, data_dir: {folder / 'sst2'}, max_length: 12, batch_size: 8, eval_batch_size: 7}}
train: {{learning_rate: 0.01, warmup_ratio: 0.1, log_every: 4}}
distill:
  teacher: {folder / 'teacher' / 'best'}
  student: null
  student_model: {STUDENT_MODEL}
  student_init: {init}
  intermediate_train: {{epochs: 3, save_every: 4, learning_rate: 0.01}}
  prediction_train: {{epochs: 3, save_every: 6, eval_every: 6, learning_rate: 0.01}}
{extra}
""")
    return path


def general_config(folder: Path, output: str, extra: str = "") -> Path:
    path = folder / f"{output}.yaml"
    path.write_text(f"""
output_dir: {folder / output}
{RUNTIME}
pretrained: {folder / 'teacher' / 'best'}
data: {{max_length: 12, batch_size: 8, stream: disk, shard_rows: 32, shuffle_shards: 2}}
train: {{learning_rate: 0.01, epochs: 3, warmup_ratio: 0.1, log_every: 3, save_every: 5}}
distill:
  corpus: {folder / 'corpus.txt'}
  student: null
  student_model: {STUDENT_MODEL}
{extra}
""")
    return path
