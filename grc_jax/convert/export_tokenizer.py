"""Tokenizer files of an export: the run's tokenizer as files transformers reads.

A HF tokenizer directory is copied as it is; a sentencepiece model is shipped as
`tokenizer.model` plus a `tokenizer.json` converted here that encodes exactly as sentencepiece does
and puts BOS first, so `tokenizer(text)` gives grc's own prompt ids.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from grc_jax.convert.hf_import import TOKENIZER_FILES
from grc_jax.core.errors import ExportError
from grc_jax.data.tokenizer import HFTokenizer, SentencePieceTokenizer


def _sentencepiece_tokenizer_json(model: bytes, bos_piece: str, bos_id: int) -> str | None:
    """A `tokenizer.json` (tokenizers library) that encodes like this sentencepiece model.

    It follows the model's own normalizer spec (its precompiled character map, extra-whitespace
    removal, the dummy `▁` prefix, whitespace escaping), builds the BPE merges from the pieces
    ranked by score (or a Unigram model), keeps control pieces as special tokens, and prepends
    BOS when encoding with special tokens, as grc does for every input. Returns None when the
    `tokenizers` or protobuf packages are missing.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2
        from tokenizers import (
            AddedToken,
            Regex,
            Tokenizer,
            decoders,
            models,
            normalizers,
            processors,
        )
    except ImportError:
        return None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    trainer, spec = proto.trainer_spec, proto.normalizer_spec
    NORMAL, CONTROL, USER = 1, 3, 4  # sentencepiece piece types
    pieces = list(proto.pieces)
    if trainer.model_type == 2:  # BPE
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == NORMAL}
        pairs = []
        for piece, (score, i) in normal.items():
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in normal and right in normal:
                    pairs.append((-score, i, left, right))  # higher score merges first
        merges = [(left, right) for _, _, left, right in sorted(pairs)]
        tok = Tokenizer(models.BPE(vocab, merges, unk_token=trainer.unk_piece, fuse_unk=True,
                                   byte_fallback=trainer.byte_fallback))  # fmt: skip
    elif trainer.model_type == 1:  # Unigram
        tok = Tokenizer(models.Unigram([(p.piece, p.score) for p in pieces], trainer.unk_id,
                                       byte_fallback=trainer.byte_fallback))  # fmt: skip
    else:
        return None
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # spaces only, as sentencepiece does
        steps += [
            normalizers.Replace(Regex(r"^ +| +$"), ""),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.add_special_tokens(
        [AddedToken(p.piece, special=True, normalized=False) for p in pieces if p.type == CONTROL]
    )
    tok.add_tokens(
        [AddedToken(p.piece, special=False, normalized=True) for p in pieces if p.type == USER]
    )
    steps = [decoders.Replace("▁", " ")]
    if trainer.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos_piece} $A", pair=f"{bos_piece} $A {bos_piece} $B",
        special_tokens=[(bos_piece, bos_id)],
    )  # fmt: skip
    return tok.to_str()


def tokenizer_files(tok: Any, max_length: int) -> dict[str, bytes]:
    """The HF tokenizer files of a grc tokenizer (file name -> content)."""
    if isinstance(tok, HFTokenizer):
        directory = Path(tok.path).parent
        files = {f: (directory / f).read_bytes() for f in TOKENIZER_FILES
                 if (directory / f).is_file()}  # fmt: skip
        files["tokenizer.json"] = Path(tok.path).read_bytes()
        return files
    if isinstance(tok, SentencePieceTokenizer):
        import sentencepiece as spm

        model = Path(tok.path).read_bytes()
        sp = spm.SentencePieceProcessor(model_proto=model)
        piece = sp.id_to_piece
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": piece(tok.bos_id),
            "eos_token": piece(tok.eos_id),
            "pad_token": piece(tok.pad_id),
            "model_max_length": max_length,
            "clean_up_tokenization_spaces": False,
        }
        if sp.unk_id() >= 0:
            config["unk_token"] = piece(sp.unk_id())
        files = {"tokenizer.model": model}
        converted = _sentencepiece_tokenizer_json(model, piece(tok.bos_id), tok.bos_id)
        if converted is None:
            warnings.warn(
                "the `tokenizers` or protobuf package is missing: the export has tokenizer.model "
                "but no tokenizer.json (transformers' LlamaTokenizer may split some texts "
                "differently from grc)",
                stacklevel=3,
            )
            config.update(tokenizer_class="LlamaTokenizer", add_bos_token=True, legacy=True)
        else:
            files["tokenizer.json"] = converted.encode()
        files["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
        specials = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                    if k in config}  # fmt: skip
        files["special_tokens_map.json"] = (json.dumps(specials, indent=2) + "\n").encode()
        return files
    raise ExportError(
        f"cannot export a tokenizer of type {type(tok).__name__}: expected a sentencepiece "
        "model or a HF tokenizer.json (grc_jax.data.tokenizer)"
    )


# ----------------------------------------------------------------------------------- writing
