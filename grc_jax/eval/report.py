"""The readable form of a `grc eval` result: a few markdown tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grc_jax.eval.metrics import MEASURES

HEADERS = {"ndcg@10": "nDCG@10", "recall@1": "R@1", "recall@10": "R@10", "mrr@10": "MRR@10"}


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table; floats with 4 decimals, None as `-`."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out += [
        "| "
        + " | ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )
        + " |"
        for r in cells
    ]  # the first column names the row
    return "\n".join(out)


def format_report(result: dict[str, Any]) -> str:
    """The sections of an evaluation result that were run, as text."""
    parts = []
    model, data = result.get("model", {}), result.get("data", {})
    if model or data:
        parts.append(
            f"model {model.get('path')} ({model.get('kind')}, {model.get('fingerprint')}) on "
            f"{data.get('name')}"
        )
    r = result.get("retrieval")
    if r:
        parts.append(
            f"retrieval: {r['queries']} queries over {r['corpus']} documents (exact inner product)"
        )
        rows = [
            [name, *(r[key][m] for m in MEASURES)]
            for name, key in (("plain", "plain"), ("self-reason", "self_reason"))
        ]
        parts.append(table(["query embedding", *HEADERS.values()], rows))
    c = result.get("compression")
    if c:
        parts.append(
            f"compression: {c['documents']} documents of <= {c['max_doc_tokens']} tokens: token "
            f"accuracy {_cell(c['token_accuracy'])}, exact reconstruction "
            f"{_cell(c['exact_reconstruction'])}"
        )
    g = result.get("generation")
    if g:
        parts.append(
            f"generation kept: plain LM loss {_cell(g['lm_loss'])} (perplexity "
            f"{_cell(g['perplexity'])}) over {g['tokens']} tokens of {g['documents']} documents"
        )
    rag = result.get("rag")
    if rag:
        parts.append(
            f"RAG: {rag['queries']} queries, target = first {rag['target_tokens']} tokens of the "
            f"positive, distractors: {rag['distractors']}"
        )
        rows = [
            [name, m.get("token_accuracy"), m.get("exact_match")]
            for name, m in rag["modes"].items()
        ]
        parts.append(table(["context", "token accuracy", "exact match"], rows))
    t = result.get("timings_s")
    if t:
        parts.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    return "\n\n".join(parts)
