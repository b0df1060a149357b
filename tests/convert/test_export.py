"""`grc export`: HF directories that transformers loads as the plain base model, and whose
`trust_remote_code` module reproduces the JAX engine's GRC modes (embed, compress, generation over
memories, recurrent update), for tiny random models of each family and a tiny trained run; export
-> `grc import-hf` round trip; periodic exports during training; bad input; SmolLM2."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from grc_jax.checkpoints import load_imported, load_model
from grc_jax.cli import main as grc_main
from grc_jax.convert.export import export_checkpoint, export_hooks, export_params, load_export
from grc_jax.convert.hf_import import import_checkpoint, read_safetensors
from grc_jax.convert.param_map import params_to_hf
from grc_jax.core.batch import Rows
from grc_jax.core.config import (
    Config,
    ConfigError,
    GRCConfig,
    ModelConfig,
    RopeScalingConfig,
    TrainConfig,
    load_config,
)
from grc_jax.core.errors import ExportError
from grc_jax.core.roles import TEXT
from grc_jax.data.layout import latents, one_per_row, text
from grc_jax.data.synth import synthesize
from grc_jax.data.tokenizer import load_tokenizer
from grc_jax.infer.engine import Engine, EngineOptions
from grc_jax.infer.memory import LatentMemory
from grc_jax.model import forward
from grc_jax.model.params import init_grc_params
from grc_jax.train.loop import train
from tests import helpers

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4  # fp32 logits and memories
COS = 0.9999  # embeddings
K = 4
OPTS = EngineOptions(
    page_size=4, n_pages=40, max_batch=2, max_seq_len=40, max_memories=2, prefill_chunk=8
)
WORDS = (
    "the cat sat on mat dogs run fast today ok a city its population is river length km which "
    "has of thousand velora tirdai answer : ? . 1 2 3 4"
).split()
DOCS = ["the cat sat on the mat", "dogs run fast today ."]  # one batch shape: one JAX compile
PROMPT = "which city has a river ?"


def word_tokenizer(directory: Path):
    """A tiny word-level tokenizer over `WORDS`, loaded as grc's HFTokenizer."""
    return helpers.word_tokenizer(directory, WORDS)


def perturb(params, seed: int = 0):
    """Norm scales 1 + N(0, 0.3), biases and LoRA `b` N(0, 0.2): no parameter is trivial."""
    rng = np.random.default_rng(seed)

    def f(path, x):
        name = str(getattr(path[-1], "key", ""))
        if name == "scale":
            return x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
        if name in ("bias", "b"):
            return x + 0.2 * rng.standard_normal(x.shape).astype(np.float32)
        return x

    return jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(f, jax.device_get(params)))


def grc_module(model):
    """The dynamic `modeling_grc` module transformers loaded for `model`."""
    return sys.modules[type(model).__module__]


def jax_logits(cfg, model_params, rows) -> np.ndarray:
    batch = jax.tree.map(jnp.asarray, rows)
    return np.asarray(forward(model_params, cfg.model, cfg.grc, batch).logits)


def plain_rows(ids: np.ndarray) -> Rows:
    ones = np.ones_like(ids)
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    return Rows(tokens=ids, segment_ids=ones, block_ids=0 * ones, roles=TEXT * ones,
                positions=np.ascontiguousarray(positions))  # fmt: skip


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# ------------------------------------------------------------------------ tiny random models

SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
             init_std=0.2)  # fmt: skip
CASES = {
    # GQA, tied, Llama-3 RoPE scaling that matters at these positions, LoRA factors merged.
    "llama_independent_lora": (
        dict(
            family="llama",
            rope_scaling=RopeScalingConfig(factor=4.0, original_max_position_embeddings=16),
        ),
        dict(memory_mode="independent", pooling="mean"),
        2,
    ),  # fmt: skip
    "qwen2_independent_projection": (
        dict(family="qwen2", qkv_bias=True),
        dict(pooling="mean", projection_dim=8),
        0,
    ),  # fmt: skip
    # MHA, untied, head_dim != d_model / n_heads, scanned layers, recurrent mode.
    "qwen3_recurrent_last": (
        dict(
            family="qwen3",
            qk_norm=True,
            n_kv_heads=4,
            head_dim=16,
            tie_embeddings=False,
            scan_layers=True,
        ),
        dict(memory_mode="recurrent", pooling="last", projection_dim=16),
        0,
    ),  # fmt: skip
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("word_tokenizer"))


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tok, tmp_path_factory):
    model_kw, grc_kw, lora = CASES[request.param]
    cfg = Config(
        model=ModelConfig(**{**SMALL, **model_kw}),
        grc=GRCConfig(num_latents=K, **grc_kw),
        train=TrainConfig(lora_rank=lora),
    )
    params = perturb(init_grc_params(cfg, jax.random.key(0)))
    out = tmp_path_factory.mktemp(request.param) / "export"
    result = export_params(cfg, params, tok, out)
    grc = transformers.AutoModel.from_pretrained(out, trust_remote_code=True)
    return SimpleNamespace(
        name=request.param, cfg=cfg, params=params, out=out, result=result, grc=grc,
        engine=Engine(cfg, params, tok, OPTS), tok=tok,
        # transformers 5 maps model_type qwen2 to Qwen2Tokenizer whatever tokenizer_config says;
        # this word-level tokenizer is loaded as what it is.
        hf_tok=transformers.PreTrainedTokenizerFast.from_pretrained(out),
    )  # fmt: skip


def test_export_files_and_configs(case):
    out, cfg = case.out, case.cfg
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == sorted([
        "config.json", "generation_config.json", "grc/latents.safetensors", "grc_config.json",
        "model.safetensors", "modeling_grc.py", "tokenizer.json", "tokenizer_config.json",
    ])  # fmt: skip
    hf = json.loads((out / "config.json").read_text())
    family = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[cfg.model.family]
    assert hf["model_type"] == cfg.model.family and hf["architectures"] == [f"{family}ForCausalLM"]
    assert hf["auto_map"]["AutoModel"] == f"modeling_grc.GRC{family}ForCausalLM"
    assert hf["dtype"] == hf["torch_dtype"] == "float32"
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (2, 3, 0)
    grc = json.loads((out / "grc_config.json").read_text())
    assert grc["num_latents"] == K and grc["memory_mode"] == cfg.grc.memory_mode
    assert grc["pooling"] == cfg.grc.pooling and grc["projection_dim"] == cfg.grc.projection_dim
    assert grc["temperature"] == pytest.approx(cfg.grc.temperature)
    assert grc["model_fingerprint"] == case.engine.fingerprint
    extras = read_safetensors(out / "grc/latents.safetensors")
    merged = case.params.merged(cfg.model.scan_layers)
    np.testing.assert_array_equal(extras["latents"], merged["latents"])
    if cfg.grc.projection_dim:
        np.testing.assert_array_equal(extras["projection"], case.params.head.projection)
    # The latents' file is not picked up as a model weight (transformers, `grc import-hf`).
    _, tensors, _ = load_export(out)
    assert set(tensors) == set(params_to_hf(merged, cfg.model))


def test_plain_transformers_logits_match_jax(case):
    """No remote code: the family's own class, whose logits are grc's (LoRA merged)."""
    plain = transformers.AutoModelForCausalLM.from_pretrained(case.out)
    family = type(plain).__name__
    assert family in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
    assert not family.startswith("GRC")
    ids = np.random.default_rng(0).integers(4, 36, (2, 12)).astype(np.int32)
    ids[:, 0] = 2  # bos
    with torch.no_grad():
        got = plain(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    merged = case.params.merged(case.cfg.model.scan_layers)
    want = jax_logits(case.cfg, merged, plain_rows(ids))
    assert np.abs(got - want).max() <= TOL
    # The GRC class without memories is the same causal LM.
    with torch.no_grad():
        grc_logits = case.grc(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    assert np.abs(grc_logits - want).max() <= TOL
    g = plain.generate(torch.from_numpy(ids[:1].astype(np.int64)), max_new_tokens=3,
                       do_sample=False)  # fmt: skip
    assert g.shape == (1, 15)
    x = torch.from_numpy(ids[:1].astype(np.int64))
    assert torch.equal(case.grc.generate(x, max_new_tokens=3, do_sample=False), g)


def test_embed_matches_jax(case):
    got = case.grc.embed(DOCS, tokenizer=case.hf_tok).numpy()
    want = case.engine.embed(DOCS)
    assert got.shape == want.shape == (2, case.cfg.grc.projection_dim or case.cfg.model.d_model)
    assert cosines(got, want).min() >= COS
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
    got = case.grc.embed(DOCS, tokenizer=case.hf_tok, self_reason=True, max_reasoning=4)
    want = case.engine.embed(DOCS, self_reason=True, max_reasoning=4)
    assert cosines(got.numpy(), want).min() >= COS


def test_memories_and_generation_over_them_match_jax(case, tmp_path):
    eng, grc, cfg = case.engine, case.grc, case.cfg
    jax_mems = eng.compress(DOCS)
    torch_mems = grc.compress(DOCS, tokenizer=case.hf_tok)
    for (jm, jemb), tm in zip(jax_mems, torch_mems):
        assert np.abs(tm.k.numpy() - jm.k).max() <= TOL
        assert np.abs(tm.v.numpy() - jm.v).max() <= TOL
        assert (tm.model, tm.source_tokens, tm.memory_mode) == (
            jm.model, jm.source_tokens, jm.memory_mode)  # fmt: skip
        assert cosines(tm.embedding.numpy(), jemb) >= COS

    # Every logit of a consumer block over the memories = the training forward's.
    n_mem = 2 if cfg.grc.memory_mode == "independent" else 1
    docs = [[case.tok.bos_id, *case.tok.encode(d)] for d in DOCS[:n_mem]]
    prompt = [case.tok.bos_id, *case.tok.encode(PROMPT)]
    example = [[text(d), latents(K)] for d in docs] + [[text(prompt)]]
    rows = one_per_row([example], K, cfg.grc.memory_mode)
    want = jax_logits(cfg, case.params.merged(cfg.model.scan_layers), rows)[0]
    start = sum(len(d) + K for d in docs)
    want = want[start : start + len(prompt)]
    got = grc.logits_with_memories([prompt], torch_mems[:n_mem])[0].numpy()
    assert np.abs(got - want).max() <= TOL

    # Greedy decoding over memories: the engine's tokens and step logits.
    jg = eng.generate_ids([prompt], [[m for m, _ in jax_mems[:n_mem]]], max_new_tokens=4,
                          return_logits=True)[0]  # fmt: skip
    tg = grc.generate([prompt], memories=torch_mems[:n_mem], max_new_tokens=4,
                      return_dict_in_generate=True, output_scores=True)  # fmt: skip
    new = tg.sequences[0, len(prompt) :].tolist()
    assert new[: len(jg.tokens)] == jg.tokens
    for a, b in zip(jg.step_logits, tg.scores):
        assert np.abs(a - b[0].numpy()).max() <= TOL

    # Memory files move both ways between the JAX engine and torch.
    jax_mems[0][0].save(tmp_path / "jax.safetensors")
    loaded = grc_module(grc).GRCMemory.load(tmp_path / "jax.safetensors")
    a = grc.logits_with_memories([prompt], [loaded])
    b = grc.logits_with_memories([prompt], [torch_mems[0]])
    assert (a - b).abs().max().item() <= TOL
    torch_mems[0].save(tmp_path / "torch.safetensors")
    eng.check_memory(LatentMemory.load(tmp_path / "torch.safetensors"))

    if cfg.grc.memory_mode == "recurrent":
        jm, jemb = eng.update(jax_mems[0][0], "dogs run fast")
        tm = grc.update(torch_mems[0], "dogs run fast", tokenizer=case.hf_tok)
        assert np.abs(tm.k.numpy() - jm.k).max() <= TOL
        assert np.abs(tm.v.numpy() - jm.v).max() <= TOL
        assert tm.source_tokens == jm.source_tokens and cosines(tm.embedding, jemb) >= COS
        with pytest.raises(ValueError, match="one running memory"):
            grc.generate([prompt], memories=torch_mems[:2], max_new_tokens=2)
    else:
        with pytest.raises(ValueError, match="recurrent"):
            grc.update(torch_mems[0], "dogs run fast", tokenizer=case.hf_tok)
    other = dataclasses.replace(torch_mems[0], model="0" * 16)
    with pytest.raises(ValueError, match="made by model"):
        grc.generate([prompt], memories=[other], max_new_tokens=2)


def test_grc_module_save_pretrained_round_trip(case, tmp_path):
    """Saving the torch module (e.g. after fine-tuning in torch) keeps the GRC files."""
    case.grc.save_pretrained(tmp_path / "resaved")
    again = transformers.AutoModel.from_pretrained(tmp_path / "resaved", trust_remote_code=True)
    ids = [[2, 5, 6, 7, 8]]
    assert torch.equal(again.embed(ids), case.grc.embed(ids))
    assert again.model_fingerprint == case.grc.model_fingerprint
    with pytest.raises(TypeError, match="num_beams"):
        again.generate(ids, memories=again.compress(ids), num_beams=2)


# ------------------------------------------------------------------------ a tiny trained run

TRAIN_SMALL = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
    "model.head_dim=16", "model.d_ff=128", f"grc.num_latents={K}", "data.seq_len=128",
    "data.batch_size=8", "train.eval_every=1000", "train.eval_queries=2", "train.warmup_steps=1",
    "train.steps=2", "train.checkpoint_every=1", "train.export_every=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run trained 2 steps by `grc train`'s loop (sentencepiece tokenizer), exporting at step 2,
    and `grc export` of its newest checkpoint."""
    root = tmp_path_factory.mktemp("export_run")
    data = root / "synth"
    synthesize(data, seed=0, queries_per_doc=1)
    overrides = [
        *TRAIN_SMALL,
        f"data.train_path={data}/train.jsonl",
        f"data.eval_path={data}/validation.jsonl",
        f"train.output_dir={root}/runs",
        "train.run_name=tiny",
    ]
    cfg = load_config(ROOT / "configs/tiny.yaml", overrides)
    train(cfg, quiet=True, hooks=export_hooks(cfg))
    path = root / "runs/tiny"
    out = root / "export"
    assert grc_main(["export", "--ckpt", str(path), "--out", str(out)]) == 0
    return SimpleNamespace(root=root, path=path, out=out, data=data)


def test_training_exports_through_the_same_path(run):
    periodic = run.path / "export/step_2"
    assert sorted(p.name for p in (run.path / "export").iterdir()) == ["step_2"]
    for name in ("model.safetensors", "grc/latents.safetensors", "tokenizer.json"):
        assert (periodic / name).read_bytes() == (run.out / name).read_bytes()
    assert json.loads((periodic / "grc_config.json").read_text())["source"]["step"] == 2
    assert json.loads((run.out / "grc_config.json").read_text())["source"]["step"] == 2
    with pytest.raises(ConfigError, match="export_every"):
        load_config(ROOT / "configs/tiny.yaml", ["train.export_every=-1"])


def test_trained_export_tokenizer_logits_and_embeddings(run):
    cfg, params, tok = load_model(run.path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(run.out)
    texts = []
    for line in (run.data / "validation.jsonl").read_text().splitlines()[:40]:
        r = json.loads(line)
        texts += [r["query"], r["positive"], r["reasoning"]]
    texts += ["two  spaces and\ttab ", " lead", "ünïcode ﬁ 42"]
    for t in texts:  # the sentencepiece model's ids, with grc's BOS first
        assert hf_tok(t).input_ids == [tok.bos_id, *tok.encode(t)]
    assert hf_tok.decode(tok.encode(texts[0])) == tok.decode(tok.encode(texts[0]))

    plain = transformers.AutoModelForCausalLM.from_pretrained(run.out)
    ids = np.asarray([hf_tok(texts[0]).input_ids], np.int32)
    with torch.no_grad():
        got = plain(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    want = jax_logits(cfg, params.model, plain_rows(ids))
    assert np.abs(got - want).max() <= TOL

    grc = transformers.AutoModel.from_pretrained(run.out, trust_remote_code=True)
    engine = Engine(cfg, params, tok, OPTS)
    got = grc.compress(texts[:4], tokenizer=hf_tok)
    want = engine.compress(texts[:4])
    assert (
        cosines(np.stack([m.embedding for m in got]), np.stack([e for _, e in want])).min() >= COS
    )
    for mem, (jm, _) in zip(got, want):
        assert np.abs(mem.k.numpy() - jm.k).max() <= TOL and mem.model == jm.model
    assert cosines(grc.embed(texts[:4], tokenizer=hf_tok), engine.embed(texts[:4])).min() >= COS


def test_bf16_export_of_one_checkpoint(run, tmp_path):
    bf16, fp32 = tmp_path / "bf16", tmp_path / "fp32"
    ckpt = run.path / "checkpoints/1"
    assert grc_main(["export", "--ckpt", str(ckpt), "--out", str(bf16), "--dtype", "bf16"]) == 0
    assert grc_main(["export", "--ckpt", str(run.path), "--step", "1", "--out", str(fp32)]) == 0
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    grc_cfg = json.loads((bf16 / "grc_config.json").read_text())
    assert grc_cfg["source"]["step"] == 1 and grc_cfg["dtype"] == "bfloat16"
    with safe_open(str(bf16 / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert (fp32 / "model.safetensors").read_bytes() != (run.out / "model.safetensors").read_bytes()

    a = transformers.AutoModelForCausalLM.from_pretrained(bf16)
    b = transformers.AutoModelForCausalLM.from_pretrained(fp32)
    assert (a.dtype, b.dtype) == (torch.bfloat16, torch.float32)
    x = torch.tensor([[2, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        want = b(x).logits
        assert (a(x).logits.float() - want).abs().max() <= 0.05 * want.abs().max()
    a = transformers.AutoModel.from_pretrained(bf16, trust_remote_code=True)
    b = transformers.AutoModel.from_pretrained(fp32, trust_remote_code=True)
    ids = [[2, *range(40, 40 + n)] for n in (3, 9)]
    assert cosines(a.embed(ids), b.embed(ids)).min() >= 0.99


def test_export_then_import_gives_identical_params(run, tmp_path):
    cfg, params, _ = load_model(run.path)
    back = tmp_path / "imported"
    assert grc_main(["import-hf", str(run.out), str(back)]) == 0
    cfg2, imported = load_imported(back)
    assert cfg2.model == dataclasses.replace(cfg.model, init_std=cfg2.model.init_std)
    original = dict(params.model)
    latents_ = original.pop("latents")
    imported = dict(imported)
    imported.pop("latents")  # a fresh table: the latents travel in grc/latents.safetensors
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), original,
                        imported)  # fmt: skip
    assert all(jax.tree.leaves(same))
    _, _, extras = load_export(run.out)
    np.testing.assert_array_equal(extras["latents"], latents_)
    # The tokenizer travels too: the import encodes like the run.
    tok, tok2 = load_tokenizer(run.path / "tokenizer.model"), load_tokenizer(back)
    assert tok2.encode(PROMPT) == tok.encode(PROMPT) and tok2.bos_id == tok.bos_id

    # Shards with an index above max_shard_bytes: transformers and `grc import-hf` read them.
    sharded = tmp_path / "sharded"
    export_checkpoint(run.path, sharded, max_shard_bytes=100_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (sharded / "model.safetensors").exists()
    a = transformers.AutoModelForCausalLM.from_pretrained(sharded)
    b = transformers.AutoModelForCausalLM.from_pretrained(run.out)
    x = torch.tensor([[2, 40, 41, 42]])
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
    _, tensors, _ = load_export(sharded)
    _, tensors_single, _ = load_export(run.out)
    assert all(np.array_equal(tensors[k], tensors_single[k]) for k in tensors_single)


# ------------------------------------------------------------------------ bad input


def test_bad_input_is_refused_before_writing(run, tok, tmp_path, capsys):
    cfg, params, _ = load_model(run.path)
    out = tmp_path / "out"
    gpt2 = dataclasses.replace(cfg.model)
    object.__setattr__(gpt2, "family", "gpt2")  # a family grc's config would not even accept
    for bad_cfg, match in [
        (dataclasses.replace(cfg.model, qkv_bias=True), "qkv_bias=True cannot be expressed"),
        (dataclasses.replace(cfg.model, family="qwen3"), "qk_norm=False cannot be expressed"),
        (gpt2, "has no Hugging Face export"),
    ]:
        with pytest.raises(ExportError, match=match):
            export_params(dataclasses.replace(cfg, model=bad_cfg), params, tok, out)
        assert not out.exists()
    with pytest.raises(ExportError, match="dtype 'fp16' is not supported"):
        export_params(cfg, params, tok, out, "fp16")
    broken = jax.tree.map(lambda x: x, jax.device_get(params))
    broken.model["final_norm"]["scale"] = np.full_like(broken.model["final_norm"]["scale"],
                                                          np.nan)  # fmt: skip
    with pytest.raises(ExportError, match="model.norm.weight.*NaN"):
        export_params(cfg, broken, tok, out)
    assert not out.exists() and not list(tmp_path.glob(".*export-tmp*"))
    with pytest.raises(SystemExit):  # argparse: --dtype is fp32 or bf16
        grc_main(["export", "--ckpt", str(run.path), "--out", str(out), "--dtype", "fp16"])

    # A non-empty output directory needs --force; --force replaces only an export's files.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00009.safetensors").write_text("stale shard")
    capsys.readouterr()
    assert grc_main(["export", "--ckpt", str(run.path), "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "model-00001-of-00009.safetensors",
        "notes.txt",
    ]
    assert grc_main(["export", "--ckpt", str(run.path), "--out", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "model-00001-of-00009.safetensors").exists()
    assert (out / "model.safetensors").read_bytes() == (run.out / "model.safetensors").read_bytes()
    assert grc_main(["export", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------ SmolLM2


def test_smollm2_export_loads_and_generates(tmp_path):
    from .test_smollm2 import _smollm2_gguf

    imported = tmp_path / "import"
    import_checkpoint(_smollm2_gguf(), imported, {"num_latents": K})
    out = tmp_path / "export"
    result = export_checkpoint(imported, out)
    assert result.family == "llama" and result.num_params > 130_000_000
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    assert "Paris" in hf_tok.decode(new)
