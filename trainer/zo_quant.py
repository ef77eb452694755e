"""One-byte logarithmic code for SPSA projected gradients ("Just One Byte").

The code is one signed byte ``b`` in -127..127 (-128 is reserved and rejected):

* ``b == 0`` means a projected gradient of exactly zero (or one below half the smallest
  magnitude, see below);
* otherwise ``sign(b)`` is the sign of g and ``k = |b|`` in 1..127 stands for the magnitude
  ``exp((k - offset) / steps_per_nat)``.

With the defaults (``steps_per_nat = 16``, ``offset = 80``) the magnitudes run from
``e**(-79/16) ~= 7.2e-3`` (k = 1) to ``e**(47/16) ~= 18.9`` (k = 127), 3.4 decades, spaced by a
factor ``e**(1/16)``. Rounding ``16 ln|g|`` to the nearest integer gives a relative error of at
most ``e**(1/32) - 1 ~= 3.17 %`` inside that range. Outside it the code saturates: larger
magnitudes decode to 18.9 (which acts as gradient clipping), magnitudes between half the
smallest step and the smallest step decode to the smallest step, and smaller ones to 0.

Decoding must give the same float on every machine, so the table is not computed with the
platform's ``exp`` (libm results may differ by an ulp between platforms): each entry is
``Decimal.exp`` at 40 significant digits (a software, correctly rounded computation), rounded
to float64 and then to fp32, once, when the code object is built.
"""

from __future__ import annotations

import decimal
import hashlib
import math
import struct
from dataclasses import dataclass, field

import torch

CODE_MIN = -127
CODE_MAX = 127


class InvalidCode(ValueError):
    """A code byte outside -127..127."""


class NonFiniteGradient(ValueError):
    """A projected gradient (or loss) that is NaN or infinite cannot be encoded."""


def _to_f32(value: float) -> float:
    """Round a Python float to the nearest fp32 value (returned as a Python float)."""
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def _decimal_table(offset: int, steps_per_nat: int) -> tuple[float, ...]:
    ctx = decimal.Context(prec=40, rounding=decimal.ROUND_HALF_EVEN)
    mags = [0.0]
    for k in range(1, CODE_MAX + 1):
        exponent = ctx.divide(decimal.Decimal(k - offset), decimal.Decimal(steps_per_nat))
        mags.append(_to_f32(float(ctx.exp(exponent))))
    return tuple(mags)


@dataclass(frozen=True)
class OneByteCode:
    """The signed one-byte log code; every node of a run must use the same parameters."""

    steps_per_nat: int = 16
    offset: int = 80
    _magnitudes: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.steps_per_nat < 1:
            raise ValueError(f"steps_per_nat must be >= 1, got {self.steps_per_nat}")
        object.__setattr__(self, "_magnitudes", _decimal_table(self.offset, self.steps_per_nat))

    @property
    def smallest(self) -> float:
        """The smallest non-zero magnitude (code +-1)."""
        return self._magnitudes[1]

    @property
    def largest(self) -> float:
        """The largest magnitude (code +-127); larger |g| saturate to it."""
        return self._magnitudes[CODE_MAX]

    @property
    def max_relative_error(self) -> float:
        """Bound on |decode(encode(g)) - g| / |g| for smallest <= |g| <= largest."""
        return math.expm1(0.5 / self.steps_per_nat) + 1e-6  # + fp32 rounding of the table

    def encode(self, g: float) -> int:
        """The code byte (as an int in -127..127) of projected gradient ``g``."""
        if not math.isfinite(g):
            raise NonFiniteGradient(f"projected gradient {g!r} is not finite; cannot encode")
        mag = abs(g)
        if mag < self.smallest / 2.0:
            return 0
        k = math.floor(self.steps_per_nat * math.log(mag) + self.offset + 0.5)
        k = min(max(k, 1), CODE_MAX)
        return k if g > 0 else -k

    def decode(self, code: int) -> float:
        """The fp32 value (as a Python float) that ``code`` stands for; same bits everywhere."""
        if not isinstance(code, int) or isinstance(code, bool) or not CODE_MIN <= code <= CODE_MAX:
            raise InvalidCode(f"code byte must be an int in {CODE_MIN}..{CODE_MAX}, got {code!r}")
        mag = self._magnitudes[abs(code)]
        return -mag if code < 0 else mag

    def decode_tensor(self, codes: torch.Tensor) -> torch.Tensor:
        """Vectorized decode of an integer tensor of codes to fp32."""
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise InvalidCode(f"codes must be an integer tensor, got dtype {codes.dtype}")
        c = codes.to(torch.int64)
        if c.numel() and (int(c.min()) < CODE_MIN or int(c.max()) > CODE_MAX):
            raise InvalidCode(f"codes must lie in {CODE_MIN}..{CODE_MAX}")
        table = torch.tensor(self._magnitudes, dtype=torch.float32, device=c.device)
        mags = table[c.abs()]
        return torch.where(c < 0, -mags, mags)

    def table_bytes(self) -> bytes:
        """The 128 fp32 magnitudes (code 0..127) as little-endian bytes."""
        return struct.pack("<128f", *self._magnitudes)

    def table_digest(self) -> str:
        """blake2b-128 hex digest of :meth:`table_bytes`; equal on every machine."""
        return hashlib.blake2b(self.table_bytes(), digest_size=16).hexdigest()
