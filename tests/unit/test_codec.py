import math

import msgpack
import pytest
import torch

from protocols.codec import (
    ChunkHeaderError,
    ChunkSizeError,
    Compression,
    EncodedChunk,
    NonFiniteError,
    all_finite,
    decode,
    encode,
    pack_frame,
    roundtrip,
    unpack_frame,
)

LOSSY = [Compression.FP16, Compression.BF16, Compression.UINT8]


def values(n: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


def test_none_codec_roundtrips_exactly() -> None:
    x = values()
    _, back = roundtrip(x, Compression.NONE)
    assert torch.equal(back, x)


@pytest.mark.parametrize("compression", list(Compression))
def test_owner_copy_is_bit_identical_to_what_every_receiver_decodes(
    compression: Compression,
) -> None:
    x = values(777)
    chunk, owner_copy = roundtrip(x, compression)
    frame = pack_frame(chunk)
    for _ in range(3):  # three receivers decode the forwarded, unchanged bytes
        received = decode(unpack_frame(frame), x.numel(), compression)
        assert received.dtype == torch.float32
        assert received.view(torch.int32).equal(owner_copy.view(torch.int32))


@pytest.mark.parametrize(
    ("compression", "tolerance"),
    [(Compression.FP16, 1e-3), (Compression.BF16, 8e-3), (Compression.UINT8, None)],
)
def test_lossy_codecs_stay_within_their_precision(
    compression: Compression, tolerance: float | None
) -> None:
    x = values()
    _, back = roundtrip(x, compression)
    if tolerance is None:  # uint8: at most half a quantization step (plus float32 slack)
        step = float(x.max() - x.min()) / 255
        assert float((back - x).abs().max()) <= step / 2 + 1e-5
    else:
        assert float(((back - x).abs() / x.abs().clamp_min(1e-3)).max()) <= tolerance


def test_uint8_constant_chunk_decodes_exactly() -> None:
    x = torch.full((64,), 2.5)
    chunk, back = roundtrip(x, Compression.UINT8)
    assert torch.equal(back, x)
    assert chunk.header["min"] == chunk.header["max"] == 2.5


def test_uint8_header_carries_min_and_max_and_one_byte_per_value() -> None:
    x = values(100)
    chunk = encode(x, Compression.UINT8)
    assert len(chunk.payload) == 100
    assert chunk.header["min"] == float(x.min()) and chunk.header["max"] == float(x.max())


@pytest.mark.parametrize("compression", list(Compression))
def test_nan_or_inf_in_a_contribution_is_refused_on_encode(compression: Compression) -> None:
    for bad in (math.nan, math.inf, -math.inf):
        x = values(10)
        x[3] = bad
        with pytest.raises(NonFiniteError):
            encode(x, compression)


@pytest.mark.parametrize("compression", [Compression.NONE, Compression.FP16, Compression.BF16])
def test_nan_in_received_payload_is_refused(compression: Compression) -> None:
    chunk = encode(values(10), compression)
    dtype = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    poisoned = torch.full((10,), math.nan, dtype=dtype[compression.value])
    payload = bytes(poisoned.view(torch.uint8).tolist())
    with pytest.raises(NonFiniteError):
        decode(EncodedChunk(chunk.header, payload), 10, compression)


def test_uint8_header_with_nan_bounds_is_refused() -> None:
    chunk = encode(values(10), Compression.UINT8)
    for key in ("min", "max"):
        header = dict(chunk.header, **{key: math.nan})
        with pytest.raises(NonFiniteError):
            decode(EncodedChunk(header, chunk.payload), 10, Compression.UINT8)
    with pytest.raises(ChunkHeaderError):
        decode(EncodedChunk(dict(chunk.header, min="0"), chunk.payload), 10, Compression.UINT8)
    with pytest.raises(ChunkHeaderError):
        decode(
            EncodedChunk(dict(chunk.header, min=5.0, max=1.0), chunk.payload),
            10,
            Compression.UINT8,
        )


def test_fp16_overflow_is_refused_not_sent_as_inf() -> None:
    with pytest.raises(NonFiniteError, match="range"):
        encode(torch.tensor([1e6]), Compression.FP16)


def test_wrong_size_shape_codec_and_dtype_are_each_refused() -> None:
    chunk = encode(values(10), Compression.FP16)
    with pytest.raises(ChunkSizeError):
        decode(EncodedChunk(chunk.header, chunk.payload[:-2]), 10, Compression.FP16)
    with pytest.raises(ChunkHeaderError, match="shape"):
        decode(chunk, 11, Compression.FP16)
    with pytest.raises(ChunkHeaderError, match="codec"):
        decode(chunk, 10, Compression.BF16)
    with pytest.raises(ChunkHeaderError, match="dtype"):
        decode(EncodedChunk(dict(chunk.header, dtype="float32"), chunk.payload), 10, "fp16")


def test_malformed_frames_are_refused() -> None:
    with pytest.raises(ChunkHeaderError):
        unpack_frame(b"\x00")
    with pytest.raises(ChunkHeaderError):
        unpack_frame(b"\xff\xff" + b"x" * 10)
    with pytest.raises(ChunkHeaderError):
        unpack_frame(b"\x00\x03abc")
    not_a_map = msgpack.packb([1, 2])
    with pytest.raises(ChunkHeaderError):
        unpack_frame(len(not_a_map).to_bytes(2, "big") + not_a_map)


def test_encode_refuses_non_flat_or_non_float32_input() -> None:
    with pytest.raises(ChunkHeaderError):
        encode(torch.zeros(2, 2), Compression.NONE)
    with pytest.raises(ChunkHeaderError):
        encode(torch.zeros(4, dtype=torch.float64), Compression.NONE)


@pytest.mark.parametrize("compression", list(Compression))
def test_empty_chunk_roundtrips(compression: Compression) -> None:
    _, back = roundtrip(torch.empty(0), compression)
    assert back.numel() == 0


def test_all_finite_is_exact_even_when_the_sum_overflows() -> None:
    big = torch.full((10,), 3e38)
    assert all_finite(big)  # the sum overflows to inf; every value is finite
    for bad in (math.nan, math.inf, -math.inf):
        x = big.clone()
        x[7] = bad
        assert not all_finite(x)
    assert all_finite(torch.empty(0))
    mixed = torch.tensor([math.inf, -math.inf])  # sums to NaN
    assert not all_finite(mixed)


def test_a_received_bytearray_frame_is_decoded_without_copying_its_payload() -> None:
    x = torch.arange(64, dtype=torch.float32)
    frame = bytearray(pack_frame(encode(x, Compression.NONE)))  # as the bulk channel gives it
    chunk = unpack_frame(frame)
    assert isinstance(chunk.payload, memoryview) and chunk.payload.obj is frame
    values = decode(chunk, 64, Compression.NONE)
    assert torch.equal(values, x)
    # a read-only frame (bytes) still decodes, through one copy
    assert torch.equal(decode(unpack_frame(bytes(frame)), 64, Compression.NONE), x)
