"""`grc data synth`, `grc data prepare` and `grc tokenizer train`."""

from __future__ import annotations

import argparse
import json

# The data modules (grain, array_record, sentencepiece) are imported inside the `run_*`
# functions (deferred to keep `--help` fast).


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    s = sub.add_parser(
        "synth", help="write the seeded synthetic GRC corpus (train/validation/test)"
    )
    s.add_argument("--out", default="data/synth")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--queries-per-doc", type=int, default=3)
    s.add_argument("--negatives", type=int, default=2)
    r = sub.add_parser("prepare", help="convert a JSONL file into ArrayRecord shards")
    r.add_argument("jsonl")
    r.add_argument("out_prefix", help="e.g. data/arrayrecord/train")
    r.add_argument("--shards", type=int, default=4)


def run_data(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from grc_jax.data.synth import synthesize

        counts = synthesize(args.out, args.seed, args.queries_per_doc, args.negatives)
        print(f"wrote {args.out}: " + ", ".join(f"{k} {v} examples" for k, v in counts.items()))
    else:
        from grc_jax.data.sources import prepare_array_record

        paths = prepare_array_record(args.jsonl, args.out_prefix, args.shards)
        print("\n".join(paths))
    return 0


def add_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tok_command", required=True, metavar="ACTION")
    t = sub.add_parser("train", help="train a sentencepiece model on JSONL records or text files")
    t.add_argument("inputs", nargs="+", help="*.jsonl (GRC records) or plain text files")
    t.add_argument("--out", required=True, help="output prefix: writes <out>.model")
    t.add_argument("--vocab-size", type=int, default=1024)


def run_tokenizer(args: argparse.Namespace) -> int:
    from pathlib import Path

    from grc_jax.cli._paths import user_paths
    from grc_jax.data.schema import parse_record
    from grc_jax.data.tokenizer import train_sentencepiece

    texts: list[str] = []
    for path in args.inputs:
        with user_paths(FileNotFoundError, IsADirectoryError):
            lines = Path(path).read_text().splitlines()
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                r = parse_record(line, f"{path}:{n}")
                texts += [r.query, r.reasoning, f"answer : {r.answer}", r.positive, *r.negatives]
            else:
                texts.append(line)
    tok = train_sentencepiece(texts, args.out, args.vocab_size)
    print(json.dumps({"model": f"{args.out}.model", "vocab_size": tok.vocab_size}))
    return 0
