"""Portable perturbation directions z(seed) for shared-seed zeroth-order training.

Every node must regenerate exactly the same z from a seed, on any CPU (whatever
``ATEN_CPU_CAPABILITY`` picks) and on CUDA. ``torch.randn`` does not give that: measured on
torch 2.13 CPU, the same seed gives different bits under ``default`` and ``avx512`` (3598 of
9241 values differ), and CPU and CUDA generators give different streams. So z here comes from a
counter-based hash computed with integer tensor ops only:

* All hash arithmetic is on 32-bit words held in int64 tensors. A 32x32-bit multiply would
  overflow int64 (signed overflow is undefined in C++), so :func:`_mul32` splits the constant
  into 16-bit halves: every intermediate stays below 2**49, and the result is masked to 32 bits.
  Shifts, xors and masks of non-negative int64 values are exact on every backend.
* The mixing function is Chris Wellons' ``lowbias32`` (a 32-bit bijection with low avalanche
  bias), applied in three keyed rounds. Keys come from blake2b of (seed, tensor name), so every
  parameter tensor has its own stream.
* Rademacher z (the default) uses one bit per element: one hash of word ``i >> 5`` gives the
  signs of 32 consecutive elements. ``theta - c*z`` is then ``theta -/+ c``, one correctly
  rounded IEEE operation, identical on any hardware whether or not the kernel fuses the
  multiply-add.
* ``SUM4`` is an approximately normal z (Irwin-Hall sum of four 16-bit uniforms, centred and
  scaled by one fp32 multiply): integer-only up to a single correctly rounded multiply, so it
  keeps parity. Its tails stop at +-3.46 sigma and its kurtosis is 2.7 instead of 3.
* ``BOX_MULLER`` is a true normal from integer uniforms, but it needs ``log``/``cos``/``sin``,
  whose vectorized kernels differ across SIMD paths (see :data:`BOX_MULLER_KEEPS_PARITY` and
  the test that measures it). It is refused where parity is required.

Element order is the row-major order of the tensor's logical shape, so the memory layout of a
parameter does not change its z.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import math
import struct
from collections.abc import Sequence

import torch

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
# Hash counters are 32-bit; SUM4 and BOX_MULLER use two counters per element, so a single
# parameter tensor may hold at most 2**31 elements here (larger tensors raise TensorTooLarge).
MAX_TENSOR_ELEMENTS = 1 << 31
_LOWBIAS32_C1 = 0x7FEB352D
_LOWBIAS32_C2 = 0x846CA68B
_TWO_PI_F32 = struct.unpack("<f", struct.pack("<f", 2.0 * math.pi))[0]
# Irwin-Hall of four uniforms on 0..65535: mean 4 * 32767.5, variance 4 * (65536**2 - 1) / 12.
_SUM4_CENTRE = 131070
_SUM4_SCALE_F32 = struct.unpack("<f", struct.pack("<f", 1.0 / math.sqrt((65536**2 - 1) / 3.0)))[0]

# Measured on torch 2.13 CPU (x86-64, AVX512 vs ATEN_CPU_CAPABILITY=avx2 and =default): BOX_MULLER
# z came out bit-identical over 3 x 100k elements, because this build's log/sin/cos give the
# same bits on every capability (randn does not: it differs between default and avx2/avx512).
# Nothing promises that across torch builds, ARM, or CUDA (libdevice logf/sinf/cosf are not
# Sleef's), so BOX_MULLER is still treated as not portable and refused where parity is required.
# tests/unit/test_zo_parity.py re-measures the CPU case; tests/bench/zo_gpu_parity.py the CUDA one.
BOX_MULLER_KEEPS_PARITY = False


class ZKind(enum.Enum):
    """Distribution of the perturbation direction z."""

    RADEMACHER = "rademacher"
    SUM4 = "sum4"
    BOX_MULLER = "box_muller"

    @property
    def keeps_parity(self) -> bool:
        """Whether z(seed) is bit-identical on every CPU capability and on CUDA."""
        if self is ZKind.BOX_MULLER:
            return BOX_MULLER_KEEPS_PARITY
        return True


class ParityNotGuaranteed(ValueError):
    """A z kind that is not bit-portable was asked for where parity is required."""


class TensorTooLarge(ValueError):
    """A tensor has more elements than the 32-bit word counter can address."""


def _u64(value: int) -> bytes:
    if not 0 <= value <= MASK64:
        raise ValueError(f"value {value} does not fit an unsigned 64-bit field")
    return value.to_bytes(8, "little")


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little") + data


def derive_seed(swarm: str, step: int, peer_id: str, sample_index: int) -> int:
    """The 64-bit seed of one SPSA sample: blake2b of (swarm, step, peer_id, sample_index).

    Fields are length-prefixed so no two different tuples share an encoding.
    """
    h = hashlib.blake2b(digest_size=8, person=b"shoal-zo-seed")
    h.update(_field(swarm.encode("utf-8")))
    h.update(_u64(step))
    h.update(_field(peer_id.encode("utf-8")))
    h.update(_u64(sample_index))
    return int.from_bytes(h.digest(), "little")


def candidate_seeds(swarm: str, run_seed: int, k: int) -> list[int]:
    """The K fixed candidate seeds of a FedKSeed run, derived from (swarm, run_seed)."""
    if k <= 0:
        raise ValueError(f"FedKSeed needs k >= 1 candidate seeds, got {k}")
    out = []
    for index in range(k):
        h = hashlib.blake2b(digest_size=8, person=b"shoal-zo-kseed")
        h.update(_field(swarm.encode("utf-8")))
        h.update(_u64(run_seed))
        h.update(_u64(index))
        out.append(int.from_bytes(h.digest(), "little"))
    return out


@functools.lru_cache(maxsize=4096)
def stream_keys(seed: int, tensor_name: str) -> tuple[int, int, int]:
    """Three 32-bit hash keys of the stream of one parameter tensor under one seed."""
    h = hashlib.blake2b(digest_size=12, person=b"shoal-zo-stream")
    h.update(_u64(seed))
    h.update(tensor_name.encode("utf-8"))
    d = h.digest()
    return (
        int.from_bytes(d[0:4], "little"),
        int.from_bytes(d[4:8], "little"),
        int.from_bytes(d[8:12], "little"),
    )


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), without any int64 overflow."""
    lo = c & 0xFFFF
    hi = c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _LOWBIAS32_C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _LOWBIAS32_C2)
    return x ^ (x >> 16)


def hash_words(counters: torch.Tensor, keys: tuple[int, int, int]) -> torch.Tensor:
    """Keyed 32-bit hash of int64 counters in [0, 2**32); returns int64 values in [0, 2**32)."""
    k0, k1, k2 = keys
    h = _lowbias32(counters ^ k0)
    h = _lowbias32(h ^ k1)
    return _lowbias32(h ^ k2)


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _bit_shifts(device: torch.device) -> torch.Tensor:
    shifts = _BIT_SHIFTS.get(device)
    if shifts is None:
        shifts = torch.arange(16, dtype=torch.int32, device=device)
        _BIT_SHIFTS[device] = shifts
    return shifts


def z_chunk(
    seed: int,
    tensor_name: str,
    start: int,
    stop: int,
    kind: ZKind = ZKind.RADEMACHER,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """fp32 z for the elements [start, stop) of the flattened tensor ``tensor_name``."""
    if not 0 <= start <= stop <= MAX_TENSOR_ELEMENTS:
        raise TensorTooLarge(
            f"element range [{start}, {stop}) is outside [0, {MAX_TENSOR_ELEMENTS})"
        )
    dev = torch.device(device)
    keys = stream_keys(seed, tensor_name)
    n = stop - start
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=dev)
    if kind is ZKind.RADEMACHER:
        first_word = start >> 5
        last_word = (stop - 1) >> 5
        words = torch.arange(first_word, last_word + 1, dtype=torch.int64, device=dev)
        h = hash_words(words, keys)
        # Unpack in two 16-bit halves held as int32 (values < 2**16, so the narrowing is exact):
        # element j of a word is bit j of its hash. int32 shifts are ~10x faster than int64.
        halves = torch.stack((h & 0xFFFF, h >> 16), dim=1).to(torch.int32)
        bits = ((halves.unsqueeze(2) >> _bit_shifts(dev)) & 1).reshape(-1)
        offset = start & 31
        bits = bits[offset : offset + n]
        # 1 - 2*bit is +1 or -1, exactly representable.
        return bits.to(torch.float32).mul_(-2.0).add_(1.0)
    idx = torch.arange(start, stop, dtype=torch.int64, device=dev)
    if kind is ZKind.SUM4:
        # Two 32-bit hashes per element give four 16-bit uniforms; their sum is exact.
        ha = hash_words(idx << 1, keys)
        hb = hash_words((idx << 1) | 1, keys)
        total = (ha & 0xFFFF) + (ha >> 16) + (hb & 0xFFFF) + (hb >> 16)
        # (total - centre) is an integer below 2**18 in magnitude: exact in fp32. One IEEE
        # multiply follows, correctly rounded on every backend.
        return (total - _SUM4_CENTRE).to(torch.float32) * _SUM4_SCALE_F32
    if kind is ZKind.BOX_MULLER:
        pair = idx >> 1
        h1 = hash_words(pair << 1, keys)
        h2 = hash_words((pair << 1) | 1, keys)
        u1 = ((h1 >> 8) + 1).to(torch.float32) * (2.0**-24)  # (0, 1]
        u2 = (h2 >> 8).to(torch.float32) * (2.0**-24)  # [0, 1)
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = u2 * _TWO_PI_F32
        odd = (idx & 1).bool()
        return torch.where(odd, radius * torch.sin(angle), radius * torch.cos(angle))
    raise ValueError(f"unknown z kind {kind!r}")


def rademacher_pieces(
    seed: int,
    pieces: Sequence[tuple[str, int, int]],
    device: torch.device | str = "cpu",
    scale: float | None = None,
) -> list[torch.Tensor]:
    """Rademacher z (or ``z * scale``, fp32) of several element ranges ``(tensor_name, start,
    stop)`` at once: the same values as one :func:`z_chunk` per piece, but hashed in one
    batch of tensor ops (the keys ride along as tensors, one per word). A model's many small
    tensors otherwise cost ~60 small op launches each per record: on the ``tiny`` model (30
    tensors) that was most of a record's apply time (64 ms a record, 22 ms batched)."""
    dev = torch.device(device)
    words, keys, spans = [], [], []
    total = 0
    for name, start, stop in pieces:
        if not 0 <= start <= stop <= MAX_TENSOR_ELEMENTS:
            raise TensorTooLarge(
                f"element range [{start}, {stop}) is outside [0, {MAX_TENSOR_ELEMENTS})"
            )
        if stop == start:
            spans.append((total, 0))
            continue
        first_word, last_word = start >> 5, (stop - 1) >> 5
        count = last_word - first_word + 1
        words.append(torch.arange(first_word, last_word + 1, dtype=torch.int64, device=dev))
        keys.append((stream_keys(seed, name), count))
        spans.append((total * 32 + (start & 31), stop - start))
        total += count
    if not words:
        return [torch.empty(0, dtype=torch.float32, device=dev) for _ in pieces]
    counts = torch.tensor([c for _, c in keys], device=dev)
    key_columns = torch.tensor([k for k, _ in keys], dtype=torch.int64, device=dev)
    k0, k1, k2 = (key_columns[:, i].repeat_interleave(counts) for i in range(3))
    h = _lowbias32(torch.cat(words) ^ k0)
    h = _lowbias32(h ^ k1)
    h = _lowbias32(h ^ k2)
    halves = torch.stack((h & 0xFFFF, h >> 16), dim=1).to(torch.int32)
    negative = ((halves.unsqueeze(2) & _bit_masks(dev)) != 0).reshape(-1)
    # Bit 1 is z = -1, bit 0 is z = +1 (as in z_chunk); z * scale for z = +-1 is exactly
    # +-fp32(scale) in IEEE arithmetic: one select, no multiply.
    s = 1.0 if scale is None else scale
    z = torch.where(negative, -s, s)
    return [z[offset : offset + n] for offset, n in spans]


_BIT_MASKS: dict[torch.device, torch.Tensor] = {}


def _bit_masks(device: torch.device) -> torch.Tensor:
    masks = _BIT_MASKS.get(device)
    if masks is None:
        masks = torch.tensor([1 << i for i in range(16)], dtype=torch.int32, device=device)
        _BIT_MASKS[device] = masks
    return masks


def z_full(
    seed: int,
    tensor_name: str,
    numel: int,
    kind: ZKind = ZKind.RADEMACHER,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The whole flattened z of one tensor (use :func:`z_chunk` to bound memory)."""
    return z_chunk(seed, tensor_name, 0, numel, kind, device)


def check_kind_allowed(kind: ZKind, parity_required: bool) -> None:
    """Raise :class:`ParityNotGuaranteed` if ``kind`` may differ across hardware."""
    if parity_required and not kind.keeps_parity:
        raise ParityNotGuaranteed(
            f"z kind {kind.value!r} uses transcendental kernels whose results differ across "
            "CPU SIMD paths and devices; use 'rademacher' or 'sum4', or set "
            "parity_required=False for a single-machine experiment"
        )
