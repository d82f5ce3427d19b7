"""A tiny sentiment task and fine-tuned teacher for the `msnc quantize` tests and their kill -9 worker.

The sentences and vocabulary are distill_tiny's; the teacher's word embedding has 60,000 rows (a model table larger
than the 17-word vocabulary file, unused rows included) so that, as on real models, the tables dominate the file: the
quantized MindIR's graph (~0.4 MB of nodes for 2 layers, measured) would otherwise hide the 2-bit saving.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distill"))
import distill_tiny  # noqa: E402

RUNTIME = distill_tiny.RUNTIME
TEACHER_MODEL = ("{vocab_size: 60000, hidden_size: 16, num_layers: 2, num_heads: 2, intermediate_size: 32, "
                 "max_relative_position: 8, hidden_dropout: 0.1, attention_dropout: 0.1}")


def quant_config(folder: Path, output: str, quant: str = "{preset: 2-2-8, full_precision: [classifier]}",
                 epochs: int = 1, extra: str = "") -> Path:
    """QAT of the teacher: 12 updates per epoch (96 rows, batch 8), a checkpoint every 2, dev every 4."""
    path = folder / f"{output}.yaml"
    path.write_text(f"""
output_dir: {folder / output}
{RUNTIME}
data: {{task: sst2, data_dir: {folder / 'sst2'}, max_length: 12, batch_size: 8, eval_batch_size: 7}}
train: {{learning_rate: 0.002, epochs: {epochs}, warmup_ratio: 0.1, log_every: 2, save_every: 2, eval_every: 4}}
distill:
  teacher: {folder / 'teacher' / 'best'}
quant: {quant}
{extra}
""")
    return path
