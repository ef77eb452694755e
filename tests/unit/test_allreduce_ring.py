import itertools
import math
from collections import deque
from collections.abc import Callable

import pytest
import torch

from protocols.codec import (
    CodecError,
    Compression,
    NonFiniteError,
    hash_tensor,
    parity_hash,
)
from protocols.ring import (
    RingError,
    RingReduction,
    flatten,
    order_ring,
    plan_ring,
    ring_cost,
    unflatten_into,
)


def run_ring(
    inputs: dict[str, torch.Tensor],
    weights: dict[str, float],
    compression: Compression = Compression.NONE,
    chunk_elems: int = 5,
    ring: list[str] | None = None,
    ahead: int = 0,
    scratch_counts: list[int] | None = None,
) -> dict[str, RingReduction]:
    """Deliver every frame, each link FIFO, checking each arrives in ``expected()`` order.

    With ``ahead``, each member posts up to that many receives before their frames are used,
    each into the frame's ``landing``, as the driver does (members work on a copy of their
    input then); ``scratch_counts`` gets the scratch buffers each member holds at each turn."""
    order = ring or sorted(inputs)
    total = next(iter(inputs.values())).numel()
    plan = plan_ring(order, total, chunk_elems)
    members = {
        p: RingReduction(plan, p, [inputs[p]], weights, compression, "r0.a1", copy=True)
        if ahead
        else RingReduction(plan, p, inputs[p].clone(), weights, compression, "r0.a1")
        for p in order
    }
    links: dict[str, deque] = {p: deque() for p in order}  # keyed by receiver
    expected = {p: deque(m.expected()) for p, m in members.items()}
    posted: dict[str, deque] = {p: deque() for p in order}

    def post(p: str) -> None:
        while ahead and expected[p] and len(posted[p]) < ahead:
            sender, tag = expected[p].popleft()
            posted[p].append((sender, tag, members[p].landing(tag)))

    for p in order:
        links[members[p].successor].extend(members[p].start())
    progress = True
    while progress:
        progress = False
        for p in order:
            m = members[p]
            post(p)
            if scratch_counts is not None:
                scratch_counts.append(sum(1 for _, s in m._landings.values() if s is not None))
            while links[p]:
                frame = links[p].popleft()
                data = frame.data
                if ahead:
                    sender, tag, view = posted[p].popleft()
                    assert view is not None
                    view[:] = bytes(frame.data)  # the transport lands the bytes
                    data = view
                    post(p)
                else:
                    sender, tag = expected[p].popleft()
                assert (sender, tag) == (m.predecessor, frame.tag)
                links[m.successor].extend(m.on_frame(frame.tag, data))
                progress = True
    assert all(m.done for m in members.values())
    return members


def make_inputs(n: int, total: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"peer{i}": torch.randn(total, generator=g) for i in range(n)}


def ring_order_reference(
    inputs: dict[str, torch.Tensor], weights: dict[str, float], order: list[str], chunk: int
) -> torch.Tensor:
    """The documented float32 order: segment s sums from position s+1 around to s."""
    n = len(order)
    total = next(iter(inputs.values())).numel()
    plan = plan_ring(order, total, chunk)
    w_total = torch.tensor(math.fsum(weights.values()), dtype=torch.float32)
    out = torch.empty(total)
    for s, (a, b) in enumerate(plan.segments):
        acc = None
        for k in range(1, n + 1):
            p = order[(s + k) % n]
            term = inputs[p][a:b] * torch.tensor(weights[p], dtype=torch.float32)
            acc = term if acc is None else acc + term
        assert acc is not None
        out[a:b] = acc / w_total
    return out


@pytest.mark.parametrize("n", range(2, 9))
@pytest.mark.parametrize("total", [1, 7, 61, 1000])
def test_weighted_mean_equals_reference_bit_for_bit(n: int, total: int) -> None:
    inputs = make_inputs(n, total, seed=n * 1000 + total)
    weights = {p: float(i + 1) * 0.75 for i, p in enumerate(sorted(inputs))}
    members = run_ring(inputs, weights, chunk_elems=4)
    reference = ring_order_reference(inputs, weights, sorted(inputs), 4)
    for member in members.values():
        assert member.buffer.view(torch.int32).equal(reference.view(torch.int32))
    exact = sum(weights[p] * inputs[p].double() for p in inputs) / sum(weights.values())
    assert torch.allclose(members["peer0"].buffer.double(), exact, atol=1e-5)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_integer_inputs_give_the_exact_weighted_mean_in_any_ring_order(n: int) -> None:
    total = 103
    g = torch.Generator().manual_seed(n)
    inputs = {f"p{i}": torch.randint(-50, 50, (total,), generator=g).float() for i in range(n)}
    weights = {p: float(i % 3 + 1) for i, p in enumerate(sorted(inputs))}
    order = sorted(inputs, reverse=True)
    members = run_ring(inputs, weights, ring=order)
    numerator = sum(weights[p] * inputs[p].double() for p in inputs).float()  # exact here
    expected = numerator / torch.tensor(sum(weights.values()), dtype=torch.float32)
    for member in members.values():
        assert torch.equal(member.buffer, expected)


@pytest.mark.parametrize("compression", list(Compression))
@pytest.mark.parametrize("n", [2, 3, 4, 7, 8])
def test_result_is_bit_identical_on_every_member_for_every_codec(
    n: int, compression: Compression
) -> None:
    inputs = make_inputs(n, 211, seed=n)
    weights = {p: float(i + 1) for i, p in enumerate(sorted(inputs))}
    members = run_ring(inputs, weights, compression, chunk_elems=16)
    hashes = {m.result_hash() for m in members.values()}
    assert len(hashes) == 1
    first = members["peer0"].buffer
    for member in members.values():
        assert member.buffer.view(torch.int32).equal(first.view(torch.int32))
    exact = sum(weights[p] * inputs[p].double() for p in inputs) / sum(weights.values())
    # Lossy codecs quantize the partial sums on every hop; the mean stays close.
    tolerance = {"none": 1e-5, "fp16": 1e-2, "bf16": 6e-2, "uint8": 0.1}[compression.value]
    assert float((first.double() - exact).abs().max()) < tolerance


def test_buffer_shorter_than_ring_leaves_empty_segments_and_still_finishes() -> None:
    inputs = make_inputs(5, 3)
    members = run_ring(inputs, {p: 1.0 for p in inputs})
    exact = sum(inputs.values()) / 5
    assert torch.allclose(members["peer4"].buffer, exact, atol=1e-6)


def test_zero_weight_member_contributes_nothing() -> None:
    inputs = make_inputs(3, 20)
    weights = {"peer0": 1.0, "peer1": 0.0, "peer2": 3.0}
    members = run_ring(inputs, weights)
    expected = (inputs["peer0"] + 3 * inputs["peer2"]) / 4
    assert torch.allclose(members["peer1"].buffer, expected, atol=1e-6)


def test_single_member_ring_returns_its_own_input() -> None:
    x = torch.randn(10)
    member = RingReduction(plan_ring(["a"], 10, 3), "a", x.clone(), {"a": 2.0}, "none", "t")
    assert member.start() == [] and member.done
    assert torch.allclose(member.buffer, x)


def _two_member_ring() -> tuple[RingReduction, RingReduction]:
    plan = plan_ring(["a", "b"], 8, 4)
    weights = {"a": 1.0, "b": 1.0}
    return (
        RingReduction(plan, "a", torch.ones(8), weights, "none", "t"),
        RingReduction(plan, "b", torch.ones(8), weights, "none", "t"),
    )


def test_unexpected_repeated_and_corrupt_frames_are_refused_without_touching_the_buffer() -> None:
    a, b = _two_member_ring()
    frame = a.start()[0]
    before = b.buffer.clone()
    with pytest.raises(RingError):
        b.on_frame("t.rs.s9.c0", frame.data)
    with pytest.raises(CodecError):
        b.on_frame(frame.tag, frame.data[:-1])
    nan_frame = bytes(frame.data)[:-4] + b"\x00\x00\xc0\x7f"  # last float32 becomes NaN
    with pytest.raises(NonFiniteError):
        b.on_frame(frame.tag, nan_frame)
    assert torch.equal(b.buffer, before)
    b.on_frame(frame.tag, frame.data)
    with pytest.raises(RingError, match="repeated"):
        b.on_frame(frame.tag, frame.data)


def test_a_partial_sum_that_overflows_is_refused_without_touching_the_buffer() -> None:
    plan = plan_ring(["a", "b"], 4, 4)
    weights = {"a": 1.0, "b": 1.0}
    big = torch.full((4,), 3e38)
    a = RingReduction(plan, "a", big.clone(), weights, "none", "t")
    b = RingReduction(plan, "b", big.clone(), weights, "none", "t")
    before = b.buffer.clone()
    frame = a.start()[0]
    with pytest.raises(NonFiniteError, match="partial sum"):
        b.on_frame(frame.tag, frame.data)
    assert torch.equal(b.buffer, before)


def test_an_input_that_overflows_when_weighted_is_refused() -> None:
    plan = plan_ring(["a", "b"], 2, 2)
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        RingReduction(plan, "a", torch.full((2,), 3e38), {"a": 4.0, "b": 1.0}, "none", "t")


def test_bad_arguments_are_refused() -> None:
    plan = plan_ring(["a", "b"], 4, 2)
    with pytest.raises(RingError):
        RingReduction(plan, "c", torch.zeros(4), {"a": 1.0, "b": 1.0}, "none", "t")
    with pytest.raises(RingError):
        RingReduction(plan, "a", torch.zeros(5), {"a": 1.0, "b": 1.0}, "none", "t")
    with pytest.raises(RingError):
        RingReduction(plan, "a", torch.zeros(4), {"a": 0.0, "b": 0.0}, "none", "t")
    with pytest.raises(RingError):
        RingReduction(plan, "a", torch.zeros(4), {"a": math.nan, "b": 1.0}, "none", "t")
    with pytest.raises(NonFiniteError):
        RingReduction(plan, "a", torch.tensor([0, 1, math.inf, 0]), {"a": 1, "b": 1}, "none", "t")
    with pytest.raises(RingError):
        plan_ring(["a", "a"], 4, 2)


@pytest.mark.parametrize("digest", [hash_tensor, parity_hash])
def test_tensor_hashes_cover_bytes_dtype_and_shape(digest: Callable[[torch.Tensor], str]) -> None:
    x = torch.arange(4.0)
    assert digest(x) == digest(x.clone())
    assert digest(x) != digest(x.reshape(2, 2))
    assert digest(x) != digest(x.double())
    y = x.clone()
    y[0] = -0.0  # same value, different bits
    assert digest(x) != digest(y)
    assert digest(x[::2]) == digest(x[::2].contiguous())
    assert len(digest(x)) == 32


def test_flatten_and_unflatten_roundtrip_mixed_shapes() -> None:
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2, 2)]
    flat = flatten(tensors)
    assert flat.shape == (12 + 5 + 8,)
    targets = [torch.zeros_like(t) for t in tensors]
    unflatten_into(flat, targets)
    assert all(torch.equal(a, b) for a, b in zip(tensors, targets, strict=True))
    with pytest.raises(RingError):
        unflatten_into(flat[:-1], targets)


def _random_costs(peers: list[str], seed: int) -> dict[tuple[str, str], float]:
    g = torch.Generator().manual_seed(seed)
    return {(a, b): float(torch.rand(1, generator=g)) for a in peers for b in peers if a != b}


@pytest.mark.parametrize("n", [3, 4, 5, 6])
def test_exact_ring_order_is_the_optimum_of_all_rings(n: int) -> None:
    peers = [f"p{i}" for i in range(n)]
    costs = _random_costs(peers, n)
    chosen = order_ring(peers, costs)
    best = min(ring_cost((peers[0], *perm), costs) for perm in itertools.permutations(peers[1:]))
    assert ring_cost(chosen, costs) == best
    assert sorted(chosen) == peers and chosen[0] == "p0"
    assert order_ring(list(reversed(peers)), costs) == chosen  # deterministic


def test_ring_avoids_a_slow_link_when_it_can() -> None:
    peers = ["a", "b", "c", "d"]
    costs = {(x, y): 1.0 for x in peers for y in peers if x != y}
    costs[("a", "b")] = 100.0  # a slow link a -> b
    ring = order_ring(peers, costs)
    links = {(ring[i], ring[(i + 1) % 4]) for i in range(4)}
    assert ("a", "b") not in links


def test_greedy_ring_for_many_peers_is_a_valid_deterministic_ring() -> None:
    peers = [f"p{i:02d}" for i in range(12)]
    costs = _random_costs(peers, 7)
    ring = order_ring(peers, costs)
    assert sorted(ring) == peers and ring[0] == "p00"
    assert order_ring(peers[::-1], costs) == ring
    # Not worse than the plain sorted ring.
    assert ring_cost(ring, costs) <= ring_cost(tuple(peers), costs)


def test_without_measurements_the_ring_is_sorted_by_peer_id() -> None:
    assert order_ring(["c", "a", "b", "d"], {}) == ("a", "b", "c", "d")


def test_an_uncompressed_frame_is_the_raw_float32_bytes_of_the_weighted_slice() -> None:
    plan = plan_ring(["a", "b"], 6, 4)
    x = torch.arange(6, dtype=torch.float32)
    a = RingReduction(plan, "a", x.clone(), {"a": 2.0, "b": 1.0}, "none", "t")
    frames = a.start()
    (a0, b0), *_ = plan.chunks(1)
    assert [f.tag for f in frames] == ["t.rs.s1.c0"]
    assert bytes(frames[0].data) == (x[a0:b0] * 2).numpy().tobytes()


def test_frames_received_into_their_landing_give_the_same_bits_with_bounded_scratch() -> None:
    inputs = make_inputs(4, 103)
    weights = {"peer0": 1.0, "peer1": 2.5, "peer2": 0.5, "peer3": 3.0}
    reference = run_ring(inputs, weights, chunk_elems=7)
    scratch_counts: list[int] = []
    landed = run_ring(inputs, weights, chunk_elems=7, ahead=3, scratch_counts=scratch_counts)
    most_scratch = max(scratch_counts)
    for p in inputs:
        assert torch.equal(landed[p].buffer, reference[p].buffer)
        assert landed[p].result_hash() == reference[p].result_hash()
    assert 1 <= most_scratch <= 3


def test_a_sequence_input_is_weighted_as_its_flattened_float32_copy() -> None:
    plan = plan_ring(["a", "b"], 7, 3)
    parts = [torch.randn(2, 2).to(torch.bfloat16), torch.randn(3)]
    weights = {"a": 0.3, "b": 1.0}
    from_parts = RingReduction(plan, "a", parts, weights, "none", "t", copy=True)
    from_flat = RingReduction(plan, "a", flatten(parts), weights, "none", "t")
    assert torch.equal(from_parts.buffer, from_flat.buffer)
    assert parts[0].dtype == torch.bfloat16 and parts[1].numel() == 3  # inputs untouched
    with pytest.raises(RingError, match="copy=True"):
        RingReduction(plan, "a", parts, weights, "none", "t")
    with pytest.raises(RingError, match="workspace"):
        RingReduction(plan, "a", parts, weights, "none", "t", copy=True, workspace=bytearray(4))
