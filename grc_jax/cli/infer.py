"""`grc generate | embed | compress | index | update | rag`: the inference modes from the shell.

Every subcommand takes the model as its first argument: a `grc train` run directory (`runs/tiny`,
newest checkpoint unless `--step`) or a `grc import-hf` output directory. Bad input (empty text,
missing path, a memory or index from another model) exits with code 2 and a one-line error.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

from grc_jax.core.constants import check_memory_reads
from grc_jax.core.errors import MissingPathError, UsageError

# numpy, JAX and the inference modules are imported inside the functions that use them (deferred
# to keep `--help` fast).

# ---------------------------------------------------------------------------------- helpers


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="run directory (runs/<name>) or `grc import-hf` output directory")
    p.add_argument(
        "--step", type=int, default=None, help="checkpoint step of a run (default: newest)"
    )
    p.add_argument(
        "--attention-impl",
        default="auto",
        choices=["auto", "reference", "tpu", "gpu"],
        help="hybrid paged attention for decoding: auto = the Pallas kernel of this backend "
        "(reference on CPU); a kernel forced on another backend runs interpreted",
    )


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def _sampling(args: argparse.Namespace):
    from grc_jax.infer.sampling import SamplingParams

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens: expected at least 1, got {args.max_new_tokens}")
    return SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)


def _engine(args: argparse.Namespace):
    """The engine of `args.model` (at `args.step`), reused while the run's files are unchanged.

    A shell command loads once anyway; the reuse spares repeated compiles when `grc_jax.cli.main`
    is called many times in one process (tests, notebooks).
    """
    path = Path(args.model)
    stamp = []
    for f in (path / "config.yaml", path / "checkpoints", path / "params", path / "adapter.json"):
        stamp.append(f.stat().st_mtime_ns if f.exists() else None)
    impl = getattr(args, "attention_impl", "auto")
    return _cached_engine(args.model, args.step, impl, (str(path.absolute()), *stamp))


@functools.lru_cache(maxsize=2)
def _cached_engine(path: str, step: int | None, attention_impl: str, _identity: tuple):
    from grc_jax.convert.adapter import load_any
    from grc_jax.infer.engine import Engine, EngineOptions

    cfg, params, tok = load_any(path, step)
    return Engine(cfg, params, tok, EngineOptions(attention_impl=attention_impl))


def _nonempty(values: list[str] | None, flag: str) -> list[str]:
    values = list(values or [])
    for i, v in enumerate(values):
        if not v.strip():
            which = f"{flag} #{i + 1}" if len(values) > 1 else flag
            raise UsageError(f"{which}: empty text")
    return values


def _lines(path: str | None, flag: str) -> list[str]:
    """Non-blank lines of a text file (one text per line)."""
    if path is None:
        return []
    p = Path(path)
    if not p.is_file():
        raise MissingPathError(f"{flag} {str(p)!r} does not exist")
    lines = [line.strip() for line in p.read_text().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise UsageError(f"{flag} {str(p)!r} holds no non-empty line")
    return lines


def _out_file(path: str | Path) -> Path:
    """An output file path, its parent directory created."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"--out {str(p)!r} is a directory; expected a file path")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _dumps(obj: Any, indent: int = 0) -> str:
    """JSON with two-space indentation, but lists of numbers kept on one line."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, list) and obj and not all(isinstance(x, int | float) for x in obj):
        return "[\n" + ",\n".join(f"{inner}{_dumps(x, indent + 1)}" for x in obj) + f"\n{pad}]"
    return json.dumps(obj)


def _print(obj: Any) -> None:
    print(_dumps(obj))


def _load_memories(engine, paths: list[str]):
    from grc_jax.infer.memory import LatentMemory

    memories = []
    for path in paths:
        m = LatentMemory.load(path)
        engine.check_memory(m, f"memory {path}")
        memories.append(m)
    return memories


def _round(a: Any, digits: int) -> list:
    import numpy as np

    return np.round(np.asarray(a, np.float64), digits).tolist()


# ---------------------------------------------------------------------------------- generate


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument(
        "--prompt", action="append",
        help="prompt text (repeatable); may be left out with --memory: the model then writes "
        "from the memories alone (how it was trained to read them)",
    )  # fmt: skip
    p.add_argument(
        "--memory", action="extend", nargs="+", default=[], metavar="FILE",
        help="latent memory files (grc compress) every prompt reads, in this order",
    )  # fmt: skip
    _sampling_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of the text")


def run_generate(args: argparse.Namespace) -> int:
    prompts = _nonempty(args.prompt, "--prompt")
    if not prompts and not args.memory:
        raise UsageError("nothing to generate from: give --prompt and/or --memory")
    sampling = _sampling(args)
    engine = _engine(args)
    memories = _load_memories(engine, args.memory)
    check_memory_reads(engine.cfg.grc.memory_mode, len(memories), f"--memory: {args.model}")
    kw = {"max_new_tokens": args.max_new_tokens, "sampling": sampling}
    if prompts:
        gens = engine.generate(prompts, [memories for _ in prompts], **kw)
    else:  # the consumer block of training: [bos] after the memories
        gens = engine.generate_ids([[engine.tok.bos_id]], [memories], **kw)
        prompts = [""]
    if args.json:
        _print({
            "model": engine.fingerprint,
            "memories": list(args.memory),
            "generations": [
                {"prompt": p, "text": g.text, "tokens": g.tokens, "finish_reason": g.finish_reason}
                for p, g in zip(prompts, gens)
            ],
        })  # fmt: skip
    else:
        for g in gens:
            print(g.text)
    return 0


# ---------------------------------------------------------------------------------- embed


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--text", action="append", help="a text (document) to embed (repeatable)")
    p.add_argument("--file", help="a file of texts to embed, one per line")
    p.add_argument(
        "--query", action="append",
        help="a search query to embed (repeatable); with --text, also prints query x text scores",
    )  # fmt: skip
    p.add_argument(
        "--self-reason", action="store_true",
        help="queries: generate reasoning greedily first, then embed query + reasoning",
    )  # fmt: skip
    p.add_argument("--max-reasoning", type=int, default=32, help="reasoning tokens at most (32)")
    p.add_argument(
        "--out", help="write the embeddings [n, dim] to this .npy (rows: texts, then queries)"
    )


def run_embed(args: argparse.Namespace) -> int:
    import numpy as np

    texts = _nonempty(args.text, "--text") + _lines(args.file, "--file")
    queries = _nonempty(args.query, "--query")
    out = _out_file(args.out) if args.out else None
    if not texts and not queries:
        raise UsageError("nothing to embed: give --text, --file or --query")
    if args.self_reason and not queries:
        raise UsageError("--self-reason applies to --query texts; none given")
    engine = _engine(args)
    parts = []
    if texts:
        parts.append(engine.embed(texts))
    if queries:
        parts.append(
            engine.embed(queries, self_reason=args.self_reason, max_reasoning=args.max_reasoning)
        )
    emb = np.concatenate(parts).astype(np.float32)
    items = [{"kind": "text", "text": t} for t in texts] + [
        {"kind": "query", "text": q, "self_reason": args.self_reason} for q in queries
    ]
    if out is not None:
        np.save(out, emb)
    else:
        for item, e in zip(items, emb):
            item["embedding"] = _round(e, 6)
    result: dict[str, Any] = {
        "model": engine.fingerprint,
        "dim": int(emb.shape[1]),
        "count": len(items),
    }
    if args.out:
        result["out"] = args.out
    result["items"] = items
    if texts and queries:
        # Cosine similarity (embeddings are unit-norm): rows are queries, columns texts.
        result["scores"] = [_round(row, 4) for row in emb[len(texts) :] @ emb[: len(texts)].T]
    _print(result)
    return 0


# ---------------------------------------------------------------------------------- compress


def add_compress_arguments(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--text", action="append", help="a text to compress (repeatable)")
    p.add_argument("--file", help="a file of texts to compress, one per line")
    p.add_argument(
        "--out", required=True,
        help="one --text: the memory file (.safetensors); several texts or --file: a directory",
    )  # fmt: skip


def run_compress(args: argparse.Namespace) -> int:
    import numpy as np

    texts = _nonempty(args.text, "--text") + _lines(args.file, "--file")
    if not texts:
        raise UsageError("nothing to compress: give --text or --file")
    out = Path(args.out)
    many = args.file is not None or len(texts) > 1
    if many and out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; several texts are written to a directory")
    if not many:
        out = _out_file(out)
    engine = _engine(args)
    pairs = engine.compress(texts)
    written = []
    if many:
        out.mkdir(parents=True, exist_ok=True)
        width = max(6, len(str(len(texts) - 1)))
        for i, (m, _) in enumerate(pairs):
            path = out / f"{i:0{width}d}.safetensors"
            m.save(path)
            written.append({"file": str(path), "source_tokens": m.source_tokens, "text": texts[i]})
        np.save(out / "embeddings.npy", np.stack([e for _, e in pairs]).astype(np.float32))
        (out / "memories.json").write_text(json.dumps(written, indent=1) + "\n")
    else:
        pairs[0][0].save(out)
        written.append(
            {"file": str(out), "source_tokens": pairs[0][0].source_tokens, "text": texts[0]}
        )
    m = pairs[0][0]
    _print({
        "model": engine.fingerprint, "num_latents": m.num_latents, "memory_mode": m.memory_mode,
        "shape": list(m.k.shape), "memories": written,
    })  # fmt: skip
    return 0


# ---------------------------------------------------------------------------------- index


def add_index_arguments(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument(
        "--corpus", required=True,
        help="documents: GRC JSONL (*.jsonl: the unique positives and negatives) or a text file, "
        "one document per line",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="index directory to write")
    p.add_argument("--limit", type=int, default=None, help="index only the first N documents")


def corpus_documents(path: str | Path) -> list[str]:
    """Documents of a corpus file: the unique positive/negative texts of a GRC JSONL file (first
    appearance order), or the non-blank lines of any other text file."""
    from grc_jax.data.schema import parse_record

    p = Path(path)
    if not p.is_file():
        raise MissingPathError(f"--corpus {str(p)!r} does not exist")
    if p.suffix not in (".jsonl", ".json"):
        return _lines(str(p), "--corpus")
    docs: dict[str, None] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            r = parse_record(line, f"{p}:{n}")
            docs.update(dict.fromkeys([r.positive, *r.negatives]))
    if not docs:
        raise UsageError(f"--corpus {str(p)!r} holds no record")
    return list(docs)


def run_index(args: argparse.Namespace) -> int:
    from grc_jax.infer.index import build_index

    docs = corpus_documents(args.corpus)
    if args.limit is not None:
        if args.limit < 1:
            raise UsageError(f"--limit: expected at least 1, got {args.limit}")
        docs = docs[: args.limit]
    engine = _engine(args)
    index = build_index(engine, docs, args.out)
    _print({
        "index": str(index.directory), "count": len(index), "dim": int(index.embeddings.shape[1]),
        "model": index.model, "num_latents": index.num_latents, "memory_mode": index.memory_mode,
    })  # fmt: skip
    return 0


# ---------------------------------------------------------------------------------- update


def add_update_arguments(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--memory", required=True, help="the running memory (.safetensors)")
    p.add_argument("--chunk", required=True, help="the next chunk of text")
    p.add_argument("--out", required=True, help="where to write the new memory (.safetensors)")


def run_update(args: argparse.Namespace) -> int:
    from grc_jax.core.errors import MemoryMismatchError
    from grc_jax.infer.memory import LatentMemory

    chunk = _nonempty([args.chunk], "--chunk")[0]
    memory = LatentMemory.load(args.memory)
    out = _out_file(args.out)
    engine = _engine(args)
    if engine.cfg.grc.memory_mode != "recurrent":
        raise MemoryMismatchError(
            f"update needs a model trained with grc.memory_mode=recurrent; {args.model} uses "
            f"{engine.cfg.grc.memory_mode!r} (its memories do not read earlier ones)"
        )
    engine.check_memory(memory, f"memory {args.memory}")
    new, _ = engine.update(memory, chunk)
    new.save(out)
    _print({
        "model": engine.fingerprint, "memory": args.memory, "out": args.out,
        "source_tokens": new.source_tokens, "shape": list(new.k.shape),
    })  # fmt: skip
    return 0


# ---------------------------------------------------------------------------------- rag


def add_rag_arguments(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--index", required=True, help="index directory (grc index)")
    p.add_argument("--question", required=True, help="the question")
    p.add_argument("-k", type=int, default=3, help="documents to retrieve and read (3)")
    p.add_argument(
        "--self-reason", action="store_true", help="reason before embedding the question"
    )
    _sampling_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_rag(args: argparse.Namespace) -> int:
    from grc_jax.infer.index import load_index, rag

    question = _nonempty([args.question], "--question")[0]
    if args.k < 1:
        raise UsageError(f"-k: expected at least 1, got {args.k}")
    sampling = _sampling(args)
    index = load_index(args.index)
    engine = _engine(args)
    r = rag(engine, index, question, args.k, args.self_reason, args.max_new_tokens, sampling)
    if args.json:
        _print({
            "question": r.question,
            "hits": [{"rank": n, "id": h.id, "score": round(h.score, 6), "text": h.text}
                     for n, h in enumerate(r.hits, 1)],
            "answer": r.answer, "finish_reason": r.finish_reason,
        })  # fmt: skip
    else:
        for n, h in enumerate(r.hits, 1):
            print(f"{n}. [{h.id}] {h.score:.4f}  {h.text}")
        print(f"answer: {r.answer}")
    return 0
