"""`grc eval` end to end on a tiny random model, and the agreement of its two paths: the
training-layout forward (teacher forcing) and the engine (greedy decoding over memories)."""

import json
import math

import numpy as np
import pytest

from grc_jax.checkpoints import load_model
from grc_jax.cli import main
from grc_jax.data.formats import doc_id
from grc_jax.data.layout import gen, latents, text
from grc_jax.eval.datasets import from_jsonl, read_beir
from grc_jax.eval.evaluate import RAG_MODES, EvalOptions, Evaluation
from tests.eval.fixtures import CORPUS, write_beir, write_tiny_model

SMALL = ["--max-doc-tokens", "16", "--compression-docs", "4", "--rag-queries", "3",
         "--rag-target-tokens", "8", "--max-reasoning", "4", "--batch-size", "4"]  # fmt: skip
METRICS = {"ndcg@10", "recall@1", "recall@10", "mrr@10"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalq")
    return {"root": root, "beir": write_beir(root / "beir"), "model": write_tiny_model(root / "m")}


@pytest.fixture(scope="module")
def beir_result(files):
    out = files["root"] / "result.json"
    rc = main(["eval", str(files["model"]), "--beir", str(files["beir"]), *SMALL, "--quiet",
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    return json.loads(out.read_text())


def _unit(x):
    return x is not None and 0.0 <= x <= 1.0


def test_eval_json_has_every_key(beir_result):
    r = beir_result
    assert r["model"]["kind"] == "import" and len(r["model"]["fingerprint"]) == 16
    assert r["data"] == {"name": "beir:beir/test", "source": r["data"]["source"],
                         "split": "test", "queries": 3, "corpus": 6}  # fmt: skip
    ret = r["retrieval"]
    assert ret["queries"] == 3 and ret["corpus"] == 6
    for kind in ("plain", "self_reason"):
        assert set(ret[kind]) == METRICS and all(_unit(v) for v in ret[kind].values())
        assert ret[kind]["recall@10"] == 1.0  # 6 documents: everything is in the top 10
    c = r["compression"]
    assert c["documents"] == 4 and c["max_doc_tokens"] == 16
    assert _unit(c["token_accuracy"]) and _unit(c["exact_reconstruction"])
    g = r["generation"]
    assert g["documents"] == 4 and g["tokens"] > 0
    assert g["perplexity"] == pytest.approx(math.exp(g["lm_loss"]))
    rag = r["rag"]
    assert rag["queries"] == 3 and rag["target_tokens"] == 8
    assert rag["distractors"] == "top retrieved (plain embeddings)"  # BEIR: no hard negatives
    assert list(rag["modes"]) == list(RAG_MODES)
    for m in rag["modes"].values():
        assert _unit(m["token_accuracy"]) and _unit(m["exact_match"])
    assert r["timings_s"]["total"] > 0


def _jsonl(path):
    docs = [body for _, body in CORPUS.values()]
    path.write_text("".join(
        json.dumps({"query": f"which is {d.split()[0]} ?", "positive": d,
                    "negatives": [docs[(i + 1) % 6], docs[(i + 2) % 6]]}) + "\n"
        for i, d in enumerate(docs[:3])
    ))  # fmt: skip
    return path


def test_jsonl_split_and_stdout_is_the_json(files, beir_result, capsys):
    jsonl = _jsonl(files["root"] / "split.jsonl")
    capsys.readouterr()
    rc = main(["eval", str(files["model"]), "--data", str(jsonl), *SMALL, "--skip", "compression",
               "--skip", "generation", "--skip", "rag"])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 0
    r = json.loads(cap.out)  # stdout holds the JSON alone; progress and table go to stderr
    assert r["compression"] is None and r["generation"] is None and r["rag"] is None
    assert r["data"]["name"] == "jsonl:split.jsonl" and r["data"]["corpus"] == 5
    assert set(r["retrieval"]["plain"]) == METRICS
    assert "| query embedding |" in cap.err and "| self-reason " in cap.err


def test_teacher_forcing_agrees_with_greedy_decoding_over_memories(files):
    """Greedy tokens decoded by the engine over memories are, teacher-forced through the
    training layout (memory m at [m*K, (m+1)*K), consumer after them), all argmax hits."""
    cfg, params, tok = load_model(files["model"])
    data = read_beir(files["beir"])
    ev = Evaluation(cfg, params, tok, data, EvalOptions(batch_size=4), log=lambda _m: None)
    eng, k, bos = ev.engine, ev.engine.K, tok.bos_id
    docs = [tok.encode(t) for t in ev.doc_texts[:3]]
    mems = [m for m, _ in eng.compress(ev.doc_texts[:3])]
    query = [bos, *tok.encode(ev.query_texts[0])]
    examples, blocks = [], []
    for n in (1, 3):
        g = eng.generate_ids([query], [mems[:n]], max_new_tokens=6, stop_tokens=())[0].tokens
        examples.append([[text([bos, *d]), latents(k)] for d in docs[:n]]
                        + [[text(query), gen(g)]])  # fmt: skip
        blocks.append(n)
    g = eng.generate_ids([[*docs[0], *query]], max_new_tokens=6, stop_tokens=())[0].tokens
    examples.append([[text([*docs[0], *query]), gen(g)]])
    blocks.append(0)
    stats = ev.scorer.teacher_forced(examples, blocks)
    np.testing.assert_array_equal(stats[:, 0], [6, 6, 6])
    np.testing.assert_array_equal(stats[:, 1], [6, 6, 6])
    assert np.all(stats[:, 2] > 0)


def test_rag_distractors_are_the_hard_negatives_of_a_jsonl_split(files):
    cfg, params, tok = load_model(files["model"])
    data = from_jsonl(_jsonl(files["root"] / "rag.jsonl"))
    ev = Evaluation(cfg, params, tok, data, EvalOptions(rag_queries=2), log=lambda _m: None)
    items, source = ev._rag_items()
    assert source == "hard negatives"
    docs = [doc_id(body) for _, body in CORPUS.values()]
    assert [it["docs"] for it in items] == [docs[0:3], docs[1:4]]


def test_overrides_that_change_parameter_shapes_are_refused(files, capsys):
    capsys.readouterr()
    argv = ["eval", str(files["model"]), "--beir", str(files["beir"]), "model.d_ff=128"]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "change the model's parameter shapes" in err[0]
