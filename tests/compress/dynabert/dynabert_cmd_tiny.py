"""A tiny fine-tuned teacher and `msnc dynabert` configs for the command tests and their kill -9 worker.

The task, vocabulary and teacher are distill_tiny's (tests/compress/distill): 2 layers of 16 wide, 2 heads of 8,
FFN 32, dropout 0.1 (so resuming must also restore the dropout streams)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distill"))
import distill_tiny  # noqa: E402  (the shared tiny task and teacher)

RUNTIME = distill_tiny.RUNTIME
WIDTHS, DEPTHS = (1.0, 0.5), (1.0, 0.5)


def dynabert_config(folder: Path, output: str, graph: str = "separate", extra: str = "") -> Path:
    """Importance on 40 training rows; stage 1 (2 widths) and stage 2 (2 widths x 2 depths), 2 epochs of the 96
    rows each (6 batches of 16 per epoch, 12 updates a stage), a checkpoint every 4 updates."""
    path = folder / f"{output}.yaml"
    path.write_text(f"""
output_dir: {folder / output}
{RUNTIME}
data: {{task: sst2, data_dir: {folder / 'sst2'}, max_length: 12, batch_size: 16, eval_batch_size: 7}}
train: {{learning_rate: 0.01, warmup_ratio: 0.1, log_every: 1, save_every: 4}}
dynabert:
  teacher_model: {folder / 'teacher' / 'best'}
  width_multipliers: {list(WIDTHS)}
  depth_multipliers: {list(DEPTHS)}
  importance_examples: 40
  importance_batch_size: 16
  graph: {graph}
  width_train: {{epochs: 2}}
  width_depth_train: {{epochs: 2}}
{extra}
""")
    return path
