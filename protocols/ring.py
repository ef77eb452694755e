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

import ctypes
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from protocols.codec import (
    ChunkSizeError,
    CodecError,
    Compression,
    NonFiniteError,
    all_finite,
    decode,
    encode,
    pack_frame,
    parity_hash,
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
        return [self.chunk(segment, j) for j in range(self.chunk_count(segment))]

    def chunk_count(self, segment: int) -> int:
        start, stop = self.segments[segment]
        return -(-(stop - start) // self.chunk_elems)

    def chunk(self, segment: int, j: int) -> tuple[int, int]:
        """(start, stop) of sub-chunk ``j`` of ``segment`` (per frame: no list built)."""
        start, stop = self.segments[segment]
        a = start + j * self.chunk_elems
        return a, min(a + self.chunk_elems, stop)


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
    data: bytes | bytearray | memoryview  # a view of the working buffer when uncompressed


def total_weight(weights: Mapping[str, float]) -> float:
    """Exact sum of the weights (math.fsum), so every owner divides by the same number."""
    return math.fsum(weights[peer] for peer in sorted(weights))


class RingReduction:
    """One member's part of one ring all-reduce attempt.

    ``source`` is the member's own input: a contiguous flat float32 tensor, or a sequence of
    tensors of any dtype read in order as one flat float32 buffer. Without ``copy`` (a flat
    tensor only) the ring weights and updates it in place; it holds the weighted mean once
    ``done``. With ``copy`` (always for a sequence) the ring works on a weighted copy written
    in one pass into ``workspace`` (a bytearray of exactly 4 bytes per element, which the
    caller may reuse across attempts) or a new one, left in ``self.buffer``: the caller's
    tensors survive an abort.

    Uncompressed frames are the raw float32 bytes of their sub-chunk (no header: the round's
    spec fixes shape and dtype, so the length is the only thing to check), sent as views of
    the working buffer, and ``landing(tag)`` names the memory a driver should receive each
    frame into: a reusable scratch for reduce-scatter frames, the working buffer itself for
    all-gather ones. So an uncompressed hop allocates nothing and copies nothing it need
    not. Compressed frames carry the codec header (``pack_frame``) and are fresh bytes.
    """

    def __init__(
        self,
        plan: RingPlan,
        me: str,
        source: torch.Tensor | Sequence[torch.Tensor],
        weights: Mapping[str, float],
        compression: Compression,
        tag_prefix: str,
        copy: bool = False,
        workspace: bytearray | None = None,
    ) -> None:
        if me not in plan.ring:
            raise RingError(f"{me} is not on the ring {list(plan.ring)}")
        parts = [source] if isinstance(source, torch.Tensor) else list(source)
        if isinstance(source, torch.Tensor):
            if source.dtype != torch.float32 or source.dim() != 1 or not source.is_contiguous():
                raise RingError("buffer must be a contiguous flat float32 tensor")
        elif not copy:
            raise RingError("a sequence of tensors needs copy=True")
        elems = sum(t.numel() for t in parts)
        if elems != plan.total_elems:
            raise RingError(f"buffer has {elems} elements, plan {plan.total_elems}")
        if set(weights) != set(plan.ring):
            raise RingError("weights must name exactly the ring's members")
        for peer, weight in weights.items():
            if not math.isfinite(weight) or weight < 0:
                raise RingError(f"weight of {peer} is {weight}; weights must be finite and >= 0")
        total = total_weight(weights)
        if not total > 0:
            raise RingError("the weights sum to zero")
        # Weighted once up front (the same float32 products each hop used to compute), so a
        # reduce-scatter hop is one add. A finite product proves the input finite (a weight of
        # 0 turns Inf into NaN), and it is what leaves this member, so one check covers both.
        scale = torch.tensor(weights[me], dtype=torch.float32)
        self.workspace: bytearray | None = None  # the working buffer's memory, when copied
        if copy:
            self.workspace = _workspace(workspace, 4 * elems)
            buffer = _float32_view(self.workspace, 0, elems)
            _weigh_into(parts, scale, buffer)
        else:
            buffer = parts[0].mul_(scale)
        if not all_finite(buffer):
            raise NonFiniteError("local input holds NaN or Inf (or overflows when weighted)")
        self.plan = plan
        self.me = me
        self.buffer = buffer
        self.compression = Compression(compression)
        self.raw = self.compression is Compression.NONE
        self.tag_prefix = tag_prefix
        n = len(plan.ring)
        self.n = n
        self.position = plan.ring.index(me)
        self.successor = plan.ring[(self.position + 1) % n]
        self.predecessor = plan.ring[(self.position - 1) % n]
        self._total = torch.tensor(total, dtype=torch.float32)
        self._expected = self._expected_frames()
        self._pending = {tag: key for tag, key in self._expected}
        self._received = 0
        self._landings: dict[str, tuple[memoryview, torch.Tensor | None]] = {}
        self._spare: list[tuple[memoryview, torch.Tensor]] = []  # free reduce-scatter scratch

    # -- tags and order --------------------------------------------------------------------

    def tag(self, phase: str, segment: int, chunk: int) -> str:
        return f"{self.tag_prefix}.{phase}.s{segment}.c{chunk}"

    def _expected_frames(self) -> list[tuple[str, tuple[str, int, int]]]:
        n, p = self.n, self.position
        order: list[tuple[str, tuple[str, int, int]]] = []
        # Reduce-scatter: step k brings segment p-k-2 from the predecessor (the last is ours).
        for step in range(n - 1):
            segment = (p - step - 2) % n
            for j in range(self.plan.chunk_count(segment)):
                order.append((self.tag("rs", segment, j), ("rs", segment, j)))
        # All-gather: the predecessor's own segment first, then the ones it forwards.
        for step in range(n - 1):
            segment = (p - 1 - step) % n
            for j in range(self.plan.chunk_count(segment)):
                order.append((self.tag("ag", segment, j), ("ag", segment, j)))
        return order

    def expected(self) -> list[tuple[str, str]]:
        """(sender, tag) of every frame this member will receive, in sending order."""
        return [(self.predecessor, tag) for tag, _ in self._expected]

    @property
    def done(self) -> bool:
        return not self._pending

    # -- where frames land -------------------------------------------------------------------

    def _view(self, a: int, b: int) -> memoryview:
        """The bytes of ``buffer[a:b]`` (the working buffer is ours when copied)."""
        if self.workspace is not None:
            return memoryview(self.workspace)[4 * a : 4 * b]
        return _tensor_bytes_view(self.buffer[a:b])

    def landing(self, tag: str) -> memoryview | None:
        """Where to receive frame ``tag`` (uncompressed rounds; None: any fresh bytes). Pass
        the returned view to ``on_frame`` as the frame: it is then used in place. At most
        as many reduce-scatter scratches exist as frames are received ahead."""
        key = self._pending.get(tag)
        if key is None or not self.raw or tag in self._landings:
            return None
        phase, segment, j = key
        a, b = self.plan.chunk(segment, j)
        if phase == "ag":
            view = self._view(a, b)
            self._landings[tag] = (view, None)
            return view
        if self._spare and len(self._spare[-1][0]) == 4 * (b - a):
            view, scratch = self._spare.pop()
        else:
            raw = bytearray(4 * (b - a))
            view, scratch = memoryview(raw), _float32_view(raw, 0, b - a)
        self._landings[tag] = (view, scratch)
        return view

    # -- steps -----------------------------------------------------------------------------

    def start(self) -> list[OutgoingFrame]:
        """First frames: our weighted slice of the predecessor's segment (and, alone, finish)."""
        if self.n == 1:
            self._finalize(0)
            return []
        segment = (self.position - 1) % self.n
        out = []
        for j, (a, b) in enumerate(self.plan.chunks(segment)):
            contribution = self.buffer[a:b]  # weighted and checked finite in __init__
            data: bytes | bytearray | memoryview
            if self.raw:
                data = self._view(a, b)
            else:
                data = pack_frame(encode(contribution, self.compression))
            out.append(OutgoingFrame(self.successor, self.tag("rs", segment, j), data))
        return out

    def on_frame(self, tag: str, frame: bytes | bytearray | memoryview) -> list[OutgoingFrame]:
        """Use one frame from the predecessor; returns frames for the successor.

        Raises RingError for an unexpected or repeated tag and CodecError (with subclasses
        for size and NaN/Inf) for a frame that fails validation. The buffer is untouched
        then, except by an all-gather frame received into its ``landing``: that memory is
        the buffer's, and the attempt is over anyway.
        """
        key = self._pending.get(tag)
        if key is None:
            raise RingError(f"unexpected or repeated frame tag {tag!r}")
        phase, segment, j = key
        landed = self._landings.pop(tag, None)
        if landed is not None and frame is not landed[0]:
            self._recycle(landed)
            landed = None
        try:
            if self.raw:
                return self._on_raw(tag, phase, segment, j, frame, landed)
            return self._on_encoded(tag, phase, segment, j, frame)
        finally:
            if landed is not None:
                self._recycle(landed)

    def _recycle(self, landed: tuple[memoryview, torch.Tensor | None]) -> None:
        view, scratch = landed
        if scratch is not None:
            self._spare.append((view, scratch))

    def _on_raw(
        self,
        tag: str,
        phase: str,
        segment: int,
        j: int,
        frame: bytes | bytearray | memoryview,
        landed: tuple[memoryview, torch.Tensor | None] | None,
    ) -> list[OutgoingFrame]:
        a, b = self.plan.chunk(segment, j)
        size = memoryview(frame).nbytes
        if size != 4 * (b - a):
            raise ChunkSizeError(
                f"frame {tag}: payload of {size} bytes, expected {4 * (b - a)} ({b - a} x float32)"
            )
        own = self.buffer[a:b]
        if phase == "ag":
            if landed is None:  # bytes from elsewhere: checked before they go in
                incoming = _float32_view(bytearray(frame), 0, b - a)
                if not all_finite(incoming):
                    raise NonFiniteError(f"frame {tag}: chunk holds NaN or Inf")
                own.copy_(incoming)
            elif not all_finite(own):
                raise NonFiniteError(f"frame {tag}: chunk holds NaN or Inf")
            del self._pending[tag]
            self._received += 1
            if (segment - 1) % self.n == self.position:
                return []  # the successor owns this segment: the all-gather ends here
            return [OutgoingFrame(self.successor, tag, self._view(a, b))]  # the same bytes
        # Reduce-scatter: the partial sum in the scratch (or a copy), ours added there, so a
        # frame holding NaN/Inf (the sum is then not finite) leaves the buffer untouched.
        acc = landed[1] if landed is not None else None
        if acc is None:
            acc = _float32_view(bytearray(frame), 0, b - a)
        acc.add_(own)
        owner = segment == self.position
        if owner:
            acc.div_(self._total)
        if not all_finite(acc):
            raise NonFiniteError(f"frame {tag}: partial sum holds NaN or Inf")
        own.copy_(acc)
        del self._pending[tag]
        self._received += 1
        next_phase = "ag" if owner else "rs"
        return [OutgoingFrame(self.successor, self.tag(next_phase, segment, j), self._view(a, b))]

    def _on_encoded(
        self, tag: str, phase: str, segment: int, j: int, frame: bytes | bytearray | memoryview
    ) -> list[OutgoingFrame]:
        a, b = self.plan.chunk(segment, j)
        chunk = unpack_frame(frame)
        # A reduce-scatter frame is checked through its sum with our finite slice (NaN/Inf
        # in the frame make the sum NaN/Inf), so the frame itself is not scanned first.
        partial = phase == "rs"
        try:
            incoming = decode(chunk, b - a, self.compression, check_finite=not partial)
        except CodecError as exc:
            raise type(exc)(f"frame {tag}: {exc.reason}") from None
        own = self.buffer[a:b]
        if not partial:
            del self._pending[tag]
            self._received += 1
            own.copy_(incoming)
            if (segment - 1) % self.n == self.position:
                return []
            return [OutgoingFrame(self.successor, tag, frame)]  # the exact bytes, unchanged
        accumulated = incoming + own
        owner = segment == self.position
        if owner:
            accumulated = accumulated / self._total
        if not all_finite(accumulated):
            raise NonFiniteError(f"frame {tag}: partial sum holds NaN or Inf")
        del self._pending[tag]
        self._received += 1
        if owner:
            encoded, final = roundtrip(accumulated, self.compression)
            own.copy_(final)
            return [OutgoingFrame(self.successor, self.tag("ag", segment, j), pack_frame(encoded))]
        data = pack_frame(encode(accumulated, self.compression))
        return [OutgoingFrame(self.successor, self.tag("rs", segment, j), data)]

    def _finalize(self, segment: int) -> None:
        for a, b in self.plan.chunks(segment):
            final = self.buffer[a:b] / self._total
            _, own = roundtrip(final, self.compression)
            self.buffer[a:b] = own

    def result_hash(self) -> str:
        """Hash of the reduced buffer's bytes; equal on every member exactly when bits are."""
        if not self.done:
            raise RingError("result_hash before the all-reduce finished")
        return parity_hash(self.buffer)


# -- working buffers ------------------------------------------------------------------------


def _workspace(given: bytearray | None, nbytes: int) -> bytearray:
    if given is None:
        return bytearray(nbytes)
    if len(given) != nbytes:
        raise RingError(f"workspace has {len(given)} bytes, the ring needs {nbytes}")
    return given


def _float32_view(raw: bytearray, start: int, count: int) -> torch.Tensor:
    """A float32 tensor over ``count`` elements of ``raw`` from element ``start`` (shared)."""
    if count == 0:
        return torch.empty(0, dtype=torch.float32)
    return torch.frombuffer(raw, dtype=torch.float32, offset=4 * start, count=count)


def _tensor_bytes_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (valid while it lives)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def _weigh_into(parts: Sequence[torch.Tensor], scale: torch.Tensor, out: torch.Tensor) -> None:
    """``out = flatten(parts) * scale`` in float32, one pass per float32 part (others are
    cast first, then weighted, as flattening then weighting would round them)."""
    offset = 0
    for t in parts:
        n = t.numel()
        flat = t.detach().reshape(-1)
        dest = out[offset : offset + n]
        if flat.dtype == torch.float32:
            torch.mul(flat, scale, out=dest)
        else:
            dest.copy_(flat)
            dest.mul_(scale)
        offset += n


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
