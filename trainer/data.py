"""Training text: the user's files and folders, or Python's own standard library.

Pipeline: sources -> documents (files cut into fixed-size chunks, in sorted order, bounded
in total size) -> split by a hash of each document id into train and held-out -> the train
documents become one token stream, cut into `num_shards` shards so each worker reads
different text (contiguous slices, or the documents dealt out in turn) -> random
(inputs, targets) blocks from a shard, or fixed blocks from the held-out stream for
evaluation.

Every step is a pure function of the files and the settings: no Python `hash()`, no clock,
no global RNG. Document ids are relative paths, so two machines with the same files (the same
Python version, for the default corpus) build the same shards.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainer.tokenizer import BOS_ID, EOS_ID

Batch = tuple[torch.Tensor, torch.Tensor]

# Folders skipped when walking the standard library: installed packages would make the
# default corpus depend on what happens to be installed.
_SKIPPED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


class CorpusError(ValueError):
    """The sources do not yield a usable corpus; the message says what to change."""


@dataclass(frozen=True)
class CorpusSettings:
    """Where text comes from and how it is cut.

    `sources`: files or folders; empty means the standard library's *.py files.
    `folder_suffixes`: file name endings taken when walking a folder (files named
    directly are always taken); empty means every file.
    """

    sources: tuple[str, ...] = ()
    folder_suffixes: tuple[str, ...] = (".txt", ".md", ".rst", ".py")
    max_total_bytes: int = 16 * 2**20
    document_chunk_bytes: int = 64 * 2**10
    heldout_fraction: float = 0.05
    split_salt: str = "shoal-split-v1"
    binary_probe_bytes: int = 8192

    def __post_init__(self) -> None:
        if self.max_total_bytes <= 0 or self.document_chunk_bytes <= 0:
            raise CorpusError("max_total_bytes and document_chunk_bytes must be positive")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise CorpusError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")


@dataclass(frozen=True)
class Document:
    doc_id: str
    data: bytes


@dataclass(frozen=True)
class Corpus:
    """Train and held-out token streams (int16 1-D tensors) and the ids that made them."""

    train_ids: tuple[str, ...]
    heldout_ids: tuple[str, ...]
    train_tokens: torch.Tensor
    heldout_tokens: torch.Tensor

    def train_shard(
        self, shard_index: int, num_shards: int, *, interleaved: bool = False
    ) -> torch.Tensor:
        """Shard `shard_index` of `num_shards` of the train stream.

        Contiguous (the default): slice `shard_index` of `num_shards` equal slices, so with
        sorted files each shard holds different folders (non-IID shards). `interleaved`:
        the train documents dealt out in turn (document k to shard k mod `num_shards`), so
        every shard samples the whole corpus. Either way shards are disjoint and together
        cover the stream exactly.
        """
        if num_shards <= 0 or not 0 <= shard_index < num_shards:
            raise CorpusError(f"shard {shard_index} of {num_shards} does not exist")
        if interleaved:
            starts = (self.train_tokens == BOS_ID).nonzero().flatten().tolist()
            bounds = list(zip(starts, [*starts[1:], self.train_tokens.numel()], strict=True))
            pieces = [self.train_tokens[a:b] for a, b in bounds[shard_index::num_shards]]
            if not pieces:
                raise CorpusError(
                    f"{len(bounds)} train documents leave shard {shard_index} of {num_shards} "
                    "empty; use fewer shards or smaller document chunks"
                )
            return torch.cat(pieces)
        total = self.train_tokens.numel()
        start = shard_index * total // num_shards
        stop = (shard_index + 1) * total // num_shards
        return self.train_tokens[start:stop]


def default_corpus_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def _walk_files(root: Path, suffixes: tuple[str, ...], skip_dirs: frozenset[str]) -> list[Path]:
    found: list[Path] = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d not in skip_dirs)
        for name in sorted(files):
            if not suffixes or name.endswith(suffixes):
                found.append(Path(folder) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _source_files(settings: CorpusSettings) -> list[tuple[str, Path]]:
    """(document id prefix, path) for every input file, in a deterministic order."""
    if not settings.sources:
        root = default_corpus_root()
        return [
            (p.relative_to(root).as_posix(), p)
            for p in _walk_files(root, (".py",), _SKIPPED_STDLIB_DIRS)
        ]
    out: list[tuple[str, Path]] = []
    for source in settings.sources:
        path = Path(source).expanduser()
        if path.is_file():
            out.append((path.name, path))
        elif path.is_dir():
            files = _walk_files(path, settings.folder_suffixes, frozenset({"__pycache__"}))
            name = path.resolve().name
            out.extend(((Path(name) / p.relative_to(path)).as_posix(), p) for p in files)
        else:
            raise CorpusError(f"training data source {str(path)!r} is not a file or a folder")
    # Ids depend only on names and the order of the sources (the same on every worker), not
    # on where the files lie; sources sharing a name get "~k" so each keeps its own place in
    # the hashed split instead of all landing on one side.
    seen: dict[str, int] = {}
    unique: list[tuple[str, Path]] = []
    for doc_prefix, file in out:
        k = seen.get(doc_prefix, 0)
        seen[doc_prefix] = k + 1
        unique.append((f"{doc_prefix}~{k}" if k else doc_prefix, file))
    return unique


def read_documents(settings: CorpusSettings) -> list[Document]:
    """Files cut into chunks of `document_chunk_bytes`, stopping at `max_total_bytes`.

    Files that look binary (a NUL byte near the start) or cannot be read are skipped.
    """
    documents: list[Document] = []
    budget = settings.max_total_bytes
    for doc_prefix, path in _source_files(settings):
        if budget <= 0:
            break
        try:
            with path.open("rb") as f:
                data = f.read(budget)
        except OSError:
            continue
        if b"\0" in data[: settings.binary_probe_bytes]:
            continue
        budget -= len(data)
        step = settings.document_chunk_bytes
        for chunk_index, start in enumerate(range(0, len(data), step)):
            documents.append(Document(f"{doc_prefix}#{chunk_index}", data[start : start + step]))
    return documents


def is_heldout(doc_id: str, settings: CorpusSettings) -> bool:
    """Whether `doc_id` belongs to the held-out split (a keyed hash, stable across machines)."""
    digest = hashlib.sha256(f"{settings.split_salt}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < settings.heldout_fraction


def _token_stream(documents: Sequence[Document]) -> torch.Tensor:
    """Concatenation of BOS + bytes + EOS for each document, as int16 (ids go up to 258)."""
    total = sum(len(d.data) + 2 for d in documents)
    stream = torch.empty(total, dtype=torch.int16)
    pos = 0
    for doc in documents:
        stream[pos] = BOS_ID
        n = len(doc.data)
        if n:
            stream[pos + 1 : pos + 1 + n] = torch.frombuffer(bytearray(doc.data), dtype=torch.uint8)
        stream[pos + 1 + n] = EOS_ID
        pos += n + 2
    return stream


def load_corpus(settings: CorpusSettings | None = None) -> Corpus:
    """Read, split and tokenize the sources named by `settings`."""
    settings = settings or CorpusSettings()
    documents = read_documents(settings)
    if not documents:
        where = ", ".join(settings.sources) or str(default_corpus_root())
        raise CorpusError(f"no readable text files found in {where}")
    train = [d for d in documents if not is_heldout(d.doc_id, settings)]
    heldout = [d for d in documents if is_heldout(d.doc_id, settings)]
    if not train or not heldout:
        raise CorpusError(
            f"{len(documents)} document chunks gave {len(train)} train and {len(heldout)} "
            "held-out chunks; both must be non-empty: add text, lower document_chunk_bytes, "
            "or change heldout_fraction"
        )
    return Corpus(
        train_ids=tuple(d.doc_id for d in train),
        heldout_ids=tuple(d.doc_id for d in heldout),
        train_tokens=_token_stream(train),
        heldout_tokens=_token_stream(heldout),
    )


def _check_block_source(tokens: torch.Tensor, context_tokens: int, what: str) -> None:
    if tokens.dim() != 1:
        raise CorpusError(f"{what} must be a 1-D token stream")
    if tokens.numel() < context_tokens + 1:
        raise CorpusError(
            f"{what} has {tokens.numel()} tokens, fewer than one block of "
            f"{context_tokens + 1}; add text or use fewer shards"
        )


class TokenBlocks:
    """Endless (inputs, targets) batches of random blocks from one token stream.

    Batch k depends only on (seed, k), so a worker can resume at any batch index.
    inputs and targets are int64 of shape (batch_size, context_tokens); targets are
    inputs shifted by one token.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        *,
        batch_size: int,
        context_tokens: int,
        seed: int,
        start_batch: int = 0,
    ) -> None:
        if batch_size <= 0 or context_tokens <= 0:
            raise CorpusError("batch_size and context_tokens must be positive")
        _check_block_source(tokens, context_tokens, "the token shard")
        self.tokens = tokens
        self.batch_size = batch_size
        self.context_tokens = context_tokens
        self.seed = seed
        self.batches_drawn = start_batch
        self._span = torch.arange(context_tokens + 1)

    def batch_at(self, index: int) -> Batch:
        # random.Random with a str seed hashes it with SHA-512: same stream on every platform.
        rng = random.Random(f"shoal-blocks:{self.seed}:{index}")
        limit = self.tokens.numel() - self.context_tokens
        starts = torch.tensor([rng.randrange(limit) for _ in range(self.batch_size)])
        blocks = self.tokens[starts[:, None] + self._span].long()
        return blocks[:, :-1], blocks[:, 1:]

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = self.batch_at(self.batches_drawn)
        self.batches_drawn += 1
        return batch


def heldout_batches(
    tokens: torch.Tensor, *, batch_size: int, context_tokens: int, max_batches: int
) -> list[Batch]:
    """Fixed evaluation batches: up to `max_batches * batch_size` blocks spread evenly over
    the held-out stream. The same on every worker and round, so eval losses are comparable.
    """
    if batch_size <= 0 or max_batches <= 0:
        raise CorpusError("batch_size and max_batches must be positive")
    _check_block_source(tokens, context_tokens, "the held-out stream")
    limit = tokens.numel() - context_tokens - 1
    fit = limit // context_tokens + 1
    count = min(max_batches * batch_size, fit)
    starts = torch.tensor([i * limit // max(count - 1, 1) for i in range(count)])
    blocks = tokens[starts[:, None] + torch.arange(context_tokens + 1)].long()
    return [
        (blocks[i : i + batch_size, :-1], blocks[i : i + batch_size, 1:])
        for i in range(0, count, batch_size)
    ]


def evaluate_loss(
    model: nn.Module, batches: Sequence[Batch], device: torch.device | str | None = None
) -> float:
    """Token-weighted mean next-token cross-entropy of `model` over `batches`.

    Runs without gradients in eval mode and restores the model's previous mode.
    """
    if not batches:
        raise CorpusError("no evaluation batches")
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for inputs, targets in batches:
                logits = model(inputs.to(device))
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(),
                    targets.to(device).reshape(-1),
                    reduction="sum",
                )
                total += float(loss)
                count += targets.numel()
    finally:
        model.train(was_training)
    result = total / count
    if not math.isfinite(result):
        raise FloatingPointError("evaluation loss is not finite")
    return result
