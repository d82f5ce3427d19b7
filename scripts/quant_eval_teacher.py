"""The fp32 teacher on the same dev / test subsets as the msnc quantize rows of compress/quant/README.md.

    .venv/bin/python scripts/quant_eval_teacher.py [EVAL_LIMIT] [MODEL_DIR]
    (defaults: 300 rows, as the README rows; the MiniLM teacher runs/vader_sst2_cpu/best)
"""
import json
import sys
import mindspore as ms
ms.device_context.cpu.op_tuning.threads_num(2)
ms.set_context(mode=ms.GRAPH_MODE)
from pathlib import Path
from ms_nlp_compress.config import load_config
from ms_nlp_compress.models.checkpoint import load_model_dir
from ms_nlp_compress.train.finetune import read_split, encode, load_tokenizer_for, evaluate_classifier
config = load_config("ascend_configs/ternary_vader_cpu.yaml", [f"data.eval_limit={sys.argv[1] if len(sys.argv) > 1 else 300}"])
teacher = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/vader_sst2_cpu/best")
model, _ = load_model_dir(teacher)
tok = load_tokenizer_for(config, teacher)
out = {}
for split in ("dev", "test"):
    task, examples = read_split(config, split)
    out[split] = evaluate_classifier(model, encode(examples, tok, 64, False), task, 16)
print(json.dumps(out))
