"""The one-byte log code: error bound, sign, zero, clamping, deterministic decode."""

from __future__ import annotations

import math
import struct

import pytest
import torch

from trainer.zo_quant import InvalidCode, NonFiniteGradient, OneByteCode

CODE = OneByteCode()


def test_relative_error_is_within_3_2_percent_over_the_covered_range() -> None:
    lo, hi = math.log(CODE.smallest), math.log(CODE.largest)
    worst = 0.0
    n = 20_000
    for i in range(n + 1):
        g = math.exp(lo + (hi - lo) * i / n)
        for signed in (g, -g):
            back = CODE.decode(CODE.encode(signed))
            assert math.copysign(1.0, back) == math.copysign(1.0, signed)
            worst = max(worst, abs(back - signed) / abs(signed))
    assert worst <= CODE.max_relative_error < 0.032
    # The bound is tight: some value really comes close to e**(1/32) - 1.
    assert worst > 0.031


def test_covered_range_matches_the_documented_one() -> None:
    assert CODE.smallest == pytest.approx(math.exp(-79 / 16), rel=1e-7)
    assert CODE.largest == pytest.approx(math.exp(47 / 16), rel=1e-7)
    assert 7.1e-3 < CODE.smallest < 7.3e-3
    assert 18.8 < CODE.largest < 18.9


def test_zero_and_tiny_values_encode_to_zero_code() -> None:
    assert CODE.encode(0.0) == 0
    assert CODE.encode(-0.0) == 0
    assert CODE.decode(0) == 0.0
    assert CODE.encode(CODE.smallest * 0.49) == 0
    assert CODE.encode(CODE.smallest * 0.51) == 1
    assert CODE.encode(-CODE.smallest * 0.51) == -1


def test_large_values_saturate_at_plus_minus_127() -> None:
    assert CODE.encode(1e30) == 127
    assert CODE.encode(-1e30) == -127
    assert CODE.decode(127) == CODE.largest
    assert CODE.decode(-127) == -CODE.largest


def test_codes_are_monotonic_in_the_gradient() -> None:
    values = [CODE.decode(k) for k in range(-127, 128)]
    assert values == sorted(values)
    assert len(set(values)) == 255


def test_non_finite_gradients_and_bad_codes_raise() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(NonFiniteGradient):
            CODE.encode(bad)
    for code in (-128, 128, 1000):
        with pytest.raises(InvalidCode):
            CODE.decode(code)
    with pytest.raises(InvalidCode):
        CODE.decode(True)
    with pytest.raises(InvalidCode):
        CODE.decode_tensor(torch.tensor([0.5]))
    with pytest.raises(InvalidCode):
        CODE.decode_tensor(torch.tensor([-128]))


def test_decoded_values_are_fp32_and_the_table_digest_is_pinned() -> None:
    for k in range(-127, 128):
        v = CODE.decode(k)
        assert struct.unpack("<f", struct.pack("<f", v))[0] == v
    # Computed with decimal (software exp), so every machine gets these exact bytes.
    assert CODE.table_digest() == "b8aa8e306d26bf04a299d63e171effd5"
    assert OneByteCode().table_bytes() == CODE.table_bytes()


def test_tensor_decode_equals_scalar_decode() -> None:
    codes = torch.arange(-127, 128, dtype=torch.int8)
    got = CODE.decode_tensor(codes).tolist()
    assert got == [CODE.decode(int(c)) for c in codes]


def test_other_scales_follow_the_same_rule() -> None:
    coarse = OneByteCode(steps_per_nat=8, offset=64)
    g = 0.37
    assert abs(coarse.decode(coarse.encode(g)) - g) / g <= coarse.max_relative_error
    assert coarse.max_relative_error == pytest.approx(math.expm1(1 / 16), abs=2e-6)
    with pytest.raises(ValueError):
        OneByteCode(steps_per_nat=0)
