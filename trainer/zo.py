"""Shared-seed zeroth-order training (SPSA as in MeZO, one-byte gradients, FedKSeed).

A node estimates the loss at ``theta + eps*z`` and ``theta - eps*z`` for a direction
``z(seed)`` and publishes only a :class:`SeedRecord`: (step, peer_id, sample_index, one code
byte). Every node regenerates z from the seed (:mod:`trainer.zo_rng`, integer-only, so the same
on every CPU and on CUDA) and applies the same records in the same order, so replicas stay
bit-identical. Measured pitfalls this module is built around (torch 2.13 CPU):

* perturb/restore in place (+eps, -2eps, +eps) is not exact (46 % of fp32 params change), so
  :func:`spsa_projected_gradient` keeps a saved copy and restores from it with ``copy_``;
* applying the same updates in another order changes 37 % of fp32 params, so
  :func:`apply_step` sorts records by (peer_id, sample_index) before applying them;
* the update scalar is one fp32 value ``c = fp32(fp32(lr) * decode(code))`` computed with one
  IEEE multiply, and the update is two separate kernels, ``t = z * c`` then ``theta -= t``, so
  no backend can fuse them into an FMA with a different rounding. With Rademacher z, ``t`` is
  exactly ``+-c`` and ``theta - t`` is one correctly rounded subtraction everywhere.

Records with code 0 (or whose ``c`` rounds to 0) are no-ops by definition: subtracting a zero
would turn ``-0.0`` weights into ``+0.0`` on some nodes' code paths and not others'.

The caller's model must not be read by another thread while :meth:`ZOTrainer.produce_records`
runs: the live weights hold the perturbed values during the two loss evaluations.
"""

from __future__ import annotations

import bisect
import ctypes
import hashlib
import itertools
import math
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch
from torch import nn

from trainer.zo_quant import CODE_MAX, CODE_MIN, NonFiniteGradient, OneByteCode
from trainer.zo_rng import (
    MAX_TENSOR_ELEMENTS,
    TensorTooLarge,
    ZKind,
    candidate_seeds,
    check_kind_allowed,
    derive_seed,
    rademacher_pieces,
    z_chunk,
)

NamedParams: TypeAlias = list[tuple[str, torch.Tensor]]
ParamsLike: TypeAlias = nn.Module | Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]]
LossFn: TypeAlias = Callable[[nn.Module, Any], torch.Tensor]
StepRecords: TypeAlias = tuple[int, Sequence["SeedRecord"]]

__all__ = [
    "InvalidRecord",
    "KSeedState",
    "RecordLogError",
    "SeedRecord",
    "StepOutOfOrder",
    "ZOSettings",
    "ZOStepMetrics",
    "ZOTrainer",
    "apply_records_in_order",
    "apply_step",
    "clone_params",
    "decode_record_log",
    "encode_record_log",
    "named_params",
    "rebuild_from_scalars",
    "replay",
    "spsa_projected_gradient",
    "state_bytes",
    "state_hash",
    "step_log_bytes",
    "subtract_scaled_z",
    "update_scalar",
    "validate_step_records",
]


class InvalidRecord(ValueError):
    """A seed record that cannot be applied (wrong step, bad code, duplicate, bad seed index)."""


class StepOutOfOrder(ValueError):
    """Records for a step other than the one the trainer is at."""


class RecordLogError(ValueError):
    """A serialized record log that is malformed or over a size limit."""


@dataclass(frozen=True)
class ZOSettings:
    """Settings every node of one ZO run must share (except the local-only limits)."""

    swarm: str
    lr: float = 1e-4
    eps: float = 1e-3
    z_kind: ZKind = ZKind.RADEMACHER
    # Refuse z kinds whose bits may differ across hardware (see zo_rng.ZKind.keeps_parity).
    parity_required: bool = True
    code: OneByteCode = field(default_factory=OneByteCode)
    # Local only (results do not depend on it): elements of z generated at once per parameter
    # tensor, which bounds scratch memory (about 12 bytes per element for Rademacher, ~60 for
    # SUM4/BOX_MULLER). Must be a multiple of 32 (one hash word of Rademacher signs).
    chunk_elements: int = 1 << 20
    # FedKSeed: 0 = off (seed from (swarm, step, peer_id, sample_index)); K > 0 = records
    # choose one of K candidate seeds derived from (swarm, run_seed).
    fedkseed_k: int = 0
    run_seed: int = 0
    # FedKSeed: sample seed indices with probability ~ |accumulated scalar| + mean (else uniform).
    weighted_seed_sampling: bool = False
    # FedKSeed: every R steps (after step t with (t + 1) % R == 0) the canonical state is
    # re-based to theta_0 - sum_k fp32(A_k) z_k, so a joiner needs only theta_0, the K scalars
    # at the last rebase, and the records since. 0 = never (step-by-step throughout). A rebase
    # costs K passes of z over the model on every node.
    fedkseed_rebase_steps: int = 0
    max_records_per_step: int = 65536
    max_log_bytes: int = 256 << 20
    max_peer_id_bytes: int = 255

    def __post_init__(self) -> None:
        check_kind_allowed(self.z_kind, self.parity_required)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite float, got {self.lr!r}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a positive finite float, got {self.eps!r}")
        if self.chunk_elements < 32 or self.chunk_elements % 32:
            raise ValueError(
                f"chunk_elements must be a positive multiple of 32, got {self.chunk_elements}"
            )
        if self.fedkseed_k < 0:
            raise ValueError(f"fedkseed_k must be >= 0, got {self.fedkseed_k}")
        if self.fedkseed_rebase_steps < 0 or (self.fedkseed_rebase_steps and not self.fedkseed_k):
            raise ValueError("fedkseed_rebase_steps must be >= 0 and needs fedkseed_k > 0")

    def is_rebase_step(self, step: int) -> bool:
        """Whether the state after ``step`` is re-based from theta_0 and the K scalars."""
        r = self.fedkseed_rebase_steps
        return bool(self.fedkseed_k and r and (step + 1) % r == 0)


@dataclass(frozen=True)
class SeedRecord:
    """One SPSA sample's contribution: the update ``-lr * decode(code) * z(seed)``.

    ``seed_index`` is set only in FedKSeed mode (index among the K candidate seeds).
    """

    step: int
    peer_id: str
    sample_index: int
    code: int
    seed_index: int | None = None

    @property
    def order_key(self) -> tuple[bytes, int]:
        """Canonical apply order: peer_id (UTF-8 bytes), then sample_index."""
        return (self.peer_id.encode("utf-8"), self.sample_index)


@dataclass(frozen=True)
class ZOStepMetrics:
    """What one applied step did on this node."""

    step: int
    records_applied: int
    records_skipped_zero: int
    step_log_bytes: int  # bytes this step adds to a record log (see step_log_bytes())
    own_records: int = 0
    loss: float | None = None


# ----------------------------------------------------------------------------- parameters


def named_params(params: ParamsLike) -> NamedParams:
    """(name, tensor) pairs sorted by name: the order of hashing and of z streams.

    For a module, only parameters with ``requires_grad`` are trained (tied weights appear once).
    """
    pairs: NamedParams
    if isinstance(params, nn.Module):
        pairs = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
    elif isinstance(params, Mapping):
        pairs = list(params.items())
    else:
        pairs = list(params)
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError("parameter names must be unique")
    for name, tensor in pairs:
        if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
            raise TypeError(f"parameter {name!r} must be a floating-point tensor")
        if tensor.numel() > MAX_TENSOR_ELEMENTS:
            raise TensorTooLarge(
                f"parameter {name!r} has {tensor.numel()} elements; at most "
                f"{MAX_TENSOR_ELEMENTS} per tensor are supported"
            )
    return sorted(pairs, key=lambda item: item[0].encode("utf-8"))


def state_hash(params: ParamsLike) -> str:
    """blake2b-256 hex digest of names, dtypes, shapes and raw bytes, in name order.

    Raw bytes are the little-endian memory of each tensor in row-major order.
    """
    if sys.byteorder != "little":
        raise RuntimeError("state_hash assumes a little-endian host")
    h = hashlib.blake2b(digest_size=32, person=b"shoal-zo-state")
    for name, tensor in named_params(params):
        t = tensor.detach().to("cpu").contiguous()
        header = f"{name}\x00{t.dtype}\x00{tuple(t.shape)}\x00".encode()
        h.update(len(header).to_bytes(4, "little") + header)
        if t.numel():
            h.update(_raw_bytes(t))
    return h.hexdigest()


def _raw_bytes(t: torch.Tensor) -> bytes:
    # No numpy in the runtime: read the contiguous CPU storage through ctypes.
    nbytes = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), nbytes)


def state_bytes(params: ParamsLike) -> int:
    """Bytes of the raw trained state (what a full-state transfer would move)."""
    return sum(t.numel() * t.element_size() for _, t in named_params(params))


def clone_params(params: ParamsLike) -> dict[str, torch.Tensor]:
    """A detached deep copy of the trained parameters, keyed by name."""
    return {n: t.detach().clone() for n, t in named_params(params)}


# ----------------------------------------------------------------------------- updates


def update_scalar(lr: float, code: OneByteCode, code_byte: int) -> float:
    """c = fp32(fp32(lr) * decode(code_byte)): one IEEE fp32 multiply, same bits everywhere.

    The product of two fp32 values is exact in float64 (24 + 24 < 53 mantissa bits), so rounding
    it once to fp32 is the correctly rounded fp32 product.
    """
    lr32 = struct.unpack("<f", struct.pack("<f", lr))[0]
    g32 = code.decode(code_byte)
    return float(struct.unpack("<f", struct.pack("<f", lr32 * g32))[0])


def subtract_scaled_z(
    params: NamedParams,
    seed: int,
    scale: float,
    kind: ZKind,
    chunk_elements: int,
    out: NamedParams | None = None,
) -> None:
    """``out = params - scale * z(seed)`` per tensor (in place when ``out`` is None).

    Two separate kernels per chunk (``t = z * scale``; ``dst = src - t``) so no FMA contraction
    can change the rounding on any backend.
    """
    targets = out if out is not None else params
    if kind is ZKind.RADEMACHER:
        _subtract_scaled_rademacher(params, targets, seed, scale, chunk_elements)
        return
    for (name, src), (_, dst) in zip(params, targets, strict=True):
        n = src.numel()
        if n == 0:
            continue
        with torch.no_grad():
            src_flat = src.detach().reshape(-1)
            contiguous_dst = dst.is_contiguous()
            dst_flat = dst.detach().view(-1) if contiguous_dst else dst.detach().reshape(-1)
            for start in range(0, n, chunk_elements):
                stop = min(n, start + chunk_elements)
                z = z_chunk(seed, name, start, stop, kind, src.device)
                t = z * scale
                # Elementwise, so writing into the source's own memory (in place) is safe.
                torch.sub(src_flat[start:stop], t, out=dst_flat[start:stop])
            if not contiguous_dst:
                dst.detach().copy_(dst_flat.view_as(dst))


def _subtract_scaled_rademacher(
    params: NamedParams, targets: NamedParams, seed: int, scale: float, chunk_elements: int
) -> None:
    """:func:`subtract_scaled_z` for Rademacher z: the same kernels on the same values per
    element, but z of many tensors (up to ``chunk_elements`` elements at once) is generated in
    one batch (:func:`trainer.zo_rng.rademacher_pieces`), so the per-tensor op launches that
    dominated a small model's replay are paid once per batch."""
    batch: list[tuple[str, int, int, torch.Tensor, torch.Tensor]] = []
    size = 0
    dirty: list[tuple[torch.Tensor, torch.Tensor]] = []  # non-contiguous targets: copy back

    def flush() -> None:
        nonlocal size
        if not batch:
            return
        device = batch[0][3].device
        ts = rademacher_pieces(seed, [(n, a, b) for n, a, b, _, _ in batch], device, scale)
        for (_, start, stop, src_flat, dst_flat), t in zip(batch, ts, strict=True):
            # t = z * scale, exactly (z = +-1); then one subtraction. Elementwise, so writing
            # into the source's own memory (in place) is safe.
            torch.sub(src_flat[start:stop], t, out=dst_flat[start:stop])
        batch.clear()
        size = 0

    with torch.no_grad():
        for (name, src), (_, dst) in zip(params, targets, strict=True):
            n = src.numel()
            if n == 0:
                continue
            src_flat = src.detach().reshape(-1)
            if dst.is_contiguous():
                dst_flat = dst.detach().view(-1)
            else:
                dst_flat = dst.detach().reshape(-1)
                dirty.append((dst, dst_flat))
            for start in range(0, n, chunk_elements):
                stop = min(n, start + chunk_elements)
                if size + stop - start > chunk_elements or (
                    batch and batch[0][3].device != src.device
                ):
                    flush()
                batch.append((name, start, stop, src_flat, dst_flat))
                size += stop - start
        flush()
        for dst, dst_flat in dirty:
            dst.detach().copy_(dst_flat.view_as(dst))


def _record_seed(record: SeedRecord, settings: ZOSettings, kseeds: Sequence[int] | None) -> int:
    if settings.fedkseed_k:
        assert kseeds is not None
        if record.seed_index is None or not 0 <= record.seed_index < len(kseeds):
            raise InvalidRecord(
                f"FedKSeed record from {record.peer_id} needs a seed_index in "
                f"0..{len(kseeds) - 1}, got {record.seed_index!r}"
            )
        return kseeds[record.seed_index]
    if record.seed_index is not None:
        raise InvalidRecord("seed_index is only valid in FedKSeed mode (fedkseed_k > 0)")
    return derive_seed(settings.swarm, record.step, record.peer_id, record.sample_index)


def validate_step_records(
    step: int, records: Iterable[SeedRecord], settings: ZOSettings
) -> list[SeedRecord]:
    """Check a step's agreed record set and return it in canonical order."""
    recs = list(records)
    if len(recs) > settings.max_records_per_step:
        raise InvalidRecord(
            f"step {step} has {len(recs)} records, over max_records_per_step="
            f"{settings.max_records_per_step}"
        )
    for r in recs:
        if not isinstance(r, SeedRecord):
            raise InvalidRecord(f"expected a SeedRecord, got {type(r).__name__}")
        if r.step != step:
            raise InvalidRecord(f"record for step {r.step} in the record set of step {step}")
        for label, value in (("code", r.code), ("sample_index", r.sample_index)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRecord(f"{label} must be an int, got {type(value).__name__}")
        if not CODE_MIN <= r.code <= CODE_MAX:
            raise InvalidRecord(f"code {r.code} outside {CODE_MIN}..{CODE_MAX}")
        if not 0 <= r.sample_index < 2**32:
            raise InvalidRecord(f"sample_index {r.sample_index} outside 0..2**32-1")
        if not isinstance(r.peer_id, str):
            raise InvalidRecord(f"peer_id must be a str, got {type(r.peer_id).__name__}")
        if settings.fedkseed_k:
            if (
                isinstance(r.seed_index, bool)
                or not isinstance(r.seed_index, int)
                or not 0 <= r.seed_index < settings.fedkseed_k
            ):
                raise InvalidRecord(
                    f"FedKSeed record from {r.peer_id} needs a seed_index in "
                    f"0..{settings.fedkseed_k - 1}, got {r.seed_index!r}"
                )
        elif r.seed_index is not None:
            raise InvalidRecord("seed_index is only valid in FedKSeed mode (fedkseed_k > 0)")
        if not r.peer_id or len(r.peer_id.encode("utf-8")) > settings.max_peer_id_bytes:
            raise InvalidRecord(
                f"peer_id must be 1..{settings.max_peer_id_bytes} UTF-8 bytes, got {r.peer_id!r}"
            )
    recs.sort(key=lambda r: r.order_key)
    for a, b in itertools.pairwise(recs):
        if a.order_key == b.order_key:
            raise InvalidRecord(
                f"duplicate record for peer {a.peer_id} sample {a.sample_index} at step {step}"
            )
    return recs


def apply_records_in_order(
    params: ParamsLike,
    records: Sequence[SeedRecord],
    settings: ZOSettings,
    kseeds: Sequence[int] | None = None,
) -> tuple[int, int]:
    """Apply records exactly in the given order (no sorting); returns (applied, skipped_zero).

    Use :func:`apply_step` for training: this exists so a test can show that order matters.
    """
    named = named_params(params)
    if settings.fedkseed_k and kseeds is None:
        kseeds = candidate_seeds(settings.swarm, settings.run_seed, settings.fedkseed_k)
    applied = skipped = 0
    for r in records:
        seed = _record_seed(r, settings, kseeds)
        c = update_scalar(settings.lr, settings.code, r.code)
        if c == 0.0:
            skipped += 1
            continue
        subtract_scaled_z(named, seed, c, settings.z_kind, settings.chunk_elements)
        applied += 1
    return applied, skipped


def apply_step(
    params: ParamsLike,
    step: int,
    records: Iterable[SeedRecord],
    settings: ZOSettings,
    kseeds: Sequence[int] | None = None,
) -> ZOStepMetrics:
    """Apply one step's full agreed record set in canonical (peer_id, sample_index) order."""
    ordered = validate_step_records(step, records, settings)
    applied, skipped = apply_records_in_order(params, ordered, settings, kseeds)
    log_bytes = step_log_bytes(ordered, bool(settings.fedkseed_k))
    return ZOStepMetrics(
        step=step,
        records_applied=applied,
        records_skipped_zero=skipped,
        step_log_bytes=log_bytes,
    )


def replay(
    snapshot: ParamsLike,
    steps: Iterable[StepRecords],
    settings: ZOSettings,
    *,
    theta_0: ParamsLike | None = None,
    kseed: KSeedState | None = None,
) -> dict[str, torch.Tensor]:
    """Rebuild a state from a snapshot and the following steps' record sets (snapshot kept).

    FedKSeed: if ``kseed`` (the scalars as of the snapshot) is given, the steps' records are
    accumulated into it (it is updated in place). With ``fedkseed_rebase_steps`` set, both
    ``theta_0`` and ``kseed`` are required and rebase steps are reproduced exactly.
    """
    if settings.fedkseed_rebase_steps and (theta_0 is None or kseed is None):
        raise ValueError("replay with fedkseed_rebase_steps needs theta_0 and the KSeedState")
    state = clone_params(snapshot)
    kseeds = (
        candidate_seeds(settings.swarm, settings.run_seed, settings.fedkseed_k)
        if settings.fedkseed_k
        else None
    )
    previous: int | None = None
    for step, records in steps:
        if previous is not None and step <= previous:
            raise StepOutOfOrder(f"replay steps must increase: {step} after {previous}")
        _apply_canonical_step(state, step, records, settings, kseeds, theta_0, kseed)
        previous = step
    return state


def _apply_canonical_step(
    params: ParamsLike,
    step: int,
    records: Iterable[SeedRecord],
    settings: ZOSettings,
    kseeds: Sequence[int] | None,
    theta_0: ParamsLike | None,
    kseed: KSeedState | None,
) -> ZOStepMetrics:
    """One step as every node does it: apply in order, or, on a FedKSeed rebase step,
    accumulate and rebuild from theta_0 (the step's records are folded into the scalars)."""
    if not settings.is_rebase_step(step):
        metrics = apply_step(params, step, records, settings, kseeds)
        if kseed is not None:
            kseed.accumulate(validate_step_records(step, records, settings), settings)
        return metrics
    assert theta_0 is not None and kseed is not None
    ordered = validate_step_records(step, records, settings)
    kseed.accumulate(ordered, settings)
    rebuilt = rebuild_from_scalars(theta_0, kseed, settings)
    with torch.no_grad():
        for name, tensor in named_params(params):
            tensor.copy_(rebuilt[name])
    skipped = sum(1 for r in ordered if update_scalar(settings.lr, settings.code, r.code) == 0.0)
    return ZOStepMetrics(
        step=step,
        records_applied=len(ordered) - skipped,
        records_skipped_zero=skipped,
        step_log_bytes=step_log_bytes(ordered, True),
    )


# ----------------------------------------------------------------------------- SPSA


def spsa_projected_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    seed: int,
    settings: ZOSettings,
    saved: dict[str, torch.Tensor] | None = None,
) -> tuple[float, float, float]:
    """(g, L+, L-) with g = (L(theta + eps z) - L(theta - eps z)) / (2 eps).

    The live weights are overwritten with ``saved +- eps*z`` (computed from the saved copy, so
    the two perturbations do not drift) and restored from the saved copy with ``copy_``, which
    is bitwise exact, also when the loss function raises.
    """
    named = named_params(model)
    if saved is None:
        saved = clone_params(named)
    saved_named = [(n, saved[n]) for n, _ in named]
    eps = settings.eps
    try:
        with torch.no_grad():
            subtract_scaled_z(
                saved_named, seed, -eps, settings.z_kind, settings.chunk_elements, named
            )
            loss_plus = float(loss_fn(model, batch))
            subtract_scaled_z(
                saved_named, seed, eps, settings.z_kind, settings.chunk_elements, named
            )
            loss_minus = float(loss_fn(model, batch))
    finally:
        with torch.no_grad():
            for (_, live), (_, orig) in zip(named, saved_named, strict=True):
                live.copy_(orig)
    if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
        raise NonFiniteGradient(f"loss is not finite: L+={loss_plus!r}, L-={loss_minus!r}")
    g = (loss_plus - loss_minus) / (2.0 * eps)
    return g, loss_plus, loss_minus


# ----------------------------------------------------------------------------- FedKSeed


@dataclass
class KSeedState:
    """FedKSeed: the K candidate seeds of a run and the accumulated update scalar per seed.

    ``theta_T = theta_0 - sum_k A_k z_k`` with ``A_k`` the sum of the fp32 update scalars
    applied along seed k, summed in float64 in canonical record order (the same on every node).
    """

    seeds: list[int]
    scalars: list[float]

    @classmethod
    def for_run(cls, settings: ZOSettings) -> KSeedState:
        if not settings.fedkseed_k:
            raise ValueError("settings.fedkseed_k must be > 0 for FedKSeed")
        seeds = candidate_seeds(settings.swarm, settings.run_seed, settings.fedkseed_k)
        return cls(seeds=seeds, scalars=[0.0] * len(seeds))

    def accumulate(self, ordered: Sequence[SeedRecord], settings: ZOSettings) -> None:
        """Add a step's records (already in canonical order) to the accumulated scalars."""
        for r in ordered:
            if r.seed_index is None or not 0 <= r.seed_index < len(self.seeds):
                raise InvalidRecord(f"bad FedKSeed seed_index {r.seed_index!r}")
            self.scalars[r.seed_index] += update_scalar(settings.lr, settings.code, r.code)

    def choose_seed_index(
        self, swarm: str, step: int, peer_id: str, sample_index: int, weighted: bool
    ) -> int:
        """Seed index for one sample, deterministic in (swarm, step, peer_id, sample_index).

        Weighted: probability proportional to ``|A_k| + mean_k |A_k|`` (the mean keeps every
        seed reachable); uniform while all scalars are zero or when not weighted. Because the
        scalars are shared state, any node can check another node's choice.
        """
        u64 = derive_seed(swarm, step, peer_id, sample_index)
        k = len(self.seeds)
        if not weighted:
            return u64 % k
        mags = [abs(a) for a in self.scalars]
        mean = math.fsum(mags) / k
        if mean == 0.0:
            return u64 % k
        cumulative = []
        total = 0.0
        for m in mags:
            total += m + mean
            cumulative.append(total)
        target = (u64 >> 11) * (2.0**-53) * total
        return min(bisect.bisect_right(cumulative, target), k - 1)


def rebuild_from_scalars(
    theta_0: ParamsLike, kseed: KSeedState, settings: ZOSettings
) -> dict[str, torch.Tensor]:
    """``theta_0 - sum_k fp32(A_k) * z_k`` applied for k = 0..K-1 (zero scalars skipped).

    Only close to the step-by-step state, not bit-identical: step-by-step rounds to fp32 after
    every record, this rounds once per seed (measured: ~87 % of fp32 elements differ after
    180 records). So step-by-step (:func:`apply_step`) is the canonical path, except at the
    rebase steps of ``fedkseed_rebase_steps``, where every node replaces its state by this
    rebuild, which is deterministic, so replicas stay bit-identical either way.
    """
    state = clone_params(theta_0)
    named = named_params(state)
    for seed, scalar in zip(kseed.seeds, kseed.scalars, strict=True):
        a32 = float(struct.unpack("<f", struct.pack("<f", scalar))[0])
        if a32 != 0.0:
            subtract_scaled_z(named, seed, a32, settings.z_kind, settings.chunk_elements)
    return state


# ----------------------------------------------------------------------------- record log

_LOG_MAGIC = b"SZOL"
_LOG_VERSION = 1
_FLAG_SEED_INDEX = 1


def _runs(ordered: Sequence[SeedRecord]) -> list[list[SeedRecord]]:
    """Split canonically ordered records into runs of consecutive samples of one peer."""
    runs: list[list[SeedRecord]] = []
    for r in ordered:
        last = runs[-1][-1] if runs else None
        if (
            last is not None
            and last.peer_id == r.peer_id
            and last.sample_index + 1 == r.sample_index
            and len(runs[-1]) < 0xFFFF
        ):
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


def step_log_bytes(ordered: Sequence[SeedRecord], fedkseed: bool) -> int:
    """Bytes one step adds to a record log whose peer table already lists its peers.

    12 bytes of step header, 8 per run of consecutive samples of one peer, then 1 byte per
    record (plus 4 for the seed index in FedKSeed mode).
    """
    per_record = 5 if fedkseed else 1
    return 12 + sum(8 + per_record * len(run) for run in _runs(ordered))


def encode_record_log(steps: Iterable[StepRecords], settings: ZOSettings) -> bytes:
    """Compact binary log of steps of records (no pickle), little-endian.

    Layout: ``b"SZOL"``, version u8, flags u8 (bit 0: records carry a u32 seed_index),
    n_peers u16, then per peer (len u8, UTF-8 id); n_steps u32; per step: step u64, n_runs u32;
    per run (consecutive sample indices of one peer): peer u16, first_sample u32, count u16,
    [count x u32 seed_index], count x i8 code.
    """
    step_list = [(s, validate_step_records(s, recs, settings)) for s, recs in steps]
    fedk = bool(settings.fedkseed_k)
    peers = sorted({r.peer_id for _, recs in step_list for r in recs}, key=str.encode)
    if len(peers) > 0xFFFF:
        raise RecordLogError(f"{len(peers)} distinct peers do not fit the log's u16 peer table")
    peer_index = {p: i for i, p in enumerate(peers)}
    out = bytearray(_LOG_MAGIC)
    out += struct.pack("<BBH", _LOG_VERSION, _FLAG_SEED_INDEX if fedk else 0, len(peers))
    for p in peers:
        raw = p.encode("utf-8")
        out += struct.pack("<B", len(raw)) + raw
    out += struct.pack("<I", len(step_list))
    for step, recs in step_list:
        runs = _runs(recs)
        out += struct.pack("<QI", step, len(runs))
        for run in runs:
            out += struct.pack("<HIH", peer_index[run[0].peer_id], run[0].sample_index, len(run))
            if fedk:
                out += struct.pack(f"<{len(run)}I", *[r.seed_index or 0 for r in run])
            out += struct.pack(f"<{len(run)}b", *[r.code for r in run])
    if len(out) > settings.max_log_bytes:
        raise RecordLogError(f"log of {len(out)} bytes is over max_log_bytes")
    return bytes(out)


def decode_record_log(data: bytes, settings: ZOSettings) -> list[tuple[int, list[SeedRecord]]]:
    """Parse :func:`encode_record_log` output, checking every length before it is used."""
    if len(data) > settings.max_log_bytes:
        raise RecordLogError(f"log of {len(data)} bytes is over max_log_bytes")
    pos = 0

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise RecordLogError(f"log truncated at byte {pos} (needed {size} more)")
        values = struct.unpack_from(fmt, data, pos)
        pos += size
        return values

    if data[:4] != _LOG_MAGIC:
        raise RecordLogError("not a shoal ZO record log (bad magic)")
    pos = 4
    version, flags, n_peers = take("<BBH")
    if version != _LOG_VERSION:
        raise RecordLogError(f"record log version {version} is not supported")
    fedk = bool(flags & _FLAG_SEED_INDEX)
    if fedk != bool(settings.fedkseed_k):
        raise RecordLogError("log FedKSeed flag does not match settings.fedkseed_k")
    peers = []
    for _ in range(n_peers):
        (length,) = take("<B")
        (raw,) = take(f"<{length}s")
        try:
            peers.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise RecordLogError("peer id is not UTF-8") from exc
    (n_steps,) = take("<I")
    result: list[tuple[int, list[SeedRecord]]] = []
    for _ in range(n_steps):
        step, n_runs = take("<QI")
        recs: list[SeedRecord] = []
        for _ in range(n_runs):
            peer, first, count = take("<HIH")
            if peer >= len(peers):
                raise RecordLogError(f"peer index {peer} outside the peer table")
            if len(recs) + count > settings.max_records_per_step:
                raise RecordLogError(f"step {step} is over max_records_per_step")
            seed_indices = take(f"<{count}I") if fedk else (None,) * count
            codes = take(f"<{count}b")
            for j in range(count):
                recs.append(SeedRecord(step, peers[peer], first + j, codes[j], seed_indices[j]))
        try:
            recs = validate_step_records(step, recs, settings)
        except InvalidRecord as exc:
            raise RecordLogError(f"step {step}: {exc}") from exc
        result.append((step, recs))
    if pos != len(data):
        raise RecordLogError(f"{len(data) - pos} trailing bytes after the log")
    return result


# ----------------------------------------------------------------------------- node trainer


class ZOTrainer:
    """One node's side of shared-seed ZO training.

    Per step t: :meth:`produce_records` measures n SPSA samples at the current state theta_t
    (one batch each) and returns this node's records; the swarm agrees on the full record set
    of step t; :meth:`apply_step` applies it and moves to t + 1.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterator[Any],
        peer_id: str,
        settings: ZOSettings,
        start_step: int = 0,
        theta_0: Mapping[str, torch.Tensor] | None = None,
        kseed: KSeedState | None = None,
    ) -> None:
        """``theta_0``/``kseed``: FedKSeed run start state and scalars as of ``start_step``
        (default: the model's current weights and zero scalars, right for ``start_step=0``).
        ``theta_0`` is kept only when ``fedkseed_rebase_steps`` is set (one more model copy).
        """
        if not peer_id or len(peer_id.encode("utf-8")) > settings.max_peer_id_bytes:
            raise ValueError(f"peer_id must be 1..{settings.max_peer_id_bytes} UTF-8 bytes")
        self.model = model
        self.loss_fn = loss_fn
        self.batches = batches
        self.peer_id = peer_id
        self.settings = settings
        self.step = start_step
        self.kseed = kseed
        if settings.fedkseed_k and kseed is None:
            self.kseed = KSeedState.for_run(settings)
        self.theta_0: dict[str, torch.Tensor] | None = None
        if settings.fedkseed_rebase_steps:
            self.theta_0 = clone_params(theta_0 if theta_0 is not None else model)
        self._saved = clone_params(model)
        self._own: dict[int, tuple[int, float]] = {}  # step -> (own records, mean loss)
        self.history: list[ZOStepMetrics] = []

    def seed_for(self, step: int, sample_index: int) -> tuple[int, int | None]:
        """(seed, seed_index) this node uses for one sample."""
        if self.kseed is None:
            return derive_seed(self.settings.swarm, step, self.peer_id, sample_index), None
        k = self.kseed.choose_seed_index(
            self.settings.swarm,
            step,
            self.peer_id,
            sample_index,
            self.settings.weighted_seed_sampling,
        )
        return self.kseed.seeds[k], k

    def produce_records(self, step: int, n_samples: int) -> list[SeedRecord]:
        """This node's records for ``step`` (which must be the current step)."""
        if step != self.step:
            raise StepOutOfOrder(f"trainer is at step {self.step}, asked for step {step}")
        if not 0 < n_samples <= self.settings.max_records_per_step:
            raise ValueError(f"n_samples must be in 1..{self.settings.max_records_per_step}")
        # Refresh the saved copy in place (no reallocation) from the current state.
        with torch.no_grad():
            for name, p in named_params(self.model):
                self._saved[name].copy_(p)
        records = []
        losses = []
        for i in range(n_samples):
            seed, seed_index = self.seed_for(step, i)
            batch = next(self.batches)
            g, lp, lm = spsa_projected_gradient(
                self.model, self.loss_fn, batch, seed, self.settings, self._saved
            )
            losses.append(0.5 * (lp + lm))
            records.append(
                SeedRecord(step, self.peer_id, i, self.settings.code.encode(g), seed_index)
            )
        self._own[step] = (len(records), sum(losses) / len(losses))
        return records

    def apply_step(self, step: int, records: Iterable[SeedRecord]) -> ZOStepMetrics:
        """Apply the swarm's agreed record set of ``step`` and advance to ``step + 1``."""
        if step != self.step:
            raise StepOutOfOrder(f"trainer is at step {self.step}, asked to apply step {step}")
        ordered = validate_step_records(step, records, self.settings)
        kseeds = self.kseed.seeds if self.kseed is not None else None
        metrics = _apply_canonical_step(
            self.model, step, ordered, self.settings, kseeds, self.theta_0, self.kseed
        )
        own, loss = self._own.pop(step, (0, None))
        metrics = ZOStepMetrics(
            step=metrics.step,
            records_applied=metrics.records_applied,
            records_skipped_zero=metrics.records_skipped_zero,
            step_log_bytes=metrics.step_log_bytes,
            own_records=own,
            loss=loss,
        )
        self.history.append(metrics)
        self.step = step + 1
        return metrics

    def rebase(self) -> None:
        """Make the current state the run's base (a snapshot step): FedKSeed's K accumulated
        scalars restart from zero relative to it (and, with ``fedkseed_rebase_steps``, the
        rebuilds start from it), so the state stays rebuildable from the latest snapshot plus
        K scalars, and a joiner that starts from that snapshot holds the same scalars (zero)
        as every member. Every node calls it after the same step."""
        if self.kseed is not None:
            self.kseed.scalars = [0.0] * len(self.kseed.scalars)
        if self.theta_0 is not None:
            self.theta_0 = clone_params(self.model)

    def state_hash(self) -> str:
        return state_hash(self.model)
