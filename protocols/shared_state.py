"""Shared-state sync (PCCL's rule, without its master), sans-IO.

Shared state is a set of named tensors plus a revision number. Each member summarizes its
state as (revision, {name: hash}); the hash covers dtype, shape and the contiguous bytes.
Given every member's summary, the most popular (revision, hashes) wins; ties go to the higher
revision, then to the smaller fingerprint, so every member that sees the same summaries picks
the same winner. A member whose summary differs fetches only the tensors whose hash differs
(or that it lacks) from a donor holding the winning state; a healthy member fetches nothing;
a newcomer (no summary yet) fetches everything. A fetched tensor is accepted only after it
hashes to the winner's hash.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

# hash_tensor is re-exported: the state vote's tensor hash (the all-reduce's parity check uses the
# faster, non-cryptographic codec.parity_hash).
from protocols.codec import hash_tensor as hash_tensor
from protocols.codec import tensor_bytes

HASH_CHARS = 32  # 128-bit hash_tensor digest in hex
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class SharedStateLimits:
    """Caps on what a peer's summary or tensor may claim."""

    max_tensors: int = 4096
    max_name_chars: int = 256
    max_tensor_dims: int = 8
    max_tensor_bytes: int = 1 << 34


class SharedStateError(ValueError):
    """A summary or fetched tensor that must not be used; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HashMismatchError(SharedStateError):
    """A fetched tensor does not hash to the value the winning state promised."""


@dataclass(frozen=True)
class StateSummary:
    """A member's (revision, {name: hash})."""

    revision: int
    hashes: Mapping[str, str]

    def key(self) -> tuple[int, tuple[tuple[str, str], ...]]:
        return (self.revision, tuple(sorted(self.hashes.items())))

    def fingerprint(self) -> str:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(repr(self.key()).encode())
        return digest.hexdigest()

    def to_wire(self) -> dict[str, Any]:
        return {"revision": self.revision, "hashes": dict(self.hashes)}

    @classmethod
    def from_wire(cls, raw: object, limits: SharedStateLimits | None = None) -> StateSummary:
        limits = limits or SharedStateLimits()
        if not isinstance(raw, Mapping):
            raise SharedStateError("state summary is not a map")
        revision = raw.get("revision")
        if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
            raise SharedStateError("state summary revision must be an integer >= 0")
        hashes = raw.get("hashes")
        if not isinstance(hashes, Mapping) or len(hashes) > limits.max_tensors:
            raise SharedStateError(f"state summary needs a map of at most {limits.max_tensors}")
        for name, value in hashes.items():
            if not isinstance(name, str) or not 0 < len(name) <= limits.max_name_chars:
                raise SharedStateError("state summary has a bad tensor name")
            if not isinstance(value, str) or len(value) != HASH_CHARS:
                raise SharedStateError(f"state summary hash of {name!r} is malformed")
        return cls(revision, dict(hashes))


@dataclass(frozen=True)
class FetchOrder:
    """What one member must fetch, and from whom."""

    donor: str
    names: tuple[str, ...]
    expected: Mapping[str, str]  # name -> hash the fetched tensor must have
    revision: int


@dataclass(frozen=True)
class SyncPlan:
    winner: StateSummary
    holders: tuple[str, ...]  # members already holding the winning state
    fetches: Mapping[str, FetchOrder] = field(default_factory=dict)

    def for_member(self, peer: str) -> FetchOrder | None:
        """None: ``peer`` holds the winning state and fetches nothing."""
        return self.fetches.get(peer)


def plan_sync(summaries: Mapping[str, StateSummary | None]) -> SyncPlan:
    """Vote on the state and say what each differing member fetches from which donor.

    ``None`` stands for a newcomer without state: it never votes and fetches every tensor.
    """
    votes = Counter(s.key() for s in summaries.values() if s is not None)
    if not votes:
        raise SharedStateError("no member holds shared state yet; nothing to sync from")
    by_key = {s.key(): s for s in summaries.values() if s is not None}
    winner = by_key[
        min(votes, key=lambda k: (-votes[k], -k[0], StateSummary(k[0], dict(k[1])).fingerprint()))
    ]
    holders = tuple(
        sorted(peer for peer, s in summaries.items() if s is not None and s.key() == winner.key())
    )
    fetches: dict[str, FetchOrder] = {}
    behind = sorted(peer for peer in summaries if peer not in holders)
    for index, peer in enumerate(behind):
        summary = summaries[peer]
        if summary is None:
            names = sorted(winner.hashes)
        else:
            names = sorted(
                name for name, h in winner.hashes.items() if summary.hashes.get(name) != h
            )
        expected = {name: winner.hashes[name] for name in names}
        # Spread the fetchers over the holders, deterministically.
        donor = holders[index % len(holders)]
        fetches[peer] = FetchOrder(donor, tuple(names), expected, winner.revision)
    return SyncPlan(winner, holders, fetches)


class SharedState:
    """One member's named tensors and revision."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor] | None = None,
        revision: int = 0,
        limits: SharedStateLimits | None = None,
    ) -> None:
        self.tensors: dict[str, torch.Tensor] = dict(tensors or {})
        self.revision = revision
        self.limits = limits or SharedStateLimits()
        self.bytes_fetched = 0
        self._hashes: dict[str, str] | None = None

    def summary(self) -> StateSummary:
        if self._hashes is None:
            self._hashes = {name: hash_tensor(t) for name, t in self.tensors.items()}
        return StateSummary(self.revision, dict(self._hashes))

    def update(self, tensors: Mapping[str, torch.Tensor], revision: int) -> None:
        """Replace tensors after a step; the revision must go up by exactly one."""
        if revision != self.revision + 1:
            raise SharedStateError(f"revision {revision} does not follow {self.revision}")
        self.tensors.update(tensors)
        self.revision = revision
        self._hashes = None

    def export(self, name: str) -> tuple[dict[str, Any], bytes]:
        """(header, raw bytes) of one tensor, for a donor to send."""
        tensor = self.tensors[name]
        header = {"name": name, "dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape)}
        return header, tensor_bytes(tensor.detach().cpu())

    def install(
        self, order: FetchOrder, fetched: Mapping[str, tuple[Mapping[str, Any], bytes]]
    ) -> None:
        """Check every fetched tensor against ``order`` and only then take them all.

        Raises SharedStateError (HashMismatchError for a wrong hash); nothing changes then.
        """
        missing = set(order.names) - set(fetched)
        if missing:
            raise SharedStateError(f"fetch lacks {sorted(missing)}")
        staged: dict[str, torch.Tensor] = {}
        for name in order.names:
            header, payload = fetched[name]
            tensor = self._decode(name, header, payload)
            actual = hash_tensor(tensor)
            if actual != order.expected[name]:
                raise HashMismatchError(
                    f"tensor {name!r} hashes to {actual}, the winning state has "
                    f"{order.expected[name]}; fetch it again from another donor"
                )
            staged[name] = tensor
        self.tensors.update(staged)
        self.revision = order.revision
        self.bytes_fetched += sum(len(fetched[name][1]) for name in order.names)
        self._hashes = None

    def _decode(self, name: str, header: Mapping[str, Any], payload: bytes) -> torch.Tensor:
        if header.get("name") != name:
            raise SharedStateError(f"fetched header names {header.get('name')!r}, not {name!r}")
        dtype = _DTYPES.get(header.get("dtype"))  # type: ignore[arg-type]
        if dtype is None:
            raise SharedStateError(f"tensor {name!r} has unsupported dtype {header.get('dtype')!r}")
        shape = header.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > self.limits.max_tensor_dims
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise SharedStateError(f"tensor {name!r} has a malformed shape {shape!r}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        expected = math.prod(shape) * itemsize
        if expected > self.limits.max_tensor_bytes or len(payload) != expected:
            raise SharedStateError(
                f"tensor {name!r}: {len(payload)} bytes for shape {shape} of {header['dtype']}"
            )
        if expected == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(payload), dtype=dtype).reshape(shape)


def _dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise SharedStateError(f"unsupported shared-state dtype {dtype}")
    return name
