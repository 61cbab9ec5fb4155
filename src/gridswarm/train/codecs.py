"""Codecs: how a flat fp32 vector (a pseudo-gradient, or a model update sent down) travels.

Each codec turns a vector into a few named tensors (packed as safetensors) and back. Blockwise
quantisation keeps one fp32 absmax scale per `block_size` values, so one outlier only costs the
precision of its own block. `ErrorFeedback` keeps what quantisation lost and adds it to the next
vector, so the error does not accumulate over rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from gridswarm.plugins import Registry
from gridswarm.train.params import BlobFormatError


class Codec(Protocol):
    name: str

    def encode(self, vec: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def decode(self, tensors: dict[str, torch.Tensor], numel: int) -> torch.Tensor: ...


class NonFinitePayload(BlobFormatError):
    """A well-formed payload whose values would decode to inf or NaN."""


def check_payload(codec: Codec, tensors: dict[str, torch.Tensor], numel: int) -> None:
    """Raise `BlobFormatError` unless `tensors` decode to `numel` values, `NonFinitePayload`
    unless those are finite. A codec with a `check` method (the blockwise ones: their scales
    bound every value) answers without decoding, so the hub checks an upload without making a
    model-sized copy of it; any other codec (plugins included) is decoded once."""
    check = getattr(codec, "check", None)
    if check is not None:
        check(tensors, numel)
    elif not torch.isfinite(codec.decode(tensors, numel)).all():
        raise NonFinitePayload(f"{codec.name} payload has non-finite values")


def _require(tensors: dict[str, torch.Tensor], names_dtypes: dict[str, torch.dtype]) -> None:
    for name, dtype in names_dtypes.items():
        if name not in tensors:
            raise BlobFormatError(f"encoded vector lacks tensor {name!r}")
        if tensors[name].dtype != dtype:
            raise BlobFormatError(f"tensor {name!r} is {tensors[name].dtype}, expected {dtype}")


class FP32:
    name = "fp32"
    chunk_values = 1  # each value on its own

    def encode(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"values": vec.float().contiguous()}

    def decode(self, tensors: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        _require(tensors, {"values": torch.float32})
        values = tensors["values"]
        if values.numel() != numel:
            raise BlobFormatError(f"expected {numel} values, got {values.numel()}")
        return values

    def decode_span(
        self, tensors: dict[str, torch.Tensor], numel: int, start: int, end: int
    ) -> torch.Tensor:
        """`decode(tensors, numel)[start:end]`, reading only those values."""
        return self.decode(tensors, numel)[start:end]


class FP16:
    name = "fp16"
    chunk_values = 1

    def encode(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        limit = torch.finfo(torch.float16).max
        return {"values": vec.float().clamp(-limit, limit).half()}

    def decode(self, tensors: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        _require(tensors, {"values": torch.float16})
        values = tensors["values"]
        if values.numel() != numel:
            raise BlobFormatError(f"expected {numel} values, got {values.numel()}")
        return values.float()

    def decode_span(
        self, tensors: dict[str, torch.Tensor], numel: int, start: int, end: int
    ) -> torch.Tensor:
        """`decode(tensors, numel)[start:end]`, converting only those values."""
        _require(tensors, {"values": torch.float16})
        values = tensors["values"]
        if values.numel() != numel:
            raise BlobFormatError(f"expected {numel} values, got {values.numel()}")
        return values[start:end].float()


@dataclass(frozen=True)
class Blockwise:
    """Symmetric absmax quantisation to `bits` (8 or 4) per block of `block_size` values."""

    bits: int
    block_size: int = 256

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def chunk_values(self) -> int:
        """Whole blocks, and an even count of values (int4 packs two per byte)."""
        return 2 * self.block_size

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def _blocks(self, vec: torch.Tensor) -> torch.Tensor:
        """`vec` as rows of `block_size` (zero-padded); a view, not a copy, when it fits."""
        pad = (-vec.numel()) % self.block_size
        vec = vec.float()
        return (torch.nn.functional.pad(vec, (0, pad)) if pad else vec).view(-1, self.block_size)

    def encode(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        blocks = self._blocks(vec)
        # |x| max per block in one pass, without an |x| copy of the vector (the hub encodes
        # whole models); min and max carry NaN and inf, so the vector is finite iff every
        # block's absmax is: no separate pass over it to check
        low, high = torch.aminmax(blocks, dim=1, keepdim=True)
        absmax = torch.maximum(high, -low)
        if not torch.isfinite(absmax).all():
            raise ValueError("cannot quantise a vector with non-finite values")
        scale = absmax / self.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = (blocks / scale).round_().clamp_(-self.qmax, self.qmax).to(torch.int8).view(-1)
        if self.bits == 4:  # two signed nibbles per byte, offset to 0..14
            u = (q + 8).to(torch.uint8)
            q = (u[0::2] | (u[1::2] << 4)).to(torch.uint8)
        return {"q": q, "scale": scale.view(-1)}

    def _parts(
        self, tensors: dict[str, torch.Tensor], numel: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The payload's (q, scale, n_blocks), checked: dtypes, sizes, finite scales."""
        qdtype = torch.uint8 if self.bits == 4 else torch.int8
        _require(tensors, {"q": qdtype, "scale": torch.float32})
        n_blocks = -(-numel // self.block_size)
        q, scale = tensors["q"], tensors["scale"]
        expected_q = n_blocks * self.block_size // (2 if self.bits == 4 else 1)
        if scale.numel() != n_blocks or q.numel() != expected_q:
            raise BlobFormatError(
                f"{self.name} payload does not match {numel} values in blocks of {self.block_size}"
            )
        if not torch.isfinite(scale).all():
            raise BlobFormatError(f"{self.name} payload has non-finite scales")
        return q, scale, n_blocks

    def check(self, tensors: dict[str, torch.Tensor], numel: int) -> None:
        """What `decode` checks, and that every decoded value is finite: |q| <= qmax + 1 (a
        hostile int8 may hold -128), so all are iff (qmax + 1) × scale is, per block."""
        _, scale, _ = self._parts(tensors, numel)
        if not torch.isfinite(scale * (self.qmax + 1)).all():
            raise NonFinitePayload(f"{self.name} payload has scales that overflow to inf")

    def decode(self, tensors: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        q, scale, n_blocks = self._parts(tensors, numel)
        return self._values(q, scale, n_blocks)[:numel]

    def decode_span(
        self, tensors: dict[str, torch.Tensor], numel: int, start: int, end: int
    ) -> torch.Tensor:
        """`decode(tensors, numel)[start:end]` for `start` a multiple of `chunk_values`,
        decoding (and checking the scales of) only the blocks that hold those values."""
        if start % self.chunk_values or not 0 <= start < end <= numel:
            raise ValueError(f"span [{start}, {end}) is not aligned to {self.chunk_values}")
        qdtype = torch.uint8 if self.bits == 4 else torch.int8
        _require(tensors, {"q": qdtype, "scale": torch.float32})
        n_blocks, per_byte = -(-numel // self.block_size), 2 if self.bits == 4 else 1
        q, scale = tensors["q"], tensors["scale"]
        if scale.numel() != n_blocks or q.numel() != n_blocks * self.block_size // per_byte:
            raise BlobFormatError(
                f"{self.name} payload does not match {numel} values in blocks of {self.block_size}"
            )
        first, last = start // self.block_size, -(-end // self.block_size)
        scale = scale[first:last]
        if not torch.isfinite(scale).all():
            raise BlobFormatError(f"{self.name} payload has non-finite scales")
        q = q[first * self.block_size // per_byte : last * self.block_size // per_byte]
        return self._values(q, scale, last - first)[: end - start]

    def _values(self, q: torch.Tensor, scale: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """The blocks' values, padding included: q × its block's scale."""
        if self.bits == 4:
            low = (q & 0x0F).to(torch.int8) - 8
            high = (q >> 4).to(torch.int8) - 8
            q = torch.stack([low, high], dim=1).view(-1)
        return q.view(n_blocks, self.block_size).float().mul_(scale.view(-1, 1)).view(-1)


def chunk_alignment(codec: Codec) -> int | None:
    """A multiple of how many values `codec` may encode at a time: pieces of a vector split
    at multiples of it, encoded one by one and joined (`concat_encodings`), give the bytes of
    one encoding of the whole. None: the codec does not say (a plugin's top-k, say), so it
    encodes whole vectors only. A codec says so with a `chunk_values` attribute."""
    align = getattr(codec, "chunk_values", None)
    return align if isinstance(align, int) and align > 0 else None


def span_decoding(codec: Codec) -> int | None:
    """The alignment at which `codec` decodes a span of a vector on its own (`decode_span`,
    bit for bit the same values as decoding the whole and slicing), or None: whole vectors
    only (a plugin that does not say)."""
    if not callable(getattr(codec, "decode_span", None)):
        return None
    return chunk_alignment(codec)


def concat_encodings(pieces: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The encoding of a vector from its pieces' encodings, in order (see `chunk_alignment`)."""
    return {name: torch.cat([piece[name] for piece in pieces]) for name in pieces[0]}


# name -> factory(block_size); plugins add theirs through the `gridswarm.codecs` entry points
CODECS: Registry[Callable[[int], Codec]] = Registry("gridswarm.codecs", "codec")
CODECS.register("fp32", lambda _block_size: FP32(), builtin=True)
CODECS.register("fp16", lambda _block_size: FP16(), builtin=True)
CODECS.register("int8", lambda block_size: Blockwise(8, block_size), builtin=True)
CODECS.register("int4", lambda block_size: Blockwise(4, block_size), builtin=True)


def make_codec(name: str, block_size: int = 256) -> Codec:
    """The codec registered as `name` (built in or a plugin); its `name` must be the same, since
    contributions are checked against the run's codec by name."""
    codec = CODECS.get(name)(block_size)
    if codec.name != name:
        raise ValueError(f"codec plugin {name!r} built a codec that calls itself {codec.name!r}")
    return codec


@dataclass
class ErrorFeedback:
    """Carries the quantisation error of one vector over to the next (kept by the sender)."""

    codec: Codec
    residual: torch.Tensor | None = field(default=None)

    def encode(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        target = vec if self.residual is None else vec + self.residual
        tensors = self.codec.encode(target)
        self.residual = target - self.codec.decode(tensors, target.numel())
        return tensors
