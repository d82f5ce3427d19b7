"""PTQ accuracy of the fine-tuned MiniLM VADER teacher on 200 dev rows: fp32, 2-2-8 + 8-bit and 4-bit row-wise
position/type tables (the quant README's size section). Needs runs/vader_sst2_cpu/best; ~75 s at 1 thread.

    .venv/bin/python scripts/quant_ptq_position_bits.py
"""
import time
import numpy as np
import mindspore as ms
from mindspore import Tensor
ms.device_context.cpu.op_tuning.threads_num(1)
ms.set_context(mode=ms.GRAPH_MODE)
from pathlib import Path
from ms_nlp_compress.config import load_config
from ms_nlp_compress.paths import minilm_dir
from ms_nlp_compress.train.finetune import encode, load_tokenizer_for, read_split
from ms_nlp_compress.models.checkpoint import load_model_dir
from ms_nlp_compress.compress.quant.config import QuantConfig
from ms_nlp_compress.compress.quant.convert import share_graph_functions
from ms_nlp_compress.compress.quant.ptq import post_training_quantize

config = load_config("runs/vader_sst2_cpu/config.yaml")
tokenizer = load_tokenizer_for(config, Path(minilm_dir()))
_, dev = read_split(config, "dev")
columns = encode(dev[:200], tokenizer, config.data.max_length, False)
labels = columns["label"]
print("rows", len(labels), "positives", int(labels.sum()))

def accuracy(model):
    model.set_train(False)
    predictions = []
    for start in range(0, 200, 40):
        batch = [Tensor(columns[name][start:start + 40].astype(np.int32))
                 for name in ("input_ids", "attention_mask", "token_type_ids")]
        predictions.append(model(*batch)[0].asnumpy().argmax(-1))
    return float((np.concatenate(predictions) == labels).mean())

started = time.time()
teacher, _ = load_model_dir("runs/vader_sst2_cpu/best")
print(f"fp32: {accuracy(teacher):.3f} ({time.time() - started:.0f} s)")
recipes = {
    "2-2-8 + 8-bit row-wise position/type": {"preset": "2-2-8", "full_precision": ["classifier", "*.classifier"]},
    "2-2-8 + 4-bit row-wise position/type": {"preset": "2-2-8", "full_precision": ["classifier", "*.classifier"],
                                             "position": {"method": "sym", "bits": 4, "granularity": "row"}},
}
for label, recipe in recipes.items():
    model, _ = load_model_dir("runs/vader_sst2_cpu/best")
    _, deployed = post_training_quantize(model, QuantConfig.from_dict(recipe))
    share_graph_functions(deployed)
    print(f"PTQ {label}: {accuracy(deployed):.3f} ({time.time() - started:.0f} s)")
