import pytest
import torch

from protocols.shared_state import (
    HashMismatchError,
    SharedState,
    SharedStateError,
    StateSummary,
    plan_sync,
)


def make_state(revision: int = 3, **overrides: torch.Tensor) -> SharedState:
    tensors = {
        "embed": torch.arange(12.0).reshape(3, 4),
        "head": torch.ones(5),
        "momentum": torch.zeros(7, dtype=torch.float64),
    }
    tensors.update(overrides)
    return SharedState(tensors, revision)


def test_most_popular_state_wins_and_a_healthy_member_fetches_nothing() -> None:
    good = make_state().summary()
    odd = make_state(head=torch.full((5,), 2.0)).summary()
    plan = plan_sync({"a": good, "b": good, "c": odd})
    assert plan.winner == good and plan.holders == ("a", "b")
    assert plan.for_member("a") is None and plan.for_member("b") is None
    order = plan.for_member("c")
    assert order is not None and order.names == ("head",)  # only what differs
    assert order.donor in ("a", "b") and order.expected == {"head": good.hashes["head"]}


def test_ties_break_to_the_higher_revision_then_deterministically() -> None:
    old = make_state(revision=3).summary()
    new = make_state(revision=4, head=torch.zeros(5)).summary()
    plan = plan_sync({"a": old, "b": new})
    assert plan.winner == new
    assert plan_sync({"b": new, "a": old}).winner == new
    x = make_state(revision=4, head=torch.full((5,), 7.0)).summary()
    assert plan_sync({"a": x, "b": new}).winner == plan_sync({"b": new, "a": x}).winner


def test_newcomer_fetches_everything_and_does_not_vote() -> None:
    good = make_state().summary()
    plan = plan_sync({"a": good, "new": None})
    order = plan.for_member("new")
    assert order is not None and set(order.names) == {"embed", "head", "momentum"}
    assert order.donor == "a" and order.revision == 3


def test_fetchers_are_spread_over_donors() -> None:
    good = make_state().summary()
    plan = plan_sync({"a": good, "b": good, "x": None, "y": None})
    donors = {plan.fetches["x"].donor, plan.fetches["y"].donor}
    assert donors == {"a", "b"}


def test_member_that_lacks_a_tensor_fetches_it() -> None:
    full = make_state()
    partial = make_state()
    del partial.tensors["momentum"]
    plan = plan_sync({"a": full.summary(), "b": full.summary(), "c": partial.summary()})
    order = plan.for_member("c")
    assert order is not None and order.names == ("momentum",)


def test_fetch_and_install_makes_the_member_identical_and_counts_bytes() -> None:
    donor = make_state(revision=9)
    fetcher = SharedState({"head": torch.zeros(5)}, revision=2)
    plan = plan_sync({"d": donor.summary(), "f": fetcher.summary(), "e": donor.summary()})
    order = plan.for_member("f")
    assert order is not None
    fetcher.install(order, {name: donor.export(name) for name in order.names})
    assert fetcher.summary() == donor.summary()
    assert fetcher.bytes_fetched == 12 * 4 + 5 * 4 + 7 * 8
    again = plan_sync({"d": donor.summary(), "f": fetcher.summary()})
    assert again.for_member("f") is None  # after the first sync a healthy member gets 0 bytes


def test_fetched_tensor_with_a_wrong_hash_is_rejected_and_nothing_changes() -> None:
    donor = make_state()
    fetcher = SharedState({}, revision=0)
    order = plan_sync({"d": donor.summary(), "f": None}).for_member("f")
    assert order is not None
    fetched = {name: donor.export(name) for name in order.names}
    header, payload = fetched["head"]
    fetched["head"] = (header, payload[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(HashMismatchError, match="head"):
        fetcher.install(order, fetched)
    assert fetcher.tensors == {} and fetcher.revision == 0


def test_malformed_fetched_tensors_are_rejected() -> None:
    donor = make_state()
    fetcher = SharedState()
    order = plan_sync({"d": donor.summary(), "f": None}).for_member("f")
    assert order is not None
    good = {name: donor.export(name) for name in order.names}
    header, payload = good["head"]
    cases = [
        {**good, "head": ({**header, "dtype": "complex128"}, payload)},
        {**good, "head": ({**header, "shape": [6]}, payload)},
        {**good, "head": ({**header, "name": "embed"}, payload)},
        {**good, "head": ({**header, "shape": "5"}, payload)},
        {k: v for k, v in good.items() if k != "head"},
    ]
    for fetched in cases:
        with pytest.raises(SharedStateError):
            fetcher.install(order, fetched)
    assert fetcher.tensors == {}


def test_summary_wire_roundtrip_and_validation() -> None:
    summary = make_state().summary()
    assert StateSummary.from_wire(summary.to_wire()) == summary
    for bad in (
        [],
        {"revision": -1, "hashes": {}},
        {"revision": True, "hashes": {}},
        {"revision": 1, "hashes": {"x": "short"}},
        {"revision": 1, "hashes": {"": "0" * 32}},
        {"revision": 1, "hashes": {f"t{i}": "0" * 32 for i in range(5000)}},
    ):
        with pytest.raises(SharedStateError):
            StateSummary.from_wire(bad)


def test_revision_must_go_up_by_exactly_one() -> None:
    state = make_state(revision=3)
    state.update({"head": torch.zeros(5)}, 4)
    with pytest.raises(SharedStateError):
        state.update({"head": torch.ones(5)}, 6)
    assert state.revision == 4


def test_nobody_with_state_is_an_error() -> None:
    with pytest.raises(SharedStateError):
        plan_sync({"a": None, "b": None})
