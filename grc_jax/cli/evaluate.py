"""`grc eval MODEL (--beir DIR | --data FILE)`: retrieval, compression, kept generation and RAG.

The JSON result goes to stdout (and `--out`); progress and a readable table go to stderr, so
`grc eval ... > result.json` keeps the JSON alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from grc_jax.core.errors import MissingPathError, UsageError

# JAX, the engine and the evaluation modules are imported inside `run_eval` (keeps --help fast).

SECTIONS = ("retrieval", "compression", "generation", "rag")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="run directory (runs/<name>) or `grc import-hf` output directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run (newest)")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--beir", metavar="DIR",
        help="BEIR directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv",
    )  # fmt: skip
    src.add_argument(
        "--data", metavar="FILE",
        help="held-out GRC JSONL split (default for a run: its data.eval_path); a BEIR "
        "directory is accepted here too",
    )  # fmt: skip
    p.add_argument("--split", default="test", help="BEIR qrels split (test)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N queries")
    p.add_argument(
        "--max-corpus", type=int, default=None,
        help="keep the judged and hard-negative documents of the kept queries, filled up to N "
        "documents in corpus order (default: the whole corpus)",
    )  # fmt: skip
    p.add_argument("--max-doc-tokens", type=int, default=128,
                   help="compression / LM loss documents have at most this many tokens; RAG "
                   "documents are cut to it (128)")  # fmt: skip
    p.add_argument("--compression-docs", type=int, default=64,
                   help="documents for compression and plain LM loss (64)")  # fmt: skip
    p.add_argument("--rag-queries", type=int, default=64, help="queries for RAG (64)")
    p.add_argument("--rag-target-tokens", type=int, default=64,
                   help="RAG target: the positive's first N tokens (64)")  # fmt: skip
    p.add_argument("--max-reasoning", type=int, default=32,
                   help="self-reason embeds: reasoning tokens at most (32)")  # fmt: skip
    p.add_argument("--max-embed-tokens", type=int, default=512,
                   help="texts are cut to this many tokens before embedding (512)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8, help="sequences per pass (8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the RAG document order (0)")
    p.add_argument(
        "--skip", action="append", default=[], choices=SECTIONS,
        help="leave out a section (repeatable); its key is null in the JSON",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="write the JSON result here too")
    p.add_argument("--quiet", action="store_true", help="no progress or table on stderr")
    p.add_argument(
        "overrides", nargs="*",
        help="section.key=value config overrides that keep the parameter shapes "
        "(e.g. model.dtype=float32)",
    )  # fmt: skip


def _load(path: Path, step: int | None, overrides: list[str]):
    """(cfg, params, tokenizer, kind, step) of a run or import directory; `overrides` may change
    settings, not the parameter tree."""
    import jax

    from grc_jax.checkpoints import checkpoint_steps, model_kind
    from grc_jax.convert.adapter import load_any
    from grc_jax.core.config import load_config
    from grc_jax.model.params import init_grc_params

    kind = model_kind(path)
    cfg, params, tok = load_any(path, step)
    if overrides:
        over = load_config(path / "config.yaml", overrides)

        def shapes(c):
            tree = jax.eval_shape(lambda: init_grc_params(c, jax.random.key(0)))
            return jax.tree.map(lambda x: x.shape, tree)

        if shapes(over) != shapes(cfg):
            raise UsageError(
                f"overrides {overrides} change the model's parameter shapes; at evaluation only "
                "settings that keep them may change (model.dtype, grc.pooling, ...)"
            )
        cfg = over
    if kind == "run" and step is None:
        step = checkpoint_steps(path)[-1]
    return cfg, params, tok, kind, step


def run_eval(args: argparse.Namespace) -> int:
    from grc_jax.cli._paths import user_paths
    from grc_jax.core.config import load_config

    path = Path(args.model)
    if not (path / "config.yaml").is_file():
        raise MissingPathError(
            f"{path} is not a run directory or a `grc import-hf` directory (no config.yaml)"
        )
    cfg = load_config(path / "config.yaml", args.overrides)  # a bad override fails before JAX
    for flag in ("limit", "max_corpus"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')}: expected at least 1, got {value}")
    data = args.data
    if args.beir is None and data is None:
        data = cfg.data.eval_path or None
        if data is None:
            raise UsageError("nothing to evaluate on: give --beir DIR or --data FILE")

    import importlib.util

    if importlib.util.find_spec("ir_measures") is None:
        raise UsageError(
            "grc eval scores rankings with ir-measures, which is not installed: "
            "pip install -c constraints.txt -e '.[eval]' (make setup does)"
        )
    from grc_jax.eval.datasets import load_retrieval_set
    from grc_jax.eval.evaluate import EvalOptions, Evaluation, stderr_progress
    from grc_jax.eval.report import format_report

    opts = EvalOptions(
        max_doc_tokens=args.max_doc_tokens, compression_docs=args.compression_docs,
        rag_queries=args.rag_queries, rag_target_tokens=args.rag_target_tokens,
        max_reasoning=args.max_reasoning, max_embed_tokens=args.max_embed_tokens,
        batch_size=args.batch_size, seed=args.seed,
        sections=tuple(s for s in SECTIONS if s not in args.skip),
    )  # fmt: skip
    out = None
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise UsageError(f"--out {str(out)!r} is a directory; expected a file path")
    dataset = load_retrieval_set(args.beir, data, args.split).subset(args.limit, args.max_corpus)
    cfg, params, tok, kind, step = _load(path, args.step, args.overrides)
    log = (lambda _m: None) if args.quiet else stderr_progress
    evaluation = Evaluation(cfg, params, tok, dataset, opts, log)
    result = {
        "model": {"path": str(path), "kind": kind, "step": step,
                  "fingerprint": evaluation.engine.fingerprint},
        "data": {"name": dataset.name, "source": args.beir or data, "split": args.split,
                 "queries": len(dataset.queries), "corpus": len(dataset.corpus)},
        "options": {k: v for k, v in vars(opts).items() if k != "sections"},
    }  # fmt: skip
    result |= evaluation.run()
    text = json.dumps(result, indent=2)
    if not args.quiet:
        stderr_progress("\n" + format_report(result) + "\n")
    print(text)
    if out is not None:
        with user_paths(OSError):
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")
    return 0
