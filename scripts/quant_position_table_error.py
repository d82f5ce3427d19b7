"""Weight-only proxy for the cost of a table's bits: relative RMS error of row-wise quantization (clip 2.5) of the
fine-tuned VADER teacher's position, token-type and word tables (numpy; no model run).

    .venv/bin/python scripts/quant_position_table_error.py
"""
import numpy as np
from ms_nlp_compress.models.checkpoint import read_safetensors

weights = read_safetensors("runs/vader_sst2_cpu/best/model.safetensors")


def relative_error(table, quantized):
    return float(np.sqrt(((quantized - table) ** 2).sum() / (table ** 2).sum()))


def symmetric_rows(table, bits):
    top = 2 ** (bits - 1) - 1
    step = np.abs(table).max(-1, keepdims=True) / top
    codes = np.round(np.divide(table, step, out=np.zeros_like(table), where=step > 0))
    return np.clip(codes, -top, top) * step


def twn_rows(table):
    magnitude = np.abs(table)
    keep = magnitude > 0.7 * magnitude.mean(-1, keepdims=True)
    alpha = (magnitude * keep).sum(-1, keepdims=True) / np.maximum(keep.sum(-1, keepdims=True), 1)
    return np.sign(table) * keep * alpha


for name in ("position_embeddings", "token_type_embeddings", "word_embeddings"):
    table = np.clip(weights[f"bert.embeddings.{name}.embedding_table"].astype(np.float64), -2.5, 2.5)
    errors = [f"{bits}-bit {relative_error(table, symmetric_rows(table, bits)):.1%}" for bits in (8, 4)]
    errors.append(f"ternary (TWN) {relative_error(table, twn_rows(table)):.1%}")
    print(f"{name} {table.shape}: " + ", ".join(errors))
