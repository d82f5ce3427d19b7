"""`msnc` command line: `msnc <command> [--config ascend_configs/x.yaml] [--set a.b=c ...]`.

Each command group lives next to its code and registers itself with `add_parser(subparsers)`; a parsed command
calls `args.func(args)` and returns its exit status.
"""
import argparse
import sys

from ms_nlp_compress.errors import MsncError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msnc", description="Compress and accelerate pre-trained language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    from ms_nlp_compress import demo
    from ms_nlp_compress.bench import latency
    from ms_nlp_compress.compress.distill import commands as distill_commands
    from ms_nlp_compress.compress.quant import commands as quant_commands
    from ms_nlp_compress.compress.dynabert import commands as dynabert_commands
    from ms_nlp_compress.data import commands as data_commands
    from ms_nlp_compress.export import commands as export_commands
    from ms_nlp_compress.models import convert_command
    from ms_nlp_compress.pipeline import commands as pipeline_commands
    from ms_nlp_compress.train import finetune, pretrain

    data_commands.add_parser(sub)
    demo.add_parser(sub)
    finetune.add_parsers(sub)
    pretrain.add_parser(sub)
    latency.add_parser(sub)
    export_commands.add_parser(sub)
    convert_command.add_parser(sub)
    distill_commands.add_parser(sub)
    dynabert_commands.add_parser(sub)
    quant_commands.add_parser(sub)
    pipeline_commands.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except MsncError as err:
        print(f"msnc: error: {err}", file=sys.stderr)
        return 2
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
