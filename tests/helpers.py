"""Small builders shared by several test modules."""

import json
from pathlib import Path

from grc_jax.data.tokenizer import load_tokenizer

# A one-layer model on 128-token rows: small enough for several processes on two cores.
TINY_MODEL = [
    "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
    "model.head_dim=16", "model.d_ff=64", "model.vocab_size=512", "grc.num_latents=4",
    "data.seq_len=128", "data.batch_size=8", "train.eval_queries=2",
]  # fmt: skip


def word_tokenizer(directory: Path, words: list[str]):
    """A tiny word-level tokenizer.json + tokenizer_config.json, loaded as grc's HFTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    tok.save(str(directory / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(directory)
