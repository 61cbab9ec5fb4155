"""Tokenizers: the built-in byte tokenizer, and Hugging Face `tokenizers` ones for prepared data.

The byte tokenizer (every UTF-8 byte is a token) needs no vocabulary, so any text file trains with
nothing to build or ship and a node's private text is tokenised without anyone seeing it.
`encode`/`decode` are its fast path. `byte_tokenizer()` is the same mapping as a `tokenizers`
object, so an exported byte-level model ships a `tokenizer.json` that transformers loads.
Prepared datasets (train/dataset.py) use a byte-level BPE trained locally or a given file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, trainers
from tokenizers.pre_tokenizers import ByteLevel

VOCAB_SIZE = 256
MAX_VOCAB_SIZE = 262_144  # larger vocabularies are not a model this project trains
END_OF_TEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
_EOS_NAMES = (END_OF_TEXT, "</s>", "<eos>", "<|end_of_text|>")


def encode(text: str) -> torch.Tensor:
    """Byte token ids (uint8) of `text`."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def decode(ids: torch.Tensor | list[int]) -> str:
    """Text of byte token ids; invalid UTF-8 (a sample cut mid-character) is replaced."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return bytes(int(i) for i in values).decode("utf-8", errors="replace")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of `ByteLevel`."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def byte_tokenizer() -> Tokenizer:
    """The byte tokenizer as a `tokenizers` object: token id == byte value, no merges."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) with `vocab_size` tokens trained on `texts`, locally;
    the first token is the end-of-text marker that separates documents."""
    check_vocab_size(vocab_size, minimum=VOCAB_SIZE + 1)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: Path) -> Tokenizer:
    """A `tokenizer.json` file, refused (ValueError, one line) if unreadable or out of range."""
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception subclasses
        raise ValueError(f"{path}: not a tokenizers tokenizer.json ({exc})") from exc
    check_vocab_size(tok.get_vocab_size())
    return tok


def check_vocab_size(vocab_size: int, minimum: int = 1) -> int:
    if not minimum <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocabulary size {vocab_size} is outside {minimum}..{MAX_VOCAB_SIZE}")
    return vocab_size


def eos_id(tok: Tokenizer) -> int | None:
    """The id of the tokenizer's end-of-text token, if it has one."""
    for name in _EOS_NAMES:
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def save_for_transformers(tok: Tokenizer, out: Path) -> None:
    """Write `tokenizer.json` + `tokenizer_config.json` so `AutoTokenizer.from_pretrained(out)`
    loads it (as a PreTrainedTokenizerFast)."""
    from transformers import PreTrainedTokenizerFast

    eos = eos_id(tok)
    special = {} if eos is None else {"eos_token": tok.id_to_token(eos)}
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(out)
