"""Tokenizers: the trained sentencepiece model (reserved ids, digit splitting, round trip,
determinism, too little data or vocabulary), `load_tokenizer` dispatch and errors, `HFTokenizer`
specials, the CLI."""

import json

import pytest
import sentencepiece as spm

from grc_jax.cli import main
from grc_jax.core.errors import DataError, UsageError
from grc_jax.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    HFTokenizer,
    SentencePieceTokenizer,
    VocabTooSmallError,
    load_tokenizer,
    train_sentencepiece,
)
from tests.data.conftest import record_texts


def _processor(tok: SentencePieceTokenizer) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tok.path))


def test_reserved_ids(sp_tok):
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert (sp_tok.pad_id, sp_tok.bos_id, sp_tok.eos_id) == (0, 2, 3)
    sp = _processor(sp_tok)
    assert sp.unk_id() == 1
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert sp_tok.vocab_size == sp.get_piece_size() == 1024
    # Specials never come out of encoding ordinary text.
    assert not {0, 1, 2, 3} & set(
        sp_tok.encode("velora is a city . its population is 42 thousand .")
    )


def test_digits_one_per_piece(sp_tok):
    sp = _processor(sp_tok)
    for i in range(sp.get_piece_size()):
        digits = sum(c.isdigit() for c in sp.id_to_piece(i))
        assert digits <= 1, sp.id_to_piece(i)
    ids = sp_tok.encode("17 + 25 = 42")
    pieces = [sp.id_to_piece(i).lstrip("\u2581") for i in ids]
    assert [p for p in pieces if p] == ["1", "7", "+", "2", "5", "=", "4", "2"]
    for d in "0123456789":  # every digit is its own piece (none falls back to <unk>)
        assert UNK_ID not in sp_tok.encode(d * 3)


def test_round_trip(sp_tok, train_records, synth_dir):
    texts = record_texts(train_records[:200])
    # Held-out entity names too: BPE with full character coverage still round-trips them.
    texts += [
        json.loads(line)["positive"] for line in (synth_dir / "test.jsonl").read_text().splitlines()
    ]
    for t in texts:
        ids = sp_tok.encode(t)
        assert ids and all(isinstance(i, int) for i in ids)
        assert sp_tok.decode(ids) == t
    assert (
        sp_tok.decode([BOS_ID, *sp_tok.encode("nia has 12 lamps ."), EOS_ID])
        == "nia has 12 lamps ."
    )


def test_training_is_deterministic(tmp_path, train_records):
    texts = record_texts(train_records[:300])
    a = train_sentencepiece(texts, tmp_path / "sp", vocab_size=300)
    first = a.path.read_bytes()
    again = train_sentencepiece(texts, tmp_path / "sp", vocab_size=300)
    assert again.path.read_bytes() == first
    # Elsewhere the file differs only by the recorded input/output paths: same pieces and scores.
    b = train_sentencepiece(texts, tmp_path / "b" / "sp", vocab_size=300)
    pa, pb = _processor(a), _processor(b)
    assert a.vocab_size == b.vocab_size == 300
    assert [(pa.id_to_piece(i), pa.get_score(i)) for i in range(300)] == [
        (pb.id_to_piece(i), pb.get_score(i)) for i in range(300)
    ]


def test_training_with_dotted_prefix(tmp_path, train_records):
    prefix = tmp_path / "tok.v1" / "sp.v2"
    tok = train_sentencepiece(record_texts(train_records[:100]), prefix, vocab_size=200)
    assert tok.path == tmp_path / "tok.v1" / "sp.v2.model"
    assert tok.path.is_file()
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["sp.v2.model", "sp.v2.vocab"]


def test_small_data_small_vocab_and_no_data(tmp_path):
    # Less data than the vocabulary wants: a smaller vocabulary (hard_vocab_limit is off).
    tok = train_sentencepiece(["the cat sat", "a dog ran"], tmp_path / "small", vocab_size=1024)
    assert 4 < tok.vocab_size < 64
    # Fewer pieces than the data's characters: named, with the size it needs (4 reserved +
    # 10 characters a b c d e f g h i j + the word boundary).
    with pytest.raises(VocabTooSmallError) as e:
        train_sentencepiece(["abcde fghij"], tmp_path / "v8", vocab_size=8)
    assert isinstance(e.value, UsageError)
    assert (e.value.requested, e.value.needed) == (8, 15)
    assert str(e.value) == (
        "vocab_size=8 is too small: the data's 11 distinct characters and the 4 reserved pieces "
        "need at least 15"
    )
    with pytest.raises(VocabTooSmallError, match=r"^vocab_size=4 is too small: 4 pieces are"):
        train_sentencepiece(["abc"], tmp_path / "v4", vocab_size=4)
    with pytest.raises(DataError, match="no text to train a tokenizer on"):
        train_sentencepiece(["", "  "], tmp_path / "none")
    assert not list(tmp_path.glob("*.corpus.txt"))  # removed after a failure too


def test_load_tokenizer_dispatch_and_errors(tmp_path, sp_tok):
    missing = tmp_path / "nowhere" / "sp.model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_tokenizer(missing)
    loaded = load_tokenizer(sp_tok.path)
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.encode("velora is a city .") == sp_tok.encode("velora is a city .")
    by_dir = load_tokenizer(sp_tok.path.parent)
    assert isinstance(by_dir, SentencePieceTokenizer) and by_dir.path == sp_tok.path
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_tokenizer(empty)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="garbage.model"):
        load_tokenizer(garbage)


def _hf_dir(path, config):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<|pad|>": 1, "hello": 2, "world": 3, "!": 4, "<|bos|>": 5, "<|eos|>": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<|pad|>", "<|bos|>", "<|eos|>"])
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_hf_tokenizer_specials(tmp_path):
    d = _hf_dir(
        tmp_path / "hf",
        {"bos_token": "<|bos|>", "eos_token": {"content": "<|eos|>"}, "pad_token": "<|pad|>"},
    )
    for tok in (load_tokenizer(d), load_tokenizer(d / "tokenizer.json"), HFTokenizer(d)):
        assert isinstance(tok, HFTokenizer)
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (5, 6, 1)
        assert tok.vocab_size == 7
        assert tok.encode("hello world !") == [2, 3, 4]
        assert tok.decode([5, 2, 3, 4, 6, 1]) == "hello world !"


def test_hf_tokenizer_defaults_and_errors(tmp_path):
    only_eos = HFTokenizer(_hf_dir(tmp_path / "eos", {"eos_token": "<|eos|>"}))
    assert (only_eos.bos_id, only_eos.eos_id, only_eos.pad_id) == (6, 6, 6)
    with pytest.raises(ValueError, match="eos_token"):
        HFTokenizer(_hf_dir(tmp_path / "noconfig", None))
    with pytest.raises(ValueError, match="tokenizer.json"):
        HFTokenizer(tmp_path / "eos" / "missing.json")


def test_cli_tokenizer_train(tmp_path, synth_dir, capsys):
    out = tmp_path / "cli" / "sp"
    assert main(["tokenizer", "train", str(synth_dir / "train.jsonl"), "--out", str(out),
                 "--vocab-size", "512"]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == {"model": f"{out}.model", "vocab_size": 512}
    tok = load_tokenizer(f"{out}.model")
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 3, 512)
    assert tok.decode(tok.encode("which city has a population of 17 + 25 thousand ?")) == (
        "which city has a population of 17 + 25 thousand ?"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "positive": "p"}\n{"query": ""}\n')
    assert main(["tokenizer", "train", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
    assert main(["tokenizer", "train", str(synth_dir / "train.jsonl"), "--out",
                 str(tmp_path / "y"), "--vocab-size", "10"]) == 2  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("grc tokenizer: error: vocab_size=10 is too small")
