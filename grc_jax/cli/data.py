"""`grc data ...` (synth, prepare, the real-text builders, the BEIR / sentence-transformers
converters) and `grc tokenizer train`."""

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
    _add_real_text(sub)
    _add_converters(sub)


# Defaults repeated from grc_jax.data.real_text (not imported here: `--help` stays light).
DOC_PACKAGES = "numpy,jax,flax,optax,orbax,grain,transformers,torch,sentencepiece"


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--out", default=out, help="output directory (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-words",
        type=int,
        default=80,
        help="cut positives at a sentence / paragraph boundary to this many words",
    )
    p.add_argument("--min-words", type=int, default=8, help="skip shorter positives")
    p.add_argument("--negatives", type=int, default=3, help="hard negatives per record")
    p.add_argument("--fractions", default="0.9,0.05,0.05", help="train,validation,test")
    p.add_argument("--limit", type=int, default=None, help="at most this many records per source")


def _debian_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lists-dir", default="/var/lib/apt/lists", help="apt's package lists")


def _man_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--man-dir", default="/usr/share/man")
    p.add_argument("--sections", default="1,5,7,8", help="man sections to read")
    p.add_argument(
        "--max-per-family",
        type=int,
        default=200,
        help="at most this many pages of one command family, e.g. gcloud_* (0: all)",
    )
    p.add_argument("--renderer", default="auto", choices=["auto", "man", "groff"])
    p.add_argument("--workers", type=int, default=None, help="pages rendered at once")


def _doc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--packages", default=DOC_PACKAGES, help="top-level packages to read")


def _add_real_text(sub) -> None:
    for name, helptext, extra in (
        (
            "debian",
            "Debian package descriptions (apt lists) -> train/validation/test",
            _debian_args,
        ),
        ("manpages", "manual pages (NAME -> DESCRIPTION) -> train/validation/test", _man_args),
        ("docstrings", "docstrings of installed packages -> train/validation/test", _doc_args),
    ):
        p = sub.add_parser(name, help=helptext, description=helptext)
        _common(p, f"data/real/{name}")
        extra(p)
    p = sub.add_parser("real", help="all three real-text sources, and their splits merged")
    _common(p, "data/real")
    for extra in (_debian_args, _man_args, _doc_args):
        extra(p)


def _add_converters(sub) -> None:
    b = sub.add_parser("from-beir", help="a BEIR directory -> our JSONL")
    b.add_argument("beir_dir")
    b.add_argument("--split", default="test")
    b.add_argument("--out", required=True, help="JSONL file to write")
    b.add_argument("--negatives", type=int, default=0, help="random non-relevant documents each")
    b.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("to-beir", help="our JSONL -> a BEIR directory")
    t.add_argument("jsonl")
    t.add_argument("--out", required=True, help="BEIR directory to write")
    t.add_argument("--split", default="test")
    s = sub.add_parser("from-st", help="sentence-transformers pair / triplet JSONL -> our JSONL")
    s.add_argument("jsonl")
    s.add_argument("--out", required=True, help="JSONL file to write")


def _sources(args: argparse.Namespace, names: list[str]) -> dict:
    """Factories of the named real-text sources, configured from the flags."""
    from grc_jax.data.real_text.build import as_list
    from grc_jax.data.real_text.debian import debian_source
    from grc_jax.data.real_text.docstrings import docstrings_source
    from grc_jax.data.real_text.manpages import manpages_source

    factories = {
        "debian": lambda: debian_source(args.lists_dir),
        "manpages": lambda: manpages_source(
            args.man_dir,
            tuple(as_list(args.sections)),
            args.max_per_family,
            args.seed,
            args.renderer,
            args.workers,
        ),  # fmt: skip
        "docstrings": lambda: docstrings_source(tuple(as_list(args.packages))),
    }
    return {n: factories[n] for n in names}


def _run_real_text(args: argparse.Namespace) -> None:
    from grc_jax.cli._paths import user_paths
    from grc_jax.data.real_text.build import (
        BuildOptions,
        build_source,
        format_stats,
        parse_fractions,
    )  # fmt: skip
    from grc_jax.data.real_text.merged import build_merged

    opts = BuildOptions(
        args.seed, args.max_words, args.min_words, args.negatives, parse_fractions(args.fractions),
        args.limit,
    )  # fmt: skip
    with user_paths(PermissionError, NotADirectoryError, FileExistsError, IsADirectoryError):
        if args.data_command != "real":
            (factory,) = _sources(args, [args.data_command]).values()
            stats = build_source(factory, opts, args.out)
            print(format_stats(stats))
            print(f"wrote {args.out}/{{train,validation,test}}.jsonl, *_beir/, stats.json")
            return
        sources = _sources(args, ["debian", "manpages", "docstrings"])
        _, table = build_merged(args.out, sources, opts, lambda s: print(format_stats(s)))
    names = sorted(sources)
    print(f"merged into {args.out}:")
    print(f"  {'split':<12}" + "".join(f"{n:>12}" for n in names) + f"{'total':>12}")
    for split, row in table.items():
        counts = "".join(f"{row[n]:>12}" for n in names)
        print(f"  {split:<12}{counts}{sum(row.values()):>12}")


def _run_converter(args: argparse.Namespace) -> None:
    from grc_jax.cli._paths import user_paths
    from grc_jax.data import formats

    with user_paths(PermissionError, NotADirectoryError, FileExistsError, IsADirectoryError):
        if args.data_command == "from-beir":
            corpus, queries, qrels = formats.read_beir(args.beir_dir, args.split)
            records = formats.beir_to_records(corpus, queries, qrels, args.negatives, args.seed)
            n = formats.write_jsonl(args.out, records)
            print(f"wrote {args.out}: {n} records from {len(queries)} queries, {len(corpus)} docs")
        elif args.data_command == "to-beir":
            records = formats.read_records(args.jsonl)
            corpus, queries, qrels = formats.records_to_beir(records)
            formats.write_beir(args.out, corpus, queries, qrels, args.split)
            print(f"wrote {args.out}: {len(queries)} queries, {len(corpus)} documents")
        else:
            n = formats.write_jsonl(args.out, formats.read_st(args.jsonl))
            print(f"wrote {args.out}: {n} records")


def run_data(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from grc_jax.data.synth import synthesize

        counts = synthesize(args.out, args.seed, args.queries_per_doc, args.negatives)
        print(f"wrote {args.out}: " + ", ".join(f"{k} {v} examples" for k, v in counts.items()))
    elif args.data_command == "prepare":
        from grc_jax.data.sources import prepare_array_record

        paths = prepare_array_record(args.jsonl, args.out_prefix, args.shards)
        print("\n".join(paths))
    elif args.data_command in ("debian", "manpages", "docstrings", "real"):
        _run_real_text(args)
    else:
        _run_converter(args)
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
