"""Tokenizers: sentencepiece for from-scratch models, HF `tokenizer.json` for imported ones.

The layout needs three special tokens with stable ids: BOS (starts every consumer block, so its
first target token is predicted from inside the block), EOS (ends generation targets) and PAD.
A sentencepiece model trained here reserves them as pad=0, unk=1, bos=2, eos=3.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from grc_jax.core.errors import DataError, MissingPathError, ModelLoadError, UsageError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class TokenizerError(ModelLoadError):
    """A tokenizer file or directory is not a usable tokenizer (unreadable, or no BOS/EOS)."""


class VocabTooSmallError(UsageError):
    """A requested sentencepiece vocabulary cannot hold the reserved pieces and every character of
    the data: `vocab_size=<requested> is too small: <why>`; `needed` is the smallest size that can
    (None when unknown)."""

    def __init__(self, requested: int, needed: int | None, why: str):
        super().__init__(f"vocab_size={requested} is too small: {why}")
        self.requested, self.needed, self.why = requested, needed, why


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    """A sentencepiece model (`.model` file)."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = Path(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(
                f"tokenizer {str(self.path)!r} is not a sentencepiece model: {e}"
            ) from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(
                f"tokenizer {str(self.path)!r} defines no BOS/EOS ids; GRC layouts need both"
            )

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer:
    """A HF `tokenizer.json` (`tokenizers` package) plus `tokenizer_config.json` specials."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _HFTok

        path = Path(path)
        directory = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"tokenizer: no tokenizer.json at {str(file)!r}")
        self.path = file
        self._tok = _HFTok.from_file(str(file))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        specials = {}
        cfg_file = directory / "tokenizer_config.json"
        if cfg_file.is_file():
            specials = json.loads(cfg_file.read_text())

        def token_id(key: str) -> int | None:
            tok = specials.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            return None if tok is None else self._tok.token_to_id(tok)

        eos = token_id("eos_token")
        bos = token_id("bos_token")
        if eos is None:
            raise TokenizerError(
                f"tokenizer {str(directory)!r}: tokenizer_config.json names no eos_token"
            )
        self.eos_id = eos
        self.bos_id = bos if bos is not None else eos
        template = specials.get("chat_template")
        self.chat_template = template if isinstance(template, str) else None
        pad = token_id("pad_token")
        self.pad_id = pad if pad is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `.model` file -> sentencepiece; a `tokenizer.json` or a directory holding one -> HF."""
    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"tokenizer {str(path)!r} does not exist")
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path)
        models = sorted(path.glob("*.model"))
        if models:
            return SentencePieceTokenizer(models[0])
        raise TokenizerError(
            f"tokenizer directory {str(path)!r} holds no tokenizer.json or *.model"
        )
    if path.suffix == ".json":
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def train_sentencepiece(
    texts: Iterable[str], out_prefix: str | Path, vocab_size: int = 1024, seed_sentences: int = 0
) -> SentencePieceTokenizer:
    """Train a BPE sentencepiece model on `texts` -> `<out_prefix>.model` (deterministic).

    Digits are split one per piece so that arithmetic is learnable; pad/unk/bos/eos take ids 0-3.
    Data too small for `vocab_size` gives a smaller vocabulary. No text at all raises `DataError`;
    a `vocab_size` below the reserved pieces plus the data's characters `VocabTooSmallError`.
    """
    import sentencepiece as spm

    reserved = 4  # pad, unk, bos, eos
    if vocab_size <= reserved:
        raise VocabTooSmallError(
            vocab_size,
            None,
            f"{reserved} pieces are reserved (pad, unk, bos, eos) and every character of the "
            "data needs one more",
        )
    lines = [t.replace("\n", " ") for t in texts]
    if not any(t.strip() for t in lines):
        raise DataError("no text to train a tokenizer on (every text is empty)")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    corpus = Path(f"{out_prefix}.corpus.txt")  # not with_suffix: a prefix may contain dots
    corpus.write_text("\n".join(lines) + "\n")
    try:
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(out_prefix),
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            split_digits=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=1,
            minloglevel=2,
            hard_vocab_limit=False,
        )
    except RuntimeError as e:
        # "Vocabulary size is smaller than required_chars. 5 vs 22.": the data has more distinct
        # characters (plus the reserved pieces) than the vocabulary can hold.
        m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if m is None:
            raise
        needed = int(m.group(2))
        raise VocabTooSmallError(
            vocab_size,
            needed,
            f"the data's {needed - reserved} distinct characters and the {reserved} reserved "
            f"pieces need at least {needed}",
        ) from None
    finally:
        corpus.unlink()
    return SentencePieceTokenizer(f"{out_prefix}.model")
