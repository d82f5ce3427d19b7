"""Quantization as a `msnc compress` stage: distillation-aware QAT of the previous stage's model (its teacher and
its initialisation, `distill.teacher`), convert to packed codes, MindIR checked, size report (`msnc quantize`);
`options.ptq: true` runs the post-training baseline instead (`msnc quantize --ptq`)."""
from __future__ import annotations

from typing import Dict

from ms_nlp_compress.pipeline.stages import StageKind, best_dir, register_stage


def run_stage(config, resume: bool, log, options: Dict) -> Dict:
    from ms_nlp_compress.compress.quant.run import run_ptq, run_quantize

    if options.get("ptq", False):
        return run_ptq(config, log=log)
    return run_quantize(config, resume=resume, log=log)


def run_stage_parallel(config, resume: bool, log, options: Dict, launch) -> Dict:
    """`msnc quantize` under msrun: QAT data parallel; rank 0 alone converts, exports and writes results.json."""
    from ms_nlp_compress.errors import ConfigError
    from ms_nlp_compress.pipeline.stages import read_results, resume_flag

    if options.get("ptq", False):
        if getattr(launch, "workers", 1) > 1:  # every rank would export the same files: nothing is data parallel
            raise ConfigError("options.ptq: post-training quantization trains nothing, so it has no data-parallel "
                              "launch; give this stage `launch: {workers: 1}`")
        launch(["quantize", "--ptq"])  # one child process
        return read_results(config)
    launch(["quantize"] + resume_flag(resume))
    return read_results(config)


register_stage(StageKind(
    "quantize", run_stage, best_dir, input_keys=("distill.teacher",), needs_input=True, option_keys=("ptq",),
    run_parallel=run_stage_parallel,
    description="msnc quantize: QAT (or options.ptq) -> packed 2/4/8-bit model directory + MindIR"))
