"""Serving: continuous vs static batching, latent memories vs raw documents, embedding throughput.

Three measurements against live `grc serve` servers in this process (uvicorn on 127.0.0.1, called
through the official `openai` client from one thread per client, every request streamed):

1. **Batching** (`--clients 1,4,16,64`): N closed-loop clients, each sending
   `--requests-per-client` greedy requests of mixed prompt lengths and `max_tokens`, to a
   continuous-batching server and to a static-batching one (`--policy static`: a batch runs to
   its end before the next is admitted, as `Engine.generate` runs its turns), alternating which
   goes first. Output tokens/s (completion tokens / wall time), time to first token and the gap
   between streamed chunks (inter-token latency), p50 / p99.
2. **Memories vs text**: the same questions over `--doc-tokens`-token documents, the document
   given as text in the prompt vs as a latent memory (`POST /v1/memories` once per document,
   timed apart; requests name it in `memories`), `--memory-clients` concurrent clients.
3. **Embeddings**: `Engine.embed`, `POST /v1/embeddings` and `transformers` (the same model
   exported by `grc export`, `AutoModel`, eager attention, last hidden state, batches of 64,
   torch on the same threads) over the same short texts, interleaved, median of `--repeats`.
4. **Steps** (`--parts steps`, not in the default set): what each program of the batching
   servers costs on its own, engine only: the decode step of `--max-batch` rows, the prefill
   chunk at each row count, and sampling a batch (greedy, and with temperature), median of
   `--repeats`. They explain the batching figures: a policy changes how many steps run, not
   what a step costs.

Run from the repository root after `make tune` (the tuned adapter and the base import):
`python -m benchmarks.serving` (about 20 minutes on 2 CPU cores); `--parts` picks some of the
three, and the sizes have flags (e.g. `--clients 1,4 --docs 1 --questions 4` for a short run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import (
    RESULTS_DIR,
    command_line,
    finish_machine,
    format_table,
    interleaved_times,
    machine,
    median,
    write_json,
)
from grc_jax.serve.live import LiveServer

ROOT = Path(__file__).resolve().parents[1]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def texts_from(path: Path, n: int, what: str) -> list[str]:
    """Up to `n` distinct passages of the real-text test split (`grc data real`)."""
    if not path.is_file():
        raise SystemExit(f"{path}: missing; run `make real-data` first (or --quick)")
    seen: dict[str, None] = {}
    with path.open() as f:
        for line in f:
            rec = json.loads(line)
            for t in [rec.get("query", ""), rec.get("positive", ""), *rec.get("negatives", [])]:
                t = " ".join(str(t).split())
                if t:
                    seen.setdefault(t, None)
            if len(seen) >= n:
                break
    texts = list(seen)[:n]
    if len(texts) < n:
        raise SystemExit(f"{path}: only {len(texts)} {what}, {n} wanted")
    return texts


# ------------------------------------------------------------------------------- load runner


def run_load(server: LiveServer, work: list[list[dict]]) -> dict[str, Any]:
    """`work[c]`: the requests client c sends one after another (all clients at once)."""
    stats: list[dict] = []
    lock = threading.Lock()

    def client(requests: list[dict]) -> None:
        for body in requests:
            t0 = time.perf_counter()
            stamps: list[float] = []
            usage = None
            stream = server.client.completions.create(
                model=server.name, stream=True, stream_options={"include_usage": True}, **body
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    stamps.append(time.perf_counter())
                if chunk.usage is not None:
                    usage = chunk.usage
            with lock:
                stats.append({"ttft": (stamps[0] if stamps else time.perf_counter()) - t0,
                              "gaps": list(np.diff(stamps)),
                              "tokens": usage.completion_tokens if usage else 0})  # fmt: skip

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(work)) as pool:
        list(pool.map(client, work))
    wall = time.perf_counter() - t0
    server.quiet()
    engine = server.engine
    leaked = engine.pool.n_pages - 1 - engine.pool.free_pages
    if leaked or engine.memories.read:
        raise RuntimeError(f"leak after the load: {leaked} pages, {engine.memories.read} reads")
    ttft = [s["ttft"] for s in stats]
    gaps = [g for s in stats for g in s["gaps"]]
    tokens = sum(s["tokens"] for s in stats)
    return {"requests": len(stats), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "requests_per_s": len(stats) / wall,
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "itl_p50_s": _pct(gaps, 50), "itl_p99_s": _pct(gaps, 99)}  # fmt: skip


def mixed_work(texts: list[str], tok: Any, clients: int, per_client: int, max_prompt: int,
               seed: int) -> list[list[dict]]:  # fmt: skip
    """Greedy requests with prompts of 8..`max_prompt` tokens and max_tokens in {8, 16, 32, 64}."""
    rng = np.random.default_rng(seed)
    work = []
    for _ in range(clients):
        reqs = []
        for _ in range(per_client):
            ids = tok.encode(texts[int(rng.integers(len(texts)))])
            n = int(rng.integers(8, max_prompt + 1))
            prompt = tok.decode(ids[:n]) or "hello"
            reqs.append({"prompt": prompt, "max_tokens": int(rng.choice([8, 16, 32, 64])),
                         "temperature": 0})  # fmt: skip
        work.append(reqs)
    return work


# ------------------------------------------------------------------------------- parts


def batching(args, texts: list[str]) -> list[dict]:
    sizes = dict(max_batch=args.max_batch, max_seq_len=args.max_seq_len, max_queue=4096)
    servers = {p: LiveServer(args.model, policy=p, **sizes) for p in ("continuous", "static")}
    rows = []
    try:
        tok = servers["continuous"].engine.tok
        for n, clients in enumerate(args.clients):
            work = mixed_work(texts, tok, clients, args.requests_per_client,
                              args.max_prompt, seed=clients)  # fmt: skip
            order = ["continuous", "static"][:: 1 if n % 2 == 0 else -1]
            for policy in order:
                r = {"clients": clients, "policy": policy, **run_load(servers[policy], work)}
                print(json.dumps(r), flush=True)
                rows.append(r)
    finally:
        for s in servers.values():
            s.close()
    return rows


def documents(texts: list[str], tok: Any, n_docs: int, doc_tokens: int) -> list[str]:
    """`n_docs` documents of exactly `doc_tokens` tokens, each passages joined end to end."""
    docs, pool = [], iter(texts)
    for _ in range(n_docs):
        ids: list[int] = []
        while len(ids) < doc_tokens:
            ids += tok.encode(next(pool) + "\n\n")
        docs.append(tok.decode(ids[:doc_tokens]))
    return docs


def memories_vs_text(args, texts: list[str], questions: list[str]) -> dict[str, Any]:
    seq = args.doc_tokens + 256  # the document, re-tokenised, plus question and answer
    sizes = dict(max_batch=args.memory_clients, max_seq_len=seq, max_queue=4096)
    with LiveServer(args.model, **sizes) as server:
        tok = server.engine.tok
        docs = documents(texts, tok, args.docs, args.doc_tokens)
        t0 = time.perf_counter()
        ids = [server.http.post("/v1/memories", json={"model": server.name, "input": d}).json()
               ["id"] for d in docs]  # fmt: skip
        compress_s = time.perf_counter() - t0
        qs = [(i % len(docs), q) for i, q in enumerate(questions)]

        def work(as_text: bool) -> list[list[dict]]:
            per: list[list[dict]] = [[] for _ in range(args.memory_clients)]
            for i, (d, q) in enumerate(qs):
                body = {"max_tokens": args.answer_tokens, "temperature": 0}
                if as_text:
                    body["prompt"] = f"{docs[d]}\n\nQuestion: {q}\nAnswer:"
                else:
                    body |= {"prompt": f"Question: {q}\nAnswer:", "extra_body":
                             {"memories": [ids[d]]}}  # fmt: skip
                per[i % args.memory_clients].append(body)
            return per

        runs = {}
        for mode in ("memory", "text", "memory", "text")[: 2 * args.memory_repeats]:
            r = run_load(server, work(mode == "text"))
            runs.setdefault(mode, []).append(r)
            print(json.dumps({"mode": mode, **r}), flush=True)
        for m in ids:
            server.http.delete(f"/v1/memories/{m}")
        if server.engine.memories.held:
            raise RuntimeError("memory slots leaked")
    best = {m: max(rs, key=lambda r: r["requests_per_s"]) for m, rs in runs.items()}
    return {"docs": args.docs, "doc_tokens": args.doc_tokens, "questions": len(qs),
            "clients": args.memory_clients, "compress_s": compress_s, "runs": runs,
            "best": best}  # fmt: skip


def steps(args) -> dict[str, Any]:
    from grc_jax.convert.adapter import load_any
    from grc_jax.infer.engine import Engine, EngineOptions
    from grc_jax.infer.scheduler import programs, warm_up

    cfg, params, tok = load_any(args.model, None)
    B = args.max_batch
    opts = EngineOptions(max_batch=B, max_seq_len=args.max_seq_len, max_memories=8,
                         n_pages=B * -(-args.max_seq_len // 16) + 1, memory_slots=256)  # fmt: skip
    e = Engine(cfg, params, tok, opts)
    t0 = time.perf_counter()
    warm_up(e)
    compile_s = time.perf_counter() - t0
    W = e.table_width
    pages = np.arange(1, B * W + 1, dtype=np.int32).reshape(B, W)  # every row a full table

    def program(rows: int, c: int):
        z = np.zeros(rows, np.int32)
        at = np.tile(np.arange(c, dtype=np.int32) + (args.max_seq_len // 2 if c == 1 else 0),
                     (rows, 1))  # a decode token halfway through its sequence  # fmt: skip
        return lambda: np.asarray(e.generation_step(
            np.ones((rows, c), np.int32), np.ones((rows, c), np.int32), at,
            at[:, -1] + 1, np.full(rows, c - 1, np.int32), block_tables=pages[:rows],
            mem_tables=np.zeros((rows, 8), np.int32), mem_counts=z, starts=z,
        ))  # fmt: skip

    logits = program(B, 1)()
    z, one = np.zeros(B, np.int32), np.ones(B, np.float32)
    cands = {f"{'decode' if c == 1 else 'prefill'} [{r}, {c}]": program(r, c)
             for r, c in programs(e)}  # fmt: skip
    cands[f"sample [{B}] greedy"] = lambda: e.sample_rows(logits, z, z, 0 * one, z, one)
    cands[f"sample [{B}] temperature 1"] = lambda: e.sample_rows(logits, z, z, one, z, one)
    times = interleaved_times(cands, args.repeats, warmup=1)
    return {"compile_s": compile_s, "seconds": {k: median(v) for k, v in times.items()},
            "all_times_s": times}  # fmt: skip


def embeddings(args, texts: list[str]) -> dict[str, Any]:
    import torch
    import transformers

    from grc_jax.cli import main as grc

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp, LiveServer(args.base, max_batch=1) as srv:
        if grc(["export", "--ckpt", args.base, "--out", f"{tmp}/hf"]) != 0:
            raise RuntimeError("grc export failed")
        model = transformers.AutoModel.from_pretrained(f"{tmp}/hf", attn_implementation="eager")
        model.eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(f"{tmp}/hf")
        hf_tok.pad_token = hf_tok.pad_token or hf_tok.eos_token

        def hf_embed():
            for i in range(0, len(texts), 64):
                enc = hf_tok(texts[i : i + 64], padding=True, return_tensors="pt")
                with torch.no_grad():
                    model(**enc).last_hidden_state.numpy()

        def engine_embed():
            srv.on_engine(srv.engine.embed, texts)

        def http_embed():
            for i in range(0, len(texts), 64):
                srv.client.embeddings.create(model=srv.name, input=texts[i : i + 64])

        cands = {"Engine.embed": engine_embed, "/v1/embeddings": http_embed,
                 "transformers eager": hf_embed}  # fmt: skip
        times = interleaved_times(cands, args.repeats, warmup=1)
    return {"texts": len(texts), "threads": args.threads,
            "seconds": {k: median(v) for k, v in times.items()},
            "texts_per_s": {k: len(texts) / median(v) for k, v in times.items()},
            "all_times_s": times}  # fmt: skip


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="adapters/smollm2-135m-grc", help="model to serve")
    p.add_argument("--base", default="runs/smollm2-base", help="model of the embedding table")
    p.add_argument("--data", default="data/real/test.jsonl", help="real-text records")
    p.add_argument("--passages", type=int, default=600, help="distinct passages read from --data")
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--max-prompt", type=int, default=192, help="prompt tokens at most")
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--doc-tokens", type=int, default=2048)
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--memory-clients", type=int, default=16)
    p.add_argument("--memory-repeats", type=int, default=1, choices=(1, 2))
    p.add_argument("--embed-texts", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2,
                   help="timed rounds of the embedding and steps tables")  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="torch threads (this machine's cores)")
    p.add_argument("--parts", default="batching,memories,embeddings",
                   help="comma-separated: batching, memories, embeddings, steps")  # fmt: skip
    p.add_argument("--out", default=str(RESULTS_DIR / "serving.json"))
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = machine(command_line("benchmarks.serving", argv))
    parts = set(args.parts.split(","))
    pool = texts_from(ROOT / args.data, max(args.embed_texts, args.passages), "passages")
    short = [" ".join(t.split()[:24]) for t in pool[: args.embed_texts]]
    questions = [" ".join(t.split()[:12]) + " ?" for t in pool[-args.questions :]]
    result: dict[str, Any] = {"benchmark": "serving", "model": args.model}
    if "batching" in parts:
        result["batching"] = batching(args, pool)
    if "memories" in parts:
        result["memories"] = memories_vs_text(args, pool, questions)
    if "embeddings" in parts:
        result["embeddings"] = embeddings(args, short)
    if "steps" in parts:
        result["steps"] = steps(args)
    result["machine"] = finish_machine(info)
    write_json(args.out, result)
    print_report(result)
    return result


def print_report(result: dict[str, Any]) -> None:
    if "batching" in result:
        by = {(r["clients"], r["policy"]): r for r in result["batching"]}
        rows = []
        for c in sorted({r["clients"] for r in result["batching"]}):
            cont, stat = by[(c, "continuous")], by[(c, "static")]
            for name, r in (("continuous", cont), ("static", stat)):
                ms = [f"{1e3 * r[k]:.0f}" for k in ("itl_p50_s", "itl_p99_s")]
                rows.append([c, name, r["requests"], f"{r['tokens_per_s']:.1f}",
                             f"{r['ttft_p50_s']:.2f}", f"{r['ttft_p99_s']:.2f}", *ms])  # fmt: skip
            speed = cont["tokens_per_s"] / stat["tokens_per_s"]
            ttft = stat["ttft_p99_s"] / cont["ttft_p99_s"]
            rows.append([c, "continuous / static", "", f"{speed:.2f}x", "",
                         f"{ttft:.2f}x lower", "", ""])  # fmt: skip
        print(format_table(["clients", "batching", "requests", "output tok/s", "TTFT p50 s",
                            "TTFT p99 s", "ITL p50 ms", "ITL p99 ms"], rows))  # fmt: skip
    if "memories" in result:
        m = result["memories"]
        rows = [[mode, r["requests"], f"{r['requests_per_s']:.3f}", f"{r['tokens_per_s']:.1f}",
                 f"{r['ttft_p50_s']:.2f}", f"{r['ttft_p99_s']:.2f}"]
                for mode, r in m["best"].items()]  # fmt: skip
        ratio = m["best"]["memory"]["requests_per_s"] / m["best"]["text"]["requests_per_s"]
        rows.append(["memory / text", "", f"{ratio:.2f}x", "", "", ""])
        print(f"\n{m['questions']} questions over {m['docs']} documents of {m['doc_tokens']} "
              f"tokens, {m['clients']} clients; compressing the documents: "
              f"{m['compress_s']:.1f} s (once)")  # fmt: skip
        print(format_table(["document as", "requests", "requests/s", "output tok/s",
                            "TTFT p50 s", "TTFT p99 s"], rows))  # fmt: skip
    if "steps" in result:
        st = result["steps"]
        print(f"\nprograms of one engine (all compiled at start-up: {st['compile_s']:.0f} s)")
        print(format_table(["program", "ms"],
                           [[k, f"{1e3 * v:.0f}"] for k, v in st["seconds"].items()]))  # fmt: skip
    if "embeddings" in result:
        e = result["embeddings"]
        base = e["texts_per_s"]["transformers eager"]
        rows = [[k, f"{e['seconds'][k]:.1f}", f"{v:.1f}", f"{v / base:.2f}x"]
                for k, v in e["texts_per_s"].items()]  # fmt: skip
        print(f"\n{e['texts']} short texts, {e['threads']} threads")
        print(format_table(["embedder", "seconds", "texts/s", "vs transformers"], rows))


if __name__ == "__main__":
    main()
