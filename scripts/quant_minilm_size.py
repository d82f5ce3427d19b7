"""MiniLM-shape (random weights) 2-bit size accounting: model directory and MindIR, per group, vs fp32.

`python scripts/quant_minilm_size.py OUT --mindir` also exports the MindIR files, inlined (the default graph) and
with shared graph functions (quant.convert.share_graph_functions), and prints what each container is made of.
"""
import sys
from pathlib import Path
import mindspore as ms
ms.device_context.cpu.op_tuning.threads_num(1)
from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification
from ms_nlp_compress.models.checkpoint import save_model_dir
from ms_nlp_compress.compress.quant.config import QuantConfig
from ms_nlp_compress.compress.quant.convert import share_graph_functions
from ms_nlp_compress.compress.quant.ptq import post_training_quantize
from ms_nlp_compress.compress.quant.size import mindir_container_breakdown, mindir_report, safetensors_report
from ms_nlp_compress.export.mindir import export_mindir, inference_wrapper
config = NezhaConfig(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                     position_embedding="absolute", max_position_embeddings=512)
recipes = {
    "2-2-8 (position/type fp32)": {"preset": "2-2-8"},
    "2-2-8 + 8-bit row-wise position/type": {"preset": "2-2-8", "full_precision": ["classifier", "*.classifier"]},
    # 4-bit position table; the 2 x 384 token-type table stays fp32 (4-bit row-wise: 48 % relative RMS error on the
    # real teacher's table for 0.4 KB saved)
    "2-2-8 + 4-bit row-wise position, fp32 type": {
        "preset": "2-2-8", "full_precision": ["classifier", "*.classifier", "*token_type_embeddings"],
        "position": {"method": "sym", "bits": 4, "granularity": "row"}},
}
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
ms.set_seed(0)
fp32 = NezhaForSequenceClassification(config, 3)
save_model_dir(fp32, out / "fp32_dir", config)
fp_dir = safetensors_report(out / "fp32_dir")
do_mindir = "--mindir" in sys.argv
if do_mindir:
    fp_path = export_mindir(inference_wrapper(fp32, "classifier"), out / "fp32")
    fp_ir, fp_container = mindir_report(fp_path), mindir_container_breakdown(fp_path)
for index, (label, recipe) in enumerate(recipes.items()):
    ms.set_seed(0)
    _, deployed = post_training_quantize(NezhaForSequenceClassification(config, 3), QuantConfig.from_dict(recipe))
    save_model_dir(deployed, out / f"q{index}_dir", config)
    print(f"\n== {label}: model directory")
    print("\n".join(safetensors_report(out / f"q{index}_dir").table(fp_dir)))
    if not do_mindir:
        continue
    for graph, suffix in (("inlined graph", ""), ("shared graph functions", "_shared")):
        if suffix:
            share_graph_functions(deployed)
        path = export_mindir(inference_wrapper(deployed, "classifier"), out / f"q{index}{suffix}")
        print(f"== {label}: MindIR, {graph}")
        print("\n".join(mindir_report(path).table(fp_ir)))
        print("\n".join(mindir_container_breakdown(path).table(fp_container)))
