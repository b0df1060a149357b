"""Smoke test: `benchmarks/serving.py` runs every part end to end at tiny sizes against live
servers of a tiny run (and `transformers` over its export) and reports what it measured."""

from __future__ import annotations

import json

from benchmarks import serving
from tests.serve.test_server import run_dir  # noqa: F401  (the fixture: a tiny trained run)


def test_serving_benchmark_quick(run_dir, tmp_path):  # noqa: F811
    data = f"{run_dir}/../../synth/validation.jsonl"
    out = tmp_path / "serving.json"
    serving.main([
        "--model", run_dir, "--base", run_dir, "--data", data, "--clients", "1,3",
        "--requests-per-client", "2", "--max-batch", "2", "--max-seq-len", "96",
        "--max-prompt", "12", "--docs", "1", "--questions", "2", "--doc-tokens", "24",
        "--answer-tokens", "4", "--memory-clients", "2", "--embed-texts", "6", "--repeats", "1",
        "--passages", "100",
        "--parts", "batching,memories,embeddings,steps", "--out", str(out),
    ])  # fmt: skip
    saved = json.loads(out.read_text())
    runs = {(r["clients"], r["policy"]): r for r in saved["batching"]}
    assert set(runs) == {(c, p) for c in (1, 3) for p in ("continuous", "static")}
    for (clients, _), r in runs.items():
        assert r["requests"] == 2 * clients and r["tokens"] > 0 and r["tokens_per_s"] > 0
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
    # Both policies generate the same greedy tokens for the same work.
    assert runs[(3, "continuous")]["tokens"] == runs[(3, "static")]["tokens"]
    m = saved["memories"]
    assert set(m["best"]) == {"memory", "text"} and m["compress_s"] > 0
    assert all(r["requests"] == 2 for r in m["best"].values())
    e = saved["embeddings"]
    assert set(e["texts_per_s"]) == {"Engine.embed", "/v1/embeddings", "transformers eager"}
    assert all(v > 0 for v in e["texts_per_s"].values())
    assert {"decode [2, 1]", "prefill [1, 64]", "prefill [2, 64]"} <= set(saved["steps"]["seconds"])
