"""`grc generate | embed | compress | index | update | rag` end to end on tiny trained runs."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from grc_jax.checkpoints import load_model
from grc_jax.cli import main
from grc_jax.core.config import load_config, save_config
from grc_jax.data.synth import synthesize
from grc_jax.infer.engine import Engine
from grc_jax.infer.index import build_index, load_index, search
from grc_jax.infer.memory import LatentMemory
from grc_jax.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=16",
    "model.d_ff=128",
    "grc.num_latents=4",
    "data.seq_len=128",
    "data.batch_size=8",
    "train.eval_every=1000",
    "train.eval_queries=2",
    "train.warmup_steps=1",
    "train.steps=2",
    "train.checkpoint_every=1",
]
DOC = "velora is a city . its population is 42 thousand ."
QUERY = "which city has a population of forty two thousand ?"
LONG = "velora " * 1100  # more tokens than configs/tiny.yaml's max_position_embeddings=1024


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`ind`: a run trained for 2 steps by `grc train`'s loop. `rec`: the same run directory with
    `grc.memory_mode=recurrent` in its config (the mode changes masks and positions, not the
    parameters), so that `update` has a recurrent model without a second training run."""
    root = tmp_path_factory.mktemp("infer")
    data = root / "synth"
    synthesize(data, seed=0, queries_per_doc=1)
    overrides = [
        *SMALL,
        f"data.train_path={data}/train.jsonl",
        f"data.eval_path={data}/validation.jsonl",
        f"train.output_dir={root}/runs",
        "train.run_name=ind",
    ]
    result = train(load_config(ROOT / "configs/tiny.yaml", overrides), quiet=True)
    final_params = jax.device_get(result["state"].params)
    ind, rec = root / "runs/ind", root / "runs/rec"
    shutil.copytree(ind, rec)
    save_config(
        load_config(ind / "config.yaml", ["grc.memory_mode=recurrent"]), rec / "config.yaml"
    )
    return {"root": root, "data": data, "ind": str(ind), "rec": str(rec), "params": final_params}


def grc(capsys, *args):
    """Run `grc ARGS` in process: (exit code, stdout, the `grc ...: error:` lines of stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, [line for line in cap.err.splitlines() if line.startswith("grc ")]


def test_load_model_restores_the_checkpoint_params(runs):
    cfg, params, tok = load_model(runs["ind"])
    assert cfg.grc.num_latents == 4 and cfg.model.n_layers == 2
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), params, runs["params"])
    assert all(jax.tree.leaves(same))  # the params training ended with, bit for bit
    _, params1, _ = load_model(runs["ind"], step=1)
    differs = jax.tree.map(lambda a, b: not np.array_equal(a, b), params1.model, params.model)
    assert any(jax.tree.leaves(differs))
    assert tok.encode(DOC)


def test_generate_text_json_and_sampling(runs, capsys):
    rc, out, _ = grc(
        capsys, "generate", runs["ind"], "--prompt", QUERY, "--max-new-tokens", 5, "--json"
    )
    assert rc == 0
    g = json.loads(out)["generations"][0]
    assert g["prompt"] == QUERY and 1 <= len(g["tokens"]) <= 5
    assert g["finish_reason"] in ("stop", "length")
    rc, text, _ = grc(capsys, "generate", runs["ind"], "--prompt", QUERY, "--max-new-tokens", 5)
    assert rc == 0 and text == g["text"] + "\n"
    sampled = [
        grc(
            capsys,
            "generate",
            runs["ind"],
            "--prompt",
            QUERY,
            "--max-new-tokens",
            5,
            "--temperature",
            1.0,
            "--top-k",
            20,
            "--top-p",
            0.9,
            "--seed",
            3,
            "--json",
        )
        for _ in range(2)
    ]
    assert sampled[0][0] == 0 and sampled[0][1] == sampled[1][1]  # seeded: reproducible


def test_compress_embed_and_generate_over_memories(runs, capsys, tmp_path):
    mem = tmp_path / "velora.safetensors"
    rc, out, _ = grc(capsys, "compress", runs["ind"], "--text", DOC, "--out", mem)
    assert rc == 0
    summary = json.loads(out)
    m = LatentMemory.load(mem)
    assert m.k.shape == (2, 4, 2, 16) and list(m.k.shape) == summary["shape"]
    assert m.model == summary["model"] and m.memory_mode == "independent"

    # Several texts (a file) -> a directory of memories with their embeddings.
    texts = tmp_path / "docs.txt"
    texts.write_text(f"{DOC}\n\nkanvur is a city . its population is 44 thousand .\n")
    rc, out, _ = grc(capsys, "compress", runs["ind"], "--file", texts, "--out", tmp_path / "mems")
    assert rc == 0
    files = sorted((tmp_path / "mems").glob("*.safetensors"))
    assert [f.name for f in files] == ["000000.safetensors", "000001.safetensors"]
    # (a batch of two vs one alone: the same values up to float32 rounding)
    np.testing.assert_allclose(LatentMemory.load(files[0]).k, m.k, atol=1e-5)

    # The embedding of a text equals the one its compression pass yields.
    rc, out, _ = grc(
        capsys,
        "embed",
        runs["ind"],
        "--file",
        texts,
        "--query",
        QUERY,
        "--out",
        tmp_path / "emb.npy",
    )
    assert rc == 0
    emb = np.load(tmp_path / "emb.npy")
    assert emb.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[:2], np.load(tmp_path / "mems/embeddings.npy"), atol=1e-5)
    scores = json.loads(out)["scores"]
    np.testing.assert_allclose(scores, emb[2:] @ emb[:2].T, atol=1e-4)
    rc, out, _ = grc(capsys, "embed", runs["ind"], "--query", QUERY, "--self-reason")
    assert rc == 0 and len(json.loads(out)["items"][0]["embedding"]) == 64

    rc, out, _ = grc(
        capsys,
        "generate",
        runs["ind"],
        "--prompt",
        "velora",
        "--memory",
        mem,
        files[1],
        "--max-new-tokens",
        4,
        "--json",
    )
    assert rc == 0 and json.loads(out)["memories"] == [str(mem), str(files[1])]
    # No prompt: the model writes from the memory alone (the trained consumer block, [bos]).
    rc, out, _ = grc(
        capsys, "generate", runs["ind"], "--memory", mem, "--max-new-tokens", 3, "--json"
    )
    assert rc == 0 and json.loads(out)["generations"][0]["prompt"] == ""


def test_index_search_and_rag(runs, capsys, tmp_path):
    corpus = runs["data"] / "validation.jsonl"
    records = [json.loads(line) for line in corpus.read_text().splitlines()][:6]
    small = tmp_path / "corpus.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in records))
    docs = list(dict.fromkeys(t for r in records for t in [r["positive"], *r["negatives"]]))
    rc, out, _ = grc(capsys, "index", runs["ind"], "--corpus", small, "--out", tmp_path / "idx")
    assert rc == 0 and json.loads(out)["count"] == len(docs)
    index = load_index(tmp_path / "idx")
    assert index.texts == docs and index.embeddings.shape == (len(docs), 64)
    meta = json.loads((tmp_path / "idx/index.json").read_text())
    assert meta["num_latents"] == 4 and meta["memory_mode"] == "independent"
    scores, ids = search(index, index.embeddings[:3], k=2)
    assert ids[:, 0].tolist() == [0, 1, 2] and np.all(scores[:, 0] >= scores[:, 1])
    mems = index.memories([1])
    assert mems[0].k.shape == (2, 4, 2, 16)

    rc, out, _ = grc(
        capsys,
        "rag",
        runs["ind"],
        "--index",
        tmp_path / "idx",
        "--question",
        records[0]["query"],
        "-k",
        2,
        "--max-new-tokens",
        4,
        "--json",
    )
    assert rc == 0
    r = json.loads(out)
    assert [h["rank"] for h in r["hits"]] == [1, 2]
    assert r["hits"][0]["score"] >= r["hits"][1]["score"]
    assert all(h["text"] == docs[h["id"]] for h in r["hits"])
    question = records[0]["query"]
    rc, out, _ = grc(
        capsys,
        "rag",
        runs["ind"],
        "--index",
        tmp_path / "idx",
        "--question",
        question,
        "-k",
        1,
        "--self-reason",
        "--max-new-tokens",
        2,
    )
    assert rc == 0 and out.startswith("1. [") and "\nanswer: " in out

    # A plain text corpus: one document per line.
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(docs[:3]) + "\n")
    rc, out, _ = grc(capsys, "index", runs["ind"], "--corpus", txt, "--out", tmp_path / "idx2")
    assert rc == 0 and load_index(tmp_path / "idx2").texts == docs[:3]

    # An index made by another model is refused, naming it.
    rc, _, err = grc(capsys, "rag", runs["rec"], "--index", tmp_path / "idx", "--question", QUERY)
    assert rc == 2 and len(err) == 1 and "idx" in err[0] and "built with" in err[0]


def test_update_in_recurrent_mode(runs, capsys, tmp_path):
    mem, new = tmp_path / "m.safetensors", tmp_path / "m2.safetensors"
    assert grc(capsys, "compress", runs["rec"], "--text", DOC, "--out", mem)[0] == 0
    rc, out, _ = grc(
        capsys,
        "update",
        runs["rec"],
        "--memory",
        mem,
        "--chunk",
        "its area is 7 km .",
        "--out",
        new,
    )
    assert rc == 0
    old, updated = LatentMemory.load(mem), LatentMemory.load(new)
    assert updated.k.shape == old.k.shape and updated.memory_mode == "recurrent"
    _, _, tok = load_model(runs["rec"])
    assert updated.source_tokens == old.source_tokens + len(tok.encode("its area is 7 km ."))
    assert json.loads(out)["source_tokens"] == updated.source_tokens
    assert not np.allclose(updated.k, old.k)
    rc, _, _ = grc(
        capsys,
        "generate",
        runs["rec"],
        "--prompt",
        "velora",
        "--memory",
        new,
        "--max-new-tokens",
        3,
    )
    assert rc == 0
    # Independent mode: no update; and a recurrent memory is not an independent model's.
    rc, _, err = grc(capsys, "update", runs["ind"], "--memory", mem, "--chunk", "x", "--out", new)
    assert rc == 2 and "recurrent" in err[0]


@pytest.fixture(scope="module")
def import_dir(runs):
    """A directory shaped like `grc import-hf` output, holding the `ind` run's transformer."""
    from grc_jax.checkpoints import save_params

    cfg, params, _ = load_model(runs["ind"])
    out = Path(runs["root"]) / "imported"
    out.mkdir()
    save_config(cfg, out / "config.yaml")
    save_params(params.model, out / "params")
    shutil.copy(Path(runs["ind"]) / "tokenizer.model", out / "tokenizer.model")
    (out / "import_info.json").write_text("{}")
    return str(out)


def test_imported_model_loads_and_generates(runs, import_dir, capsys):
    cfg, params, tok = load_model(import_dir)
    _, trained, _ = load_model(runs["ind"])
    np.testing.assert_array_equal(params.model["embed"], trained.model["embed"])
    assert params.lora is None and params.head is not None  # model + head, no LoRA
    assert Engine(cfg, params, tok).K == 4
    rc, out, _ = grc(capsys, "generate", import_dir, "--prompt", QUERY, "--max-new-tokens", 2)
    assert rc == 0
    rc, _, err = grc(capsys, "generate", import_dir, "--step", 1, "--prompt", QUERY)
    assert rc == 2 and "import directory" in err[0]


@pytest.fixture(scope="module")
def bad(runs):
    """Inputs for the error cases: memories of each run, a K=2 memory, a run without checkpoints."""
    d = Path(runs["root"]) / "bad"
    d.mkdir()
    for name in ("ind", "rec"):
        engine = Engine(*load_model(runs[name]))
        memory = engine.compress([DOC])[0][0]
        memory.save(d / f"{name}.safetensors")
        if name == "ind":
            build_index(engine, [DOC, "kanvur is a city ."], d / "idx")
    # Damaged copies of the index.
    for damage in ("notexts", "trunc", "pickle", "nan"):
        shutil.copytree(d / "idx", d / f"idx_{damage}")
    meta = json.loads((d / "idx/index.json").read_text())
    del meta["texts"]
    (d / "idx_notexts/index.json").write_text(json.dumps(meta))
    st = (d / "idx/memories.safetensors").read_bytes()
    (d / "idx_trunc/memories.safetensors").write_bytes(st[: len(st) // 2])
    np.save(d / "idx_pickle/embeddings.npy", np.array([{"x": 1}] * 2, object), allow_pickle=True)
    emb = np.load(d / "idx/embeddings.npy")
    emb[1, 0] = np.nan
    np.save(d / "idx_nan/embeddings.npy", emb)
    LatentMemory(  # right model, wrong K
        k=memory.k[:, :2],
        v=memory.v[:, :2],
        model=memory.model,
        num_latents=2,
        memory_mode=memory.memory_mode,
    ).save(d / "k2.safetensors")
    (d / "nockpt").mkdir()
    for f in ("config.yaml", "tokenizer.model"):
        shutil.copy(Path(runs["ind"]) / f, d / "nockpt" / f)
    (d / "bad.jsonl").write_text(json.dumps({"query": "q", "positive": "p"}) + "\n{oops\n")
    return d


@pytest.mark.parametrize(
    "args, named",
    [
        (["generate", "{bad}/nope", "--prompt", "hi"], "'{bad}/nope' does not exist"),
        (["generate", "{data}", "--prompt", "hi"], "'{data}' is neither a `grc train` run"),
        (["generate", "{bad}/nockpt", "--prompt", "hi"], "refusing to use random weights"),
        (["generate", "{ind}", "--step", "9", "--prompt", "hi"], "no checkpoint at step 9"),
        (["generate", "{ind}", "--prompt", " "], "--prompt: empty text"),
        (["generate", "{ind}"], "nothing to generate from"),
        (
            ["generate", "{rec}", "--memory", "{bad}/rec.safetensors", "{bad}/rec.safetensors"],
            "--memory: {rec} uses memory_mode='recurrent'",
        ),
        (["embed", "{ind}", "--text", "a", "--text", ""], "--text #2: empty text"),
        (["compress", "{ind}", "--text", "", "--out", "{bad}/x.safetensors"], "--text: empty"),
        (
            [
                "update",
                "{rec}",
                "--memory",
                "{bad}/rec.safetensors",
                "--chunk",
                "",
                "--out",
                "{bad}/y",
            ],
            "--chunk: empty text",
        ),
        (
            [
                "update",
                "{rec}",
                "--memory",
                "{bad}/ind.safetensors",
                "--chunk",
                "x",
                "--out",
                "{bad}/y",
            ],
            "memory {bad}/ind.safetensors: made in memory_mode='independent'",
        ),
        (
            ["generate", "{ind}", "--prompt", "hi", "--memory", "{bad}/rec.safetensors"],
            "memory {bad}/rec.safetensors: made in memory_mode='recurrent'",
        ),
        (
            ["generate", "{ind}", "--prompt", "hi", "--memory", "{bad}/k2.safetensors"],
            "memory {bad}/k2.safetensors: shape (2, 2, 2, 16)",
        ),
        (
            ["generate", "{ind}", "--prompt", "hi", "--memory", "{bad}/none.safetensors"],
            "'{bad}/none.safetensors' does not exist",
        ),
        (["index", "{ind}", "--corpus", "{bad}/bad.jsonl", "--out", "{bad}/i"], "bad.jsonl:2:"),
        (["rag", "{ind}", "--index", "{bad}", "--question", "hi"], "'{bad}': no index.json"),
        # Inputs longer than the model's positions (model.max_position_embeddings=1024).
        (
            ["compress", "{ind}", "--text", "a", "--text", LONG, "--out", "{bad}/long"],
            "compress: text 1 ('velora velora velora vel...') has ",
        ),
        (["embed", "{ind}", "--text", LONG], "embed: text 0 ('velora velora velora vel...') has "),
        (
            ["embed", "{ind}", "--query", "hi", "--self-reason", "--max-reasoning", "1100"],
            "+ up to 1100 reasoning tokens + 4 latents",
        ),
        (
            ["generate", "{ind}", "--prompt", "hi", "--max-new-tokens", "1100"],
            "+ 1100 new tokens = ",
        ),
        (
            [
                "update",
                "{rec}",
                "--memory",
                "{bad}/rec.safetensors",
                "--chunk",
                LONG,
                "--out",
                "{bad}/y",
            ],
            "update: chunk ('velora velora velora vel...') has 4 memory latents + ",
        ),
        # Malformed indexes: the file and what is wrong.
        (
            ["rag", "{ind}", "--index", "{bad}/idx_notexts", "--question", "hi"],
            "idx_notexts/index.json': no 'texts' key",
        ),
        (
            ["rag", "{ind}", "--index", "{bad}/idx_trunc", "--question", "hi"],
            "idx_trunc/memories.safetensors': not a readable safetensors file",
        ),
        (
            ["rag", "{ind}", "--index", "{bad}/idx_pickle", "--question", "hi"],
            "idx_pickle/embeddings.npy': not a plain numeric .npy array; pickled data is never",
        ),
        (
            ["rag", "{ind}", "--index", "{bad}/idx_nan", "--question", "hi"],
            "idx_nan/embeddings.npy': 1 embedding(s) hold NaN or inf (first: row 1)",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(runs, bad, capsys, args, named):
    fmt = {"bad": bad, "data": runs["data"], **{k: v for k, v in runs.items() if k != "params"}}
    rc, _, err = grc(capsys, *[a.format(**fmt) for a in args])
    assert rc == 2
    assert len(err) == 1 and named.format(**fmt) in err[0], err
    if "velora velora" in " ".join(args) or "--max-new-tokens" in args or "1100" in args:
        assert "more than model.max_position_embeddings=1024" in err[0]
