"""Prepared datasets: token shards on disk, named by the sha256 of their manifest.

`gridswarm data prepare SRC… --tokenizer … --out DIR` reads `.txt`, `.jsonl`/`.jsonl.gz` and
`.parquet` files with Hugging Face `datasets` (local files only, offline), tokenises them (bytes, a
byte-level BPE trained here with `tokenizers`, or a given `tokenizer.json`) and writes:

    DIR/manifest.json      tokenizer (file, sha256, vocab size), dtype, token counts, every
                           shard's file / tokens / sha256, train and held-out (val) shard lists
    DIR/tokenizer.json     the tokenizer, loadable by `tokenizers` and transformers
    DIR/train-00000.bin …  raw little-endian uint16 (vocab <= 65535) or uint32 token ids,
    DIR/val-00000.bin …    `shard_tokens` per shard (the last of each split may be shorter)

Documents are separated by the tokenizer's end-of-text token (byte tokenizer: a blank line between
jsonl/parquet rows; a .txt file is one document). The held-out split is the corpus's tail.

A run names a prepared dataset by the path of DIR or as `manifest:<sha256>` (docs/architecture.md,
"Datasets"): the hub imports DIR into its blob store when the run is created (verifying every hash
first, so a bad dataset stores nothing) and serves manifest, tokenizer and shards as blobs; a node
fetches only the shards its slices draw, keeps them in its blob cache (by sha256, verified) and
memory-maps them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tokenizers import Tokenizer

from gridswarm.blobs import BlobError, FileBlobStore, check_digest, sha256_hex
from gridswarm.train.data import BUNDLED
from gridswarm.train.tokenizer import (
    MAX_VOCAB_SIZE,
    TOKENIZER_FILE,
    byte_tokenizer,
    check_vocab_size,
    eos_id,
    load_tokenizer,
    train_bpe,
)

FORMAT = "gridswarm-dataset/1"
MANIFEST = "manifest.json"
MANIFEST_PREFIX = "manifest:"
SUFFIXES = {".txt": "text", ".jsonl": "json", ".jsonl.gz": "json", ".parquet": "parquet"}
MAX_SHARD_TOKENS = 1 << 26  # 256 MiB of uint32: one blob stays under the hub's blob limits
MAX_SHARDS = 100_000
MAX_MANIFEST_BYTES = 16 << 20
MAX_TOKENIZER_BYTES = 64 << 20
ROWS_PER_BATCH = 1000
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class DatasetError(ValueError):
    """A source, tokenizer spec or prepared dataset is refused; the message is one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardInfo(_Strict):
    file: Annotated[str, Field(pattern=r"^(train|val)-[0-9]{5}\.bin$")]
    tokens: Annotated[int, Field(gt=0, le=MAX_SHARD_TOKENS)]
    sha256: Digest


class TokenizerInfo(_Strict):
    kind: Literal["bytes", "bpe", "file"]
    file: Literal["tokenizer.json"] = "tokenizer.json"
    sha256: Digest
    vocab_size: Annotated[int, Field(gt=0, le=MAX_VOCAB_SIZE)]
    eos_id: Annotated[int, Field(ge=0, lt=MAX_VOCAB_SIZE)] | None


class Manifest(_Strict):
    """What `manifest.json` holds; every field is bounded, so a hostile one is refused whole."""

    format: Literal["gridswarm-dataset/1"] = FORMAT
    tokenizer: TokenizerInfo
    dtype: Literal["uint16", "uint32"]
    shard_tokens: Annotated[int, Field(gt=0, le=MAX_SHARD_TOKENS)]
    tokens_train: Annotated[int, Field(gt=0)]
    tokens_val: Annotated[int, Field(gt=0)]
    sources: list[str] = Field(max_length=MAX_SHARDS)
    train: list[ShardInfo] = Field(min_length=1, max_length=MAX_SHARDS)
    val: list[ShardInfo] = Field(min_length=1, max_length=MAX_SHARDS)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    def shards(self) -> list[ShardInfo]:
        return [*self.train, *self.val]

    def digests(self) -> set[str]:
        """Every blob a run on this dataset may serve: tokenizer and shards."""
        return {self.tokenizer.sha256, *(s.sha256 for s in self.shards())}

    def to_bytes(self) -> bytes:
        return (self.model_dump_json(indent=1) + "\n").encode()


def parse_manifest(data: bytes) -> Manifest:
    if len(data) > MAX_MANIFEST_BYTES:
        raise DatasetError(f"manifest of {len(data)} bytes exceeds {MAX_MANIFEST_BYTES}")
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise DatasetError(f"invalid manifest: {where}: {first['msg']}") from exc
    return check_manifest(manifest)


def check_manifest(manifest: Manifest) -> Manifest:
    """`manifest` if its fields agree with each other (token sums, a dtype wide enough for the
    vocabulary), else DatasetError: what `parse_manifest` checks beyond the field bounds, for a
    manifest that arrived inside another message (a pushed dataset's offer)."""
    for split, shards in (("train", manifest.train), ("val", manifest.val)):
        if sum(s.tokens for s in shards) != getattr(manifest, f"tokens_{split}"):
            raise DatasetError(f"invalid manifest: tokens_{split} is not the sum of its shards")
    if manifest.tokenizer.vocab_size > np.iinfo(manifest.dtype).max + 1:
        raise DatasetError(f"invalid manifest: {manifest.dtype} cannot hold the vocabulary")
    return manifest


class DatasetOffer(_Strict):
    """A sponsor offers a prepared dataset to a hub (`gridswarm data push`, POST /v1/datasets):
    its manifest, and the size of its tokenizer file (the one blob whose size the manifest does
    not say), so the hub knows every byte it is asked to store before it stores any."""

    manifest: Manifest
    tokenizer_bytes: Annotated[int, Field(gt=0, le=MAX_TOKENIZER_BYTES)]


def check_shard(data: bytes, manifest: Manifest, info: ShardInfo) -> int:
    """The largest token id of `data`, or DatasetError unless it is the token shard `info` of
    `manifest` claims: its size (the token count at the manifest's dtype width) and every id
    below the vocabulary size. The sha256 is the caller's to check (it has it already)."""
    if len(data) != info.tokens * manifest.itemsize:
        raise DatasetError(
            f"shard {info.file}: {len(data)} bytes, not {info.tokens} {manifest.dtype} tokens"
        )
    largest = int(np.frombuffer(data, dtype=manifest.dtype).max())  # tokens > 0: not empty
    if largest >= manifest.vocab_size:
        raise DatasetError(
            f"shard {info.file}: token id {largest} is outside the vocabulary of "
            f"{manifest.vocab_size}"
        )
    return largest


def check_tokenizer(data: bytes, manifest: Manifest) -> None:
    """DatasetError unless `data` is a tokenizer.json that loads and has the manifest's
    vocabulary size (and its end-of-text id, when the manifest names one)."""
    if len(data) > MAX_TOKENIZER_BYTES:
        raise DatasetError(f"tokenizer of {len(data)} bytes exceeds {MAX_TOKENIZER_BYTES}")
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # UnicodeDecodeError, or the tokenizers library's own errors
        why = f"tokenizer: not a loadable tokenizer.json ({exc})".splitlines()[0]
        raise DatasetError(why) from exc
    if tok.get_vocab_size() != manifest.vocab_size:
        raise DatasetError(
            f"tokenizer: vocabulary of {tok.get_vocab_size()}, the manifest says "
            f"{manifest.vocab_size}"
        )
    if manifest.tokenizer.eos_id is not None and eos_id(tok) != manifest.tokenizer.eos_id:
        raise DatasetError(f"tokenizer: end-of-text id is not {manifest.tokenizer.eos_id}")


def is_prepared(dataset: str) -> bool:
    """True for `manifest:<sha256>` or a folder holding a manifest.json."""
    if dataset.startswith(MANIFEST_PREFIX):
        return True
    try:
        return (Path(dataset).expanduser() / MANIFEST).is_file()
    except (OSError, RuntimeError):  # a name too long, `~nosuchuser`: not a prepared folder
        return False


def check_dataset_path(dataset: str, roots: tuple[Path, ...], where: str) -> None:
    """Refuse (`DatasetError`) a `data.dataset` that makes this machine read a file it was not
    told to share. A run's config is its sponsor's, who on an open hub is anyone, and the hub
    and every node read `data.dataset`: a bundled name or `manifest:<sha256>` names no file, and
    a path is read only when it lies under one of `roots`, the folders this machine's operator
    opened (`--data-root`). `where` names the machine and its option in the message."""
    if dataset in BUNDLED or dataset.startswith(MANIFEST_PREFIX):
        return
    try:
        path = Path(dataset).expanduser().resolve()  # symlinks followed: no way out of a root
        if any(path.is_relative_to(root.expanduser().resolve()) for root in roots):
            return
    except (OSError, RuntimeError, ValueError) as exc:  # `~nosuchuser`, a name too long, NUL
        raise DatasetError(f"data.dataset: not a usable path: {exc}") from exc
    opened = ", ".join(str(r) for r in roots) if roots else "none"
    raise DatasetError(
        f"data.dataset: {dataset!r} is a path, and {where} reads paths only under its "
        f"--data-root folders ({opened}); name a bundled dataset or manifest:<sha256>"
    )


def manifest_ref(dataset: str) -> str | None:
    """The sha256 of `manifest:<sha256>`, or None for anything else."""
    if not dataset.startswith(MANIFEST_PREFIX):
        return None
    try:
        return check_digest(dataset.removeprefix(MANIFEST_PREFIX))
    except BlobError as exc:
        raise DatasetError(f"data.dataset: {exc}") from exc


# ---------------------------------------------------------------------------- preparing


def resolve_sources(paths: list[Path]) -> list[tuple[Path, str]]:
    """(file, datasets builder) for every source, folders expanded (sorted); refuses what it
    cannot read before anything is written."""
    if not paths:
        raise DatasetError("no source files given")
    out = []
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _builder(p))
            if not files:
                raise DatasetError(f"{path}: no {', '.join(SUFFIXES)} files in this folder")
            out += [(p, _builder(p)) for p in files]
        elif path.is_file():
            builder = _builder(path)
            if builder is None:
                raise DatasetError(f"{path}: unknown extension (use {', '.join(SUFFIXES)})")
            out.append((path, builder))
        else:
            raise DatasetError(f"{path}: no such file or folder")
    return out


def _builder(path: Path) -> str | None:
    name = path.name.lower()
    return next((b for suffix, b in SUFFIXES.items() if name.endswith(suffix)), None)


def _text_batches(path: Path, builder: str, text_field: str) -> Iterator[list[str]]:
    """Documents of one source in batches, read by `datasets` in streaming mode (no cache, no
    network). A .txt file is one document, yielded as batches of its lines."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    from datasets import load_dataset

    options = {"keep_linebreaks": True} if builder == "text" else {}
    try:
        rows = load_dataset(builder, data_files=str(path), split="train", streaming=True, **options)
        batch: list[str] = []
        for i, row in enumerate(rows):
            field_name = "text" if builder == "text" else text_field
            value = row.get(field_name)
            if not isinstance(value, str):
                raise DatasetError(f"{path}: row {i} has no string field {field_name!r}")
            batch.append(value)
            if len(batch) == ROWS_PER_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch
    except DatasetError:
        raise
    except Exception as exc:  # pyarrow / json errors of a malformed file
        raise DatasetError(f"{path}: cannot read as {builder}: {exc}".splitlines()[0]) from exc


def _make_tokenizer(spec: str, sources: list[tuple[Path, str]], text_field: str) -> Tokenizer:
    if spec == "bytes":
        return byte_tokenizer()
    if spec.startswith("bpe:"):
        try:
            vocab_size = int(spec.removeprefix("bpe:"))
            check_vocab_size(vocab_size, minimum=257)
        except ValueError as exc:
            raise DatasetError(f"--tokenizer {spec}: {exc}") from exc
        return train_bpe(
            # a .txt batch is lines with their line breaks; jsonl/parquet rows are documents
            (
                "".join(b) if kind == "text" else "\n".join(b)
                for p, kind in sources
                for b in _text_batches(p, kind, text_field)
            ),
            vocab_size,
        )
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DatasetError(f"--tokenizer {spec}: use bytes, bpe:VOCAB or a tokenizer.json path")
    try:
        return load_tokenizer(path)
    except ValueError as exc:
        raise DatasetError(str(exc)) from exc


@dataclass
class _TokenWriter:
    """Appends token ids to one flat temporary file; counts them. An id outside the vocabulary
    (a tokenizer whose ids exceed its own size) is refused rather than wrapped by the dtype."""

    path: Path
    dtype: np.dtype
    vocab_size: int
    tokens: int = 0
    _file: object = field(init=False)

    def __post_init__(self) -> None:
        self._file = self.path.open("wb")

    def write(self, ids: np.ndarray) -> None:
        if len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < self.vocab_size:
            raise DatasetError(f"the tokenizer produced an id outside its {self.vocab_size} ids")
        self._file.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self.tokens += len(ids)

    def close(self) -> None:
        self._file.close()


def _tokenise(
    tok: Tokenizer,
    byte_level: bool,
    sources: list[tuple[Path, str]],
    text_field: str,
    writer: _TokenWriter,
    advance: Callable[[int], None],
) -> None:
    eos = eos_id(tok)
    doc_end = np.array([eos] if eos is not None else [], dtype=np.int64)
    if byte_level:
        doc_end = np.frombuffer(b"\n\n", dtype=np.uint8).astype(np.int64)
    for path, builder in sources:
        for batch in _text_batches(path, builder, text_field):
            # a .txt file is one document: encode a batch of its lines as one string
            docs = ["".join(batch)] if builder == "text" else batch
            if byte_level:
                encoded = [np.frombuffer(d.encode("utf-8"), dtype=np.uint8) for d in docs]
            else:
                encoded = [np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(docs)]
            for ids in encoded:
                writer.write(ids)
                if builder != "text":
                    writer.write(doc_end)
            advance(sum(len(d) for d in docs))
        if builder == "text" and not byte_level:
            writer.write(doc_end)


def _write_shards(flat: np.ndarray, split: str, shard_tokens: int, folder: Path) -> list[ShardInfo]:
    shards = []
    for i, start in enumerate(range(0, len(flat), shard_tokens)):
        data = flat[start : start + shard_tokens].tobytes()
        name = f"{split}-{i:05d}.bin"
        (folder / name).write_bytes(data)
        count = min(shard_tokens, len(flat) - start)
        shards.append(ShardInfo(file=name, tokens=count, sha256=sha256_hex(data)))
    return shards


def prepare(
    paths: list[Path],
    tokenizer: str,
    out: Path,
    *,
    text_field: str = "text",
    val_fraction: float = 0.1,
    shard_tokens: int = 1 << 20,
    show_progress: bool = True,
) -> tuple[Manifest, str]:
    """Tokenise `paths` into a prepared dataset at `out`; returns (manifest, its sha256).

    Everything is written to a temporary folder beside `out` and renamed into place at the end, so
    a refusal or a crash leaves nothing behind."""
    if not 0 < val_fraction < 0.5:
        raise DatasetError(f"--val-fraction {val_fraction} must be in (0, 0.5)")
    if not 0 < shard_tokens <= MAX_SHARD_TOKENS:
        raise DatasetError(f"--shard-tokens {shard_tokens} must be in 1..{MAX_SHARD_TOKENS}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out} exists and is not an empty folder")
    sources = resolve_sources(paths)
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeElapsedColumn

    total_bytes = sum(p.stat().st_size for p, _ in sources)
    columns = ("{task.description}", BarColumn(), DownloadColumn(), TimeElapsedColumn())
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        with Progress(*columns, disable=not show_progress, transient=True) as progress:
            if tokenizer.startswith("bpe:"):
                progress.add_task(f"training BPE ({tokenizer})", total=None)
            tok = _make_tokenizer(tokenizer, sources, text_field)
            vocab_size = tok.get_vocab_size()
            dtype = np.dtype(np.uint16 if vocab_size <= 65_535 else np.uint32)
            task = progress.add_task("tokenising", total=total_bytes)
            writer = _TokenWriter(work / "all.tmp", dtype, vocab_size)
            try:
                _tokenise(
                    tok,
                    tokenizer == "bytes",
                    sources,
                    text_field,
                    writer,
                    lambda n: progress.advance(task, n),
                )
            finally:
                writer.close()
        if writer.tokens < 2:
            raise DatasetError(f"empty corpus: {writer.tokens} tokens in {len(sources)} source(s)")
        flat = np.memmap(writer.path, dtype=dtype, mode="r")
        n_val = max(int(writer.tokens * val_fraction), 1)
        train = _write_shards(flat[: writer.tokens - n_val], "train", shard_tokens, work)
        val = _write_shards(flat[writer.tokens - n_val :], "val", shard_tokens, work)
        del flat
        writer.path.unlink()
        tok.save(str(work / TOKENIZER_FILE))
        tok_bytes = (work / TOKENIZER_FILE).read_bytes()
        kind = tokenizer if tokenizer == "bytes" else tokenizer.partition(":")[0]
        kind = kind if kind in ("bytes", "bpe") else "file"
        manifest = Manifest(
            tokenizer=TokenizerInfo(
                kind=kind, sha256=sha256_hex(tok_bytes), vocab_size=vocab_size, eos_id=eos_id(tok)
            ),
            dtype=dtype.name,
            shard_tokens=shard_tokens,
            tokens_train=writer.tokens - n_val,
            tokens_val=n_val,
            sources=[p.name for p, _ in sources],
            train=train,
            val=val,
        )
        data = manifest.to_bytes()
        (work / MANIFEST).write_bytes(data)
        if out.exists():
            out.rmdir()
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest, sha256_hex(data)


# ---------------------------------------------------------------------------- reading


class DirSource:
    """Blobs of a prepared dataset folder, by sha256 (each file hashed once when first used)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        data = self._read(folder / MANIFEST, MAX_MANIFEST_BYTES)
        self.manifest_digest = sha256_hex(data)
        self.manifest = manifest = parse_manifest(data)
        self._files = {s.sha256: s.file for s in manifest.shards()}
        self._files[manifest.tokenizer.sha256] = TOKENIZER_FILE
        self._files[self.manifest_digest] = MANIFEST
        self._verified: set[str] = set()

    @staticmethod
    def _read(path: Path, limit: int) -> bytes:
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise DatasetError(f"{path}: {exc.strerror}") from exc
        if size > limit:
            raise DatasetError(f"{path}: {size} bytes exceeds {limit}")
        return path.read_bytes()

    def path(self, digest: str) -> Path:
        if digest not in self._files:
            raise DatasetError(f"blob {digest} is not part of the dataset in {self.folder}")
        path = self.folder / self._files[digest]
        if digest not in self._verified:
            if _file_sha256(path) != digest:
                raise DatasetError(f"{path} does not match its sha256 in the manifest")
            self._verified.add(digest)
        return path


class BlobSource:
    """Blobs from a blob store with local files (the hub's folder or S3 cache, or a node's
    cache); missing ones are fetched
    with `fetch(digest)` (a node's signed download), verified and cached first."""

    def __init__(self, store: FileBlobStore, fetch: Callable[[str], bytes] | None = None) -> None:
        self.store = store
        self.fetch = fetch
        self._verified: set[str] = set()

    def path(self, digest: str) -> Path:
        if not self.store.has(digest):
            if self.fetch is None:
                raise DatasetError(f"dataset blob {digest} is not in the blob store")
            self.store.put(self.fetch(digest), expected_digest=digest)
            self._verified.add(digest)
        path = self.store.path(digest)
        if digest not in self._verified:
            if _file_sha256(path) != digest:
                raise DatasetError(f"dataset blob {digest} is corrupt on disk")
            self._verified.add(digest)
        return path


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class PreparedCorpus:
    """A prepared dataset opened for training: shards memory-mapped on first use."""

    def __init__(self, manifest: Manifest, digest: str, source: DirSource | BlobSource) -> None:
        self.manifest = manifest
        self.digest = digest
        self.source = source

    @classmethod
    def open(cls, dataset: str, source: BlobSource | None = None) -> PreparedCorpus:
        """`dataset` is `manifest:<sha256>` (read through `source`) or a prepared folder."""
        digest = manifest_ref(dataset)
        if digest is None:
            folder = DirSource(Path(dataset).expanduser())
            return cls(folder.manifest, folder.manifest_digest, folder)
        if source is None:
            raise DatasetError(f"{dataset}: no blob source to read it from")
        data = DirSource._read(source.path(digest), MAX_MANIFEST_BYTES)
        return cls(parse_manifest(data), digest, source)

    def check_fits(self, seq_len: int) -> None:
        for split in ("train", "val"):
            if max(s.tokens for s in getattr(self.manifest, split)) <= seq_len + 1:
                raise DatasetError(f"no {split} shard holds seq_len {seq_len} + 1 tokens")

    def shard(self, info: ShardInfo) -> np.ndarray:
        path = self.source.path(info.sha256)
        if path.stat().st_size != info.tokens * self.manifest.itemsize:
            raise DatasetError(f"shard {info.file} has the wrong size for {info.tokens} tokens")
        return np.memmap(path, dtype=self.manifest.dtype, mode="r")

    def train_batches(self, seq_len: int, batch_size: int, seed: int, slice_shards: int):
        from gridswarm.train.data import shard_batches

        shards = self.manifest.train
        return shard_batches(
            [s.tokens for s in shards],
            lambda i: self.shard(shards[i]),
            seq_len,
            batch_size,
            seed,
            slice_shards,
        )

    def eval_batches(self, seq_len: int, batch_size: int, n_batches: int):
        from gridswarm.train.data import shard_batches

        shards = self.manifest.val
        stream = shard_batches(
            [s.tokens for s in shards],
            lambda i: self.shard(shards[i]),
            seq_len,
            batch_size,
            seed=0,
            slice_shards=len(shards),
        )
        return [next(stream) for _ in range(n_batches)]


def dataset_tokenizer(dataset: str, fetch: Callable[[str], bytes] | None = None) -> Tokenizer:
    """The tokenizer a run's model was trained with: a prepared folder's, a `manifest:<sha256>`
    dataset's (its blobs read with `fetch(digest)`, which verifies them), else the byte one."""
    digest = manifest_ref(dataset)
    if digest is None and is_prepared(dataset):
        folder = DirSource(Path(dataset).expanduser())
        digest, fetch = folder.manifest_digest, lambda d: folder.path(d).read_bytes()
    if digest is None:
        return byte_tokenizer()
    if fetch is None:
        raise DatasetError(f"{dataset}: no way to fetch its blobs")
    data = fetch(parse_manifest(fetch(digest)).tokenizer.sha256)
    if len(data) > MAX_TOKENIZER_BYTES:
        raise DatasetError(f"tokenizer of {len(data)} bytes exceeds {MAX_TOKENIZER_BYTES}")
    return Tokenizer.from_str(data.decode("utf-8"))


def verify_folder(folder: Path) -> DirSource:
    """A prepared folder whose every file has been checked (size, sha256) against its manifest;
    raises DatasetError naming the first that does not match."""
    source = DirSource(folder.expanduser())
    manifest = source.manifest
    for shard in manifest.shards():
        try:
            size = (source.folder / shard.file).stat().st_size
        except OSError as exc:
            raise DatasetError(f"{shard.file}: {exc.strerror}") from exc
        if size != shard.tokens * manifest.itemsize:
            raise DatasetError(f"{shard.file}: {size} bytes, not {shard.tokens} tokens")
    for digest in sorted(manifest.digests()):
        source.path(digest)  # hashes the file; raises on a mismatch
    return source


def import_dataset(folder: Path, store: FileBlobStore) -> tuple[Manifest, str]:
    """Copy a prepared folder into `store` (the hub's): every file is verified against the
    manifest before the first blob is written, so a refused dataset stores nothing."""
    source = verify_folder(folder)
    for digest in [source.manifest_digest, *sorted(source.manifest.digests())]:
        store.put(source.path(digest).read_bytes(), expected_digest=digest)
    return source.manifest, source.manifest_digest
