"""Accuracy of a model directory on the same dev / test subsets as the msnc quantize rows of compress/quant/README.md.

    .venv/bin/python scripts/quant_eval_teacher.py [EVAL_LIMIT] [MODEL_DIR] [--weight-only]
    (defaults: 300 rows, as the README rows; the MiniLM teacher runs/vader_sst2_cpu/best)

MODEL_DIR: an fp32 classifier (the teachers' rows) or a quantized one (`msnc quantize`'s <output_dir>/best).
--weight-only (quantized directories): the weight-only serving form `convert.decode(model, activations=False)`,
the decoded weights with no activation quantizer (fp32 speed; not the quantized model's outputs).
"""
import argparse
import json
from pathlib import Path

import mindspore as ms

ms.device_context.cpu.op_tuning.threads_num(2)
ms.set_context(mode=ms.GRAPH_MODE)
from ms_nlp_compress.config import load_config  # noqa: E402
from ms_nlp_compress.compress.quant import convert  # noqa: E402  (registers the Quantized* architectures)
from ms_nlp_compress.models.checkpoint import load_model_dir  # noqa: E402
from ms_nlp_compress.train.finetune import read_split, encode, load_tokenizer_for, evaluate_classifier  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("eval_limit", nargs="?", type=int, default=300)
parser.add_argument("model_dir", nargs="?", type=Path, default=Path("runs/vader_sst2_cpu/best"))
parser.add_argument("--weight-only", action="store_true")
args = parser.parse_args()
config = load_config("ascend_configs/ternary_vader_cpu.yaml", [f"data.eval_limit={args.eval_limit}"])
model, document = load_model_dir(args.model_dir)
if args.weight_only:
    if "quant" not in document:
        parser.error(f"--weight-only: {args.model_dir} holds a {document.get('architecture')}, not a quantized model")
    model = convert.decode(model, activations=False)
tok = load_tokenizer_for(config, args.model_dir)
out = {"model_dir": str(args.model_dir), "weight_only": args.weight_only}  # quant_table.py matches model_dir
for split in ("dev", "test"):
    task, examples = read_split(config, split)
    out[split] = evaluate_classifier(model, encode(examples, tok, 64, False), task, 16)
print(json.dumps(out))
