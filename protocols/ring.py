"""Ring all-reduce (reduce-scatter, then all-gather) on a flat float32 CPU buffer, sans-IO.

Layout. Members sit on a ring ``ring[0] .. ring[n-1]``; member at position p sends only to
p+1 and receives only from p-1. The buffer is cut into n segments (sizes differ by at most one
element; a segment may be empty when the buffer is shorter than the ring); segment s is owned
by position s. Each segment is cut into sub-chunks of at most ``chunk_elems`` elements that
travel independently, so forwarding chunk j overlaps with receiving chunk j+1 (pipelining).

Reduce-scatter. Position s+1 sends ``w_{s+1} * x_{s+1}[seg s]``; each next position adds its own
weighted slice and forwards, until the owner s adds its own last. The float32 accumulation order
of segment s is therefore fixed by the ring: ((w_{s+1}x_{s+1} + w_{s+2}x_{s+2}) + ...) + w_s x_s.

Bit parity. Only the owner finalizes its segment: ``acc / sum(w)``, encoded once with the round's
codec; the owner keeps ``decode(encoded)`` and the all-gather forwards the encoded bytes unchanged
around the ring, so every member writes the very same bits. The total weight is ``math.fsum`` of
all weights (exact, order independent), then one float32 rounding.

The driver calls ``start()`` for the first frames, then ``on_frame(tag, frame)`` for every frame
from the predecessor (``expected()`` lists them, in the order the predecessor sends them), and
sends whatever each call returns to the successor. ``done`` turns true after the last all-gather
frame; ``result_hash()`` is what the member reports as Done.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from protocols.codec import (
    CodecError,
    Compression,
    NonFiniteError,
    all_finite,
    decode,
    encode,
    hash_tensor,
    pack_frame,
    roundtrip,
    unpack_frame,
)

EXACT_RING_MAX_PEERS = 8


class RingError(ValueError):
    """A frame or argument the ring cannot use; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RingPlan:
    """Segments and sub-chunks of a flat buffer for an ordered ring."""

    ring: tuple[str, ...]
    total_elems: int
    chunk_elems: int
    segments: tuple[tuple[int, int], ...]

    def chunks(self, segment: int) -> list[tuple[int, int]]:
        """(start, stop) element ranges of the sub-chunks of ``segment``."""
        start, stop = self.segments[segment]
        return [(a, min(a + self.chunk_elems, stop)) for a in range(start, stop, self.chunk_elems)]


def plan_ring(ring: Sequence[str], total_elems: int, chunk_elems: int) -> RingPlan:
    """Cut ``total_elems`` into one segment per member and sub-chunks of ``chunk_elems``."""
    n = len(ring)
    if n < 1 or len(set(ring)) != n:
        raise RingError(f"ring must hold distinct members, got {list(ring)}")
    if total_elems < 0 or chunk_elems < 1:
        raise RingError(f"bad sizes: total_elems={total_elems}, chunk_elems={chunk_elems}")
    base, extra = divmod(total_elems, n)
    segments = []
    start = 0
    for position in range(n):
        size = base + (1 if position < extra else 0)
        segments.append((start, start + size))
        start += size
    return RingPlan(tuple(ring), total_elems, chunk_elems, tuple(segments))


@dataclass(frozen=True)
class OutgoingFrame:
    """A frame for the bulk channel: ``send(to, tag, data)``."""

    to: str
    tag: str
    data: bytes | bytearray


def total_weight(weights: Mapping[str, float]) -> float:
    """Exact sum of the weights (math.fsum), so every owner divides by the same number."""
    return math.fsum(weights[peer] for peer in sorted(weights))


class RingReduction:
    """One member's part of one ring all-reduce attempt.

    ``buffer`` is the member's own flat float32 input; it is updated in place and holds the
    weighted mean once ``done``. Give it a working copy if the caller's tensor must survive
    an abort.
    """

    def __init__(
        self,
        plan: RingPlan,
        me: str,
        buffer: torch.Tensor,
        weights: Mapping[str, float],
        compression: Compression,
        tag_prefix: str,
    ) -> None:
        if me not in plan.ring:
            raise RingError(f"{me} is not on the ring {list(plan.ring)}")
        if buffer.dtype != torch.float32 or buffer.dim() != 1 or not buffer.is_contiguous():
            raise RingError("buffer must be a contiguous flat float32 tensor")
        if buffer.numel() != plan.total_elems:
            raise RingError(f"buffer has {buffer.numel()} elements, plan {plan.total_elems}")
        if set(weights) != set(plan.ring):
            raise RingError("weights must name exactly the ring's members")
        for peer, weight in weights.items():
            if not math.isfinite(weight) or weight < 0:
                raise RingError(f"weight of {peer} is {weight}; weights must be finite and >= 0")
        total = total_weight(weights)
        if not total > 0:
            raise RingError("the weights sum to zero")
        if not all_finite(buffer):
            raise NonFiniteError("local input holds NaN or Inf")
        self.plan = plan
        self.me = me
        self.buffer = buffer
        self.compression = Compression(compression)
        self.tag_prefix = tag_prefix
        n = len(plan.ring)
        self.n = n
        self.position = plan.ring.index(me)
        self.successor = plan.ring[(self.position + 1) % n]
        self.predecessor = plan.ring[(self.position - 1) % n]
        self._weight = torch.tensor(weights[me], dtype=torch.float32)
        self._total = torch.tensor(total, dtype=torch.float32)
        self._expected = self._expected_frames()
        self._pending = {tag: key for tag, key in self._expected}
        self._received = 0

    # -- tags and order --------------------------------------------------------------------

    def tag(self, phase: str, segment: int, chunk: int) -> str:
        return f"{self.tag_prefix}.{phase}.s{segment}.c{chunk}"

    def _expected_frames(self) -> list[tuple[str, tuple[str, int, int]]]:
        n, p = self.n, self.position
        order: list[tuple[str, tuple[str, int, int]]] = []
        # Reduce-scatter: step k brings segment p-k-2 from the predecessor (the last is ours).
        for step in range(n - 1):
            segment = (p - step - 2) % n
            for j in range(len(self.plan.chunks(segment))):
                order.append((self.tag("rs", segment, j), ("rs", segment, j)))
        # All-gather: the predecessor's own segment first, then the ones it forwards.
        for step in range(n - 1):
            segment = (p - 1 - step) % n
            for j in range(len(self.plan.chunks(segment))):
                order.append((self.tag("ag", segment, j), ("ag", segment, j)))
        return order

    def expected(self) -> list[tuple[str, str]]:
        """(sender, tag) of every frame this member will receive, in sending order."""
        return [(self.predecessor, tag) for tag, _ in self._expected]

    @property
    def done(self) -> bool:
        return not self._pending

    # -- steps -----------------------------------------------------------------------------

    def start(self) -> list[OutgoingFrame]:
        """First frames: our weighted slice of the predecessor's segment (and, alone, finish)."""
        if self.n == 1:
            self._finalize(0)
            return []
        segment = (self.position - 1) % self.n
        out = []
        for j, (a, b) in enumerate(self.plan.chunks(segment)):
            contribution = self.buffer[a:b] * self._weight
            chunk = encode(contribution, self.compression)
            out.append(OutgoingFrame(self.successor, self.tag("rs", segment, j), pack_frame(chunk)))
        return out

    def on_frame(self, tag: str, frame: bytes | bytearray) -> list[OutgoingFrame]:
        """Use one frame from the predecessor; returns frames for the successor.

        Raises RingError for an unexpected or repeated tag and CodecError (with subclasses
        for size and NaN/Inf) for a frame that fails validation. The buffer is untouched then.
        """
        key = self._pending.get(tag)
        if key is None:
            raise RingError(f"unexpected or repeated frame tag {tag!r}")
        phase, segment, j = key
        a, b = self.plan.chunks(segment)[j]
        chunk = unpack_frame(frame)
        try:
            incoming = decode(chunk, b - a, self.compression)
        except CodecError as exc:
            raise type(exc)(f"frame {tag}: {exc.reason}") from None
        del self._pending[tag]
        self._received += 1
        if phase == "rs":
            accumulated = incoming + self.buffer[a:b] * self._weight
            if segment == self.position:
                final = accumulated / self._total
                encoded, own = roundtrip(final, self.compression)
                self.buffer[a:b] = own
                frame_out = pack_frame(encoded)
                return [OutgoingFrame(self.successor, self.tag("ag", segment, j), frame_out)]
            forwarded = pack_frame(encode(accumulated, self.compression))
            return [OutgoingFrame(self.successor, self.tag("rs", segment, j), forwarded)]
        self.buffer[a:b] = incoming
        if (segment - 1) % self.n == self.position:
            return []  # the successor owns this segment: the all-gather ends here
        return [OutgoingFrame(self.successor, tag, frame)]  # the exact bytes, unchanged

    def _finalize(self, segment: int) -> None:
        for a, b in self.plan.chunks(segment):
            final = (self.buffer[a:b] * self._weight) / self._total
            _, own = roundtrip(final, self.compression)
            self.buffer[a:b] = own

    def result_hash(self) -> str:
        """Hash of the reduced buffer's bytes; equal on every member exactly when bits are."""
        if not self.done:
            raise RingError("result_hash before the all-reduce finished")
        return hash_tensor(self.buffer)


# -- flattening -----------------------------------------------------------------------------


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one new flat float32 buffer (the all-reduce's working form)."""
    if not tensors:
        return torch.empty(0, dtype=torch.float32)
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy a flat buffer back into ``tensors`` in place (cast to each tensor's dtype)."""
    total = sum(t.numel() for t in tensors)
    if flat.numel() != total:
        raise RingError(f"flat buffer has {flat.numel()} elements, tensors need {total}")
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view(t.shape))
        offset += n


# -- ring order -----------------------------------------------------------------------------


def ring_cost(order: Sequence[str], cost: Mapping[tuple[str, str], float]) -> tuple[float, float]:
    """(slowest link, sum of links) of a directed ring; missing pairs cost infinity."""
    links = [cost.get((order[i], order[(i + 1) % len(order)]), math.inf) for i in range(len(order))]
    if len(order) < 2:
        return (0.0, 0.0)
    return (max(links), math.fsum(links) if all(map(math.isfinite, links)) else math.inf)


def order_ring(
    peers: Sequence[str],
    cost: Mapping[tuple[str, str], float],
    exact_max_peers: int = EXACT_RING_MAX_PEERS,
) -> tuple[str, ...]:
    """Ring order that minimizes (slowest link, total) over a measured cost matrix.

    ``cost[(a, b)]`` is the time for a to send one chunk to b (from measured bandwidth and RTT).
    A pipelined ring runs at its slowest link, so that is minimized first, then the sum; ties
    fall to the lexicographically smallest order, so every caller gets the same ring. Exact
    (every ring starting at the smallest id) up to ``exact_max_peers``; above, nearest-neighbour
    from every start, then the best of those.
    """
    members = sorted(set(peers))
    if len(members) <= 2:
        return tuple(members)
    if len(members) <= exact_max_peers:
        first, rest = members[0], members[1:]
        candidates = ((first, *perm) for perm in itertools.permutations(rest))
        return min(candidates, key=lambda order: (ring_cost(order, cost), order))
    best: tuple[str, ...] | None = None
    for start in members:
        order = [start]
        left = set(members) - {start}
        while left:
            here = order[-1]
            nxt = min(left, key=lambda peer: (cost.get((here, peer), math.inf), peer))
            order.append(nxt)
            left.discard(nxt)
        pivot = order.index(members[0])
        rotated = tuple(order[pivot:] + order[:pivot])
        if best is None or (ring_cost(rotated, cost), rotated) < (ring_cost(best, cost), best):
            best = rotated
    assert best is not None
    return best
