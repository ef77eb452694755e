"""The portable z generator: exact integer hash, chunking, streams, pinned outputs."""

from __future__ import annotations

import hashlib
import itertools

import pytest
import torch

from trainer.zo import _raw_bytes
from trainer.zo_rng import (
    MASK32,
    ParityNotGuaranteed,
    TensorTooLarge,
    ZKind,
    candidate_seeds,
    check_kind_allowed,
    derive_seed,
    hash_words,
    stream_keys,
    z_chunk,
    z_full,
)


def _lowbias32_reference(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def _hash_reference(counter: int, keys: tuple[int, int, int]) -> int:
    h = _lowbias32_reference(counter ^ keys[0])
    h = _lowbias32_reference(h ^ keys[1])
    return _lowbias32_reference(h ^ keys[2])


def test_tensor_hash_equals_pure_python_32bit_arithmetic() -> None:
    keys = stream_keys(123456789, "block.0.weight")
    counters = [0, 1, 2, 31, 32, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]
    counters += [(i * 2654435761) & MASK32 for i in range(500)]
    got = hash_words(torch.tensor(counters, dtype=torch.int64), keys).tolist()
    assert got == [_hash_reference(c, keys) for c in counters]


def test_rademacher_signs_are_the_bits_of_the_word_hash() -> None:
    seed, name = 99, "w"
    keys = stream_keys(seed, name)
    z = z_full(seed, name, 100).tolist()
    for i, value in enumerate(z):
        bit = (_hash_reference(i >> 5, keys) >> (i & 31)) & 1
        assert value == (-1.0 if bit else 1.0)


@pytest.mark.parametrize("kind", [ZKind.RADEMACHER, ZKind.SUM4, ZKind.BOX_MULLER])
def test_chunks_at_any_boundary_concatenate_to_the_full_z(kind: ZKind) -> None:
    n = 1000
    full = z_full(5, "p", n, kind)
    for bounds in ([0, 1, 33, 64, 999, 1000], [0, 31, 32, 500, 1000], [0, 7, 1000]):
        parts = [z_chunk(5, "p", a, b, kind) for a, b in itertools.pairwise(bounds)]
        assert torch.equal(torch.cat(parts), full)


def test_z_depends_on_seed_and_tensor_name() -> None:
    a = z_full(1, "w", 4096)
    assert not torch.equal(a, z_full(2, "w", 4096))
    assert not torch.equal(a, z_full(1, "v", 4096))
    assert torch.equal(a, z_full(1, "w", 4096))


@pytest.mark.parametrize("kind", [ZKind.RADEMACHER, ZKind.SUM4, ZKind.BOX_MULLER])
def test_z_has_zero_mean_unit_variance_and_independent_streams(kind: ZKind) -> None:
    n = 200_000
    a = z_full(11, "x", n, kind).double()
    b = z_full(12, "x", n, kind).double()
    # Standard error of the mean and of the correlation is 1/sqrt(n) ~= 0.0022.
    assert abs(a.mean().item()) < 0.012
    assert abs(a.var().item() - 1.0) < 0.02
    assert abs((a * b).mean().item()) < 0.012
    # Neighbouring elements are uncorrelated too.
    assert abs((a[1:] * a[:-1]).mean().item()) < 0.012


def test_sum4_is_bounded_and_rademacher_is_plus_minus_one() -> None:
    s = z_full(3, "x", 100_000, ZKind.SUM4)
    assert s.abs().max().item() <= 3.4642
    r = z_full(3, "x", 100_000)
    assert set(r.unique().tolist()) == {-1.0, 1.0}


def test_pinned_outputs_do_not_change() -> None:
    # Nodes of different versions must regenerate the same z: a change here is a wire break.
    assert derive_seed("shoal-test", 3, "12D3KooWpeer", 1) == 17017893094486089339
    assert candidate_seeds("shoal-test", 9, 3) == [
        9797946887236885529,
        16391912774961894950,
        14439544990943614378,
    ]
    assert z_full(42, "w", 8).tolist() == [-1.0, -1.0, 1.0, -1.0, -1.0, 1.0, 1.0, 1.0]
    digest = hashlib.sha256(_raw_bytes(z_full(42, "w", 1000))).hexdigest()
    assert digest == "1f45b5e6408cf5cf6daf6809f1f3b98b6aadfc897608039531ab59f06abba091"
    digest = hashlib.sha256(_raw_bytes(z_full(42, "w", 1000, ZKind.SUM4))).hexdigest()
    assert digest == "fc8ae38b067b0509dda06f8c7067521f37a5e05edfab13c8df66b25049e22fd8"


def test_derive_seed_separates_fields() -> None:
    base = derive_seed("s", 1, "p", 0)
    assert base != derive_seed("s", 2, "p", 0)
    assert base != derive_seed("s", 1, "q", 0)
    assert base != derive_seed("s", 1, "p", 1)
    assert base != derive_seed("t", 1, "p", 0)
    # Length prefixes: moving a character between swarm and peer_id changes the seed.
    assert derive_seed("ab", 1, "c", 0) != derive_seed("a", 1, "bc", 0)
    with pytest.raises(ValueError):
        derive_seed("s", -1, "p", 0)


def test_box_muller_is_refused_where_parity_is_required() -> None:
    with pytest.raises(ParityNotGuaranteed):
        check_kind_allowed(ZKind.BOX_MULLER, parity_required=True)
    check_kind_allowed(ZKind.BOX_MULLER, parity_required=False)
    check_kind_allowed(ZKind.SUM4, parity_required=True)


def test_out_of_range_element_indices_raise() -> None:
    with pytest.raises(TensorTooLarge):
        z_chunk(1, "w", 0, 2**31 + 1)
    with pytest.raises(TensorTooLarge):
        z_chunk(1, "w", 10, 5)
