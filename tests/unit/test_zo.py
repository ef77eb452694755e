"""Shared-seed ZO training: SPSA on a saved copy, canonical apply order, replay, FedKSeed."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from trainer.zo import (
    InvalidRecord,
    KSeedState,
    RecordLogError,
    SeedRecord,
    StepOutOfOrder,
    ZOSettings,
    ZOTrainer,
    apply_records_in_order,
    apply_step,
    clone_params,
    decode_record_log,
    encode_record_log,
    named_params,
    rebuild_from_scalars,
    replay,
    spsa_projected_gradient,
    state_bytes,
    state_hash,
    subtract_scaled_z,
    update_scalar,
)
from trainer.zo_quant import NonFiniteGradient
from trainer.zo_rng import ParityNotGuaranteed, ZKind, derive_seed, z_full

PEERS = ["12D3KooWAlice", "12D3KooWBob", "12D3KooWCarol", "12D3KooWDave"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny ops on a shared 2-core machine run faster without intra-op threads.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyLM(nn.Module):
    """Embedding + linear next-token model."""

    def __init__(self, vocab: int = 16, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(self.emb(x))
        return out


def make_lm(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def bigram_batches(seed: int, vocab: int = 16, batch: int = 64) -> Iterator[tuple]:
    """Synthetic task: the next token is a fixed permutation of the current one."""
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, vocab, (batch,), generator=g)
        yield x, perm[x]


def lm_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def random_steps(
    n_steps: int, peers: list[str], samples: int, seed: int = 0, first_step: int = 0
) -> list[tuple[int, list[SeedRecord]]]:
    rng = random.Random(seed)
    return [
        (
            step,
            [SeedRecord(step, p, i, rng.randint(-127, 127)) for p in peers for i in range(samples)],
        )
        for step in range(first_step, first_step + n_steps)
    ]


def fp32_state(n: int = 10_000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "a.weight": torch.randn(n // 100, 100, generator=g) * 0.05,
        "a.bias": torch.randn(100, generator=g) * 0.05,
    }


# ---------------------------------------------------------------- SPSA on a saved copy


def test_spsa_leaves_canonical_weights_bitwise_unchanged() -> None:
    model = make_lm()
    settings = ZOSettings(swarm="s", eps=1e-3)
    before = state_hash(model)
    batch = next(bigram_batches(0))
    for sample in range(5):
        g, lp, lm = spsa_projected_gradient(
            model, lm_loss, batch, derive_seed("s", 0, "p", sample), settings
        )
        assert lp != lm and math.isfinite(g)
    assert state_hash(model) == before


def test_in_place_perturb_and_restore_would_drift() -> None:
    # The pitfall the saved copy avoids: +eps, -2eps, +eps in place changes fp32 bits.
    model = make_lm()
    before = state_hash(model)
    named = named_params(model)
    seed = derive_seed("s", 0, "p", 0)
    with torch.no_grad():
        for scale in (-1e-3, 2e-3, -1e-3):
            subtract_scaled_z(named, seed, scale, ZKind.SUM4, 1 << 20)
    assert state_hash(model) != before


def test_spsa_restores_weights_when_the_loss_raises() -> None:
    model = make_lm()
    before = state_hash(model)
    calls = []

    def failing_loss(m: nn.Module, batch: tuple) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory in the middle of SPSA")
        return lm_loss(m, batch)

    with pytest.raises(RuntimeError):
        spsa_projected_gradient(
            model, failing_loss, next(bigram_batches(0)), 7, ZOSettings(swarm="s")
        )
    assert state_hash(model) == before


def test_spsa_estimates_the_directional_derivative() -> None:
    # L = 0.5 |theta|^2 (float64 weights): (L+ - L-) / (2 eps) = theta . z exactly, up to the
    # fp32 rounding of eps * z.
    theta = nn.Parameter(torch.linspace(-1, 1, 1000, dtype=torch.float64))
    holder = nn.Module()
    holder.register_parameter("theta", theta)

    def quad(m: nn.Module, _: object) -> torch.Tensor:
        return 0.5 * (theta**2).sum()

    for kind in (ZKind.RADEMACHER, ZKind.SUM4):
        settings = ZOSettings(swarm="s", eps=1e-3, z_kind=kind)
        g, _, _ = spsa_projected_gradient(holder, quad, None, 5, settings)
        expected = float((theta.detach() * z_full(5, "theta", 1000, kind).double()).sum())
        assert g == pytest.approx(expected, rel=1e-5)


def test_non_finite_loss_raises_a_specific_error() -> None:
    model = make_lm()

    def nan_loss(m: nn.Module, batch: tuple) -> torch.Tensor:
        return torch.tensor(float("nan"))

    with pytest.raises(NonFiniteGradient):
        spsa_projected_gradient(model, nan_loss, None, 1, ZOSettings(swarm="s"))


# ---------------------------------------------------------------- canonical order


def test_apply_order_changes_fp32_bits_and_apply_step_sorts() -> None:
    settings = ZOSettings(swarm="s", lr=1e-3)
    [(step, records)] = random_steps(1, PEERS, 3, seed=5)
    canonical = sorted(records, key=lambda r: r.order_key)

    in_order = fp32_state()
    apply_records_in_order(in_order, canonical, settings)
    reversed_order = fp32_state()
    apply_records_in_order(reversed_order, canonical[::-1], settings)
    # The same updates in another order give other fp32 bits: the order must be fixed.
    assert state_hash(in_order) != state_hash(reversed_order)
    differing = sum(int((in_order[n] != reversed_order[n]).sum()) for n in in_order)
    assert differing > 0

    for shuffle_seed in range(3):
        shuffled = list(records)
        random.Random(shuffle_seed).shuffle(shuffled)
        state = fp32_state()
        apply_step(state, step, shuffled, settings)
        assert state_hash(state) == state_hash(in_order)


def test_rademacher_update_is_plus_minus_c_exactly() -> None:
    settings = ZOSettings(swarm="s", lr=1e-3)
    state = fp32_state(1000)
    before = clone_params(state)
    record = SeedRecord(0, "p", 0, 50)
    apply_step(state, 0, [record], settings)
    c = update_scalar(settings.lr, settings.code, 50)
    seed = derive_seed("s", 0, "p", 0)
    for name, t in before.items():
        z = z_full(seed, name, t.numel()).view_as(t)
        expected = torch.where(z > 0, t - torch.tensor(c), t + torch.tensor(c))
        assert torch.equal(state[name], expected)


def test_zero_code_records_are_no_ops_even_for_negative_zero() -> None:
    settings = ZOSettings(swarm="s")
    state = {"w": torch.tensor([-0.0, 0.0, 1.0])}
    metrics = apply_step(state, 0, [SeedRecord(0, "p", 0, 0)], settings)
    assert metrics.records_skipped_zero == 1 and metrics.records_applied == 0
    assert torch.signbit(state["w"][0])


@pytest.mark.parametrize("kind", [ZKind.RADEMACHER, ZKind.SUM4])
def test_chunk_size_does_not_change_the_applied_state(kind: ZKind) -> None:
    steps = random_steps(3, PEERS[:2], 2)
    hashes = set()
    for chunk in (32, 96, 1 << 20):
        settings = ZOSettings(swarm="s", z_kind=kind, chunk_elements=chunk)
        hashes.add(state_hash(replay(fp32_state(2000), steps, settings)))
    assert len(hashes) == 1


def test_non_contiguous_parameters_get_z_in_logical_order() -> None:
    settings = ZOSettings(swarm="s", chunk_elements=64)
    base = torch.randn(30, 20)
    transposed = base.t()  # non-contiguous view, logical shape (20, 30)
    contiguous = transposed.contiguous()
    apply_step({"w": transposed}, 0, [SeedRecord(0, "p", 0, 90)], settings)
    apply_step({"w": contiguous}, 0, [SeedRecord(0, "p", 0, 90)], settings)
    assert torch.equal(transposed, contiguous)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (SeedRecord(1, "p", 0, 3), "step"),
        (SeedRecord(0, "p", 0, 128), "code"),
        (SeedRecord(0, "p", 0, -128), "code"),
        (SeedRecord(0, "p", -1, 3), "sample_index"),
        (SeedRecord(0, "", 0, 3), "peer_id"),
        (SeedRecord(0, "p", 0, 3, seed_index=2), "seed_index"),
    ],
)
def test_apply_step_rejects_bad_records(record: SeedRecord, reason: str) -> None:
    with pytest.raises(InvalidRecord, match=reason):
        apply_step(fp32_state(100), 0, [record], ZOSettings(swarm="s"))


def test_apply_step_rejects_duplicates_and_oversized_steps() -> None:
    settings = ZOSettings(swarm="s", max_records_per_step=3)
    dup = [SeedRecord(0, "p", 0, 3), SeedRecord(0, "p", 0, 4)]
    with pytest.raises(InvalidRecord, match="duplicate"):
        apply_step(fp32_state(100), 0, dup, settings)
    many = [SeedRecord(0, "p", i, 3) for i in range(4)]
    with pytest.raises(InvalidRecord, match="max_records_per_step"):
        apply_step(fp32_state(100), 0, many, settings)


def test_settings_refuse_non_portable_z_in_parity_mode() -> None:
    with pytest.raises(ParityNotGuaranteed):
        ZOSettings(swarm="s", z_kind=ZKind.BOX_MULLER)
    ZOSettings(swarm="s", z_kind=ZKind.BOX_MULLER, parity_required=False)
    with pytest.raises(ValueError):
        ZOSettings(swarm="s", lr=float("nan"))
    with pytest.raises(ValueError):
        ZOSettings(swarm="s", chunk_elements=100)


def test_state_hash_covers_names_dtypes_and_bytes() -> None:
    a = {"w": torch.zeros(4)}
    assert state_hash(a) == state_hash({"w": torch.zeros(4)})
    assert state_hash(a) != state_hash({"v": torch.zeros(4)})
    assert state_hash(a) != state_hash({"w": torch.zeros(4, dtype=torch.float64)})
    assert state_hash(a) != state_hash({"w": torch.zeros(2, 2)})
    assert state_hash(a) != state_hash({"w": torch.tensor([0.0, 0.0, 0.0, -0.0])})


# ---------------------------------------------------------------- replay and bytes


def test_replicas_stay_identical_and_replay_reproduces_the_live_state() -> None:
    settings = ZOSettings(swarm="replay", lr=2e-3)
    trainers = [
        ZOTrainer(make_lm(), lm_loss, bigram_batches(10 + i), peer, settings)
        for i, peer in enumerate(PEERS[:3])
    ]
    snapshot = clone_params(trainers[0].model)
    log: list[tuple[int, list[SeedRecord]]] = []
    for step in range(12):
        records = [r for t in trainers for r in t.produce_records(step, 2)]
        random.Random(step).shuffle(records)  # arrival order differs per node
        for t in trainers:
            t.apply_step(step, records)
        log.append((step, records))
    hashes = {t.state_hash() for t in trainers}
    assert len(hashes) == 1
    assert state_hash(snapshot) not in hashes

    decoded = decode_record_log(encode_record_log(log, settings), settings)
    rebuilt = replay(snapshot, decoded, settings)
    assert state_hash(rebuilt) == trainers[0].state_hash()
    # A replay from a mid-run snapshot with the later steps reaches the same state.
    mid = replay(snapshot, decoded[:5], settings)
    assert state_hash(replay(mid, decoded[5:], settings)) == trainers[0].state_hash()


def test_record_log_bytes_vs_full_state_for_a_1m_param_model() -> None:
    # 1,000,000 fp32 params; 100 steps x 4 peers x 1 sample.
    state = {"emb": torch.zeros(1000, 512), "head": torch.zeros(512, 953), "bias": torch.zeros(64)}
    n_params = sum(t.numel() for t in state.values())
    assert n_params == 1_000_000
    settings = ZOSettings(swarm="bytes")
    log = random_steps(100, PEERS, 1, seed=9)
    data = encode_record_log(log, settings)
    header = 4 + 1 + 1 + 2 + sum(1 + len(p) for p in PEERS) + 4
    per_step = 8 + 4 + 4 * (2 + 4 + 2 + 1)
    assert len(data) == header + 100 * per_step
    full = state_bytes(state)
    assert full == 4_000_000
    print(
        f"\nrecord log: {len(data)} bytes for 400 records (payload 400 B of code bytes) vs "
        f"full fp32 state {full} bytes: ratio {full / len(data):.0f}x"
    )
    assert len(data) * 100 < full
    assert decode_record_log(data, settings) == [
        (s, sorted(r, key=lambda x: x.order_key)) for s, r in log
    ]


def test_record_log_runs_pack_consecutive_samples_of_one_peer() -> None:
    settings = ZOSettings(swarm="s")
    log = random_steps(1, ["p"], 50)
    data = encode_record_log(log, settings)
    assert len(data) == 4 + 4 + (1 + 1) + 4 + 12 + (8 + 50)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[:-1],
        lambda d: d + b"\x00",
        lambda d: b"XXXX" + d[4:],
        lambda d: d[:4] + b"\x02" + d[5:],
    ],
)
def test_malformed_record_logs_raise(mutate: object) -> None:
    settings = ZOSettings(swarm="s")
    data = encode_record_log(random_steps(3, PEERS[:2], 2), settings)
    with pytest.raises(RecordLogError):
        decode_record_log(mutate(data), settings)  # type: ignore[operator]


def test_record_log_with_out_of_range_peer_index_raises() -> None:
    settings = ZOSettings(swarm="s")
    data = bytearray(encode_record_log(random_steps(1, ["p"], 1), settings))
    # header 8 + peer table (1 + 1) + n_steps 4 + step 8 + n_runs 4 -> peer index at byte 26.
    data[26] = 5
    with pytest.raises(RecordLogError, match="peer index"):
        decode_record_log(bytes(data), settings)


def test_replay_rejects_steps_out_of_order() -> None:
    settings = ZOSettings(swarm="s")
    steps = random_steps(2, ["p"], 1)
    with pytest.raises(StepOutOfOrder):
        replay(fp32_state(100), steps[::-1], settings)


# ---------------------------------------------------------------- training


def test_zo_training_lowers_the_loss_with_replicas_in_lockstep() -> None:
    settings = ZOSettings(swarm="train", lr=3e-3, eps=1e-3)
    trainers = [
        ZOTrainer(make_lm(), lm_loss, bigram_batches(100 + i), peer, settings)
        for i, peer in enumerate(PEERS[:2])
    ]
    eval_batch = next(bigram_batches(999, batch=512))
    with torch.no_grad():
        start = float(lm_loss(trainers[0].model, eval_batch))
    for step in range(250):
        records = [r for t in trainers for r in t.produce_records(step, 2)]
        metrics = [t.apply_step(step, records) for t in trainers]
    with torch.no_grad():
        end = float(lm_loss(trainers[0].model, eval_batch))
    assert trainers[0].state_hash() == trainers[1].state_hash()
    assert metrics[0].own_records == 2 and metrics[0].records_applied <= 4
    assert metrics[0].loss is not None and metrics[0].step_log_bytes == 12 + 2 * (8 + 2)
    print(f"\nZO loss {start:.3f} -> {end:.3f} in 250 steps x 4 samples")
    assert end < 0.6 * start


def test_trainer_refuses_steps_out_of_order() -> None:
    trainer = ZOTrainer(make_lm(), lm_loss, bigram_batches(0), "p", ZOSettings(swarm="s"))
    with pytest.raises(StepOutOfOrder):
        trainer.produce_records(1, 1)
    with pytest.raises(StepOutOfOrder):
        trainer.apply_step(3, [])
    trainer.apply_step(0, [])
    assert trainer.step == 1


# ---------------------------------------------------------------- FedKSeed


def fedk_steps(settings: ZOSettings, n_steps: int, seed: int) -> list[tuple[int, list]]:
    rng = random.Random(seed)
    return [
        (
            step,
            [
                SeedRecord(step, p, i, rng.randint(-127, 127), rng.randrange(settings.fedkseed_k))
                for p in PEERS[:3]
                for i in range(2)
            ],
        )
        for step in range(n_steps)
    ]


def test_fedkseed_rebuild_from_k_scalars_is_close_to_step_by_step() -> None:
    settings = ZOSettings(swarm="fk", lr=1e-3, fedkseed_k=8, run_seed=77)
    theta_0 = fp32_state()
    log = fedk_steps(settings, 30, seed=1)
    live = replay(theta_0, log, settings)
    kseed = KSeedState.for_run(settings)
    for _step, recs in log:
        kseed.accumulate(sorted(recs, key=lambda r: r.order_key), settings)
    rebuilt = rebuild_from_scalars(theta_0, kseed, settings)
    n_updates = 30 * 6
    for name in live:
        ulp = torch.finfo(torch.float32).eps * live[name].abs().max().item()
        assert torch.allclose(rebuilt[name], live[name], rtol=0, atol=n_updates * ulp)
    # Not bit-identical: step-by-step rounds after each of the 180 records, the rebuild once
    # per seed. The canonical state is the step-by-step one.
    differing = sum(int((rebuilt[n] != live[n]).sum()) for n in live)
    total = sum(t.numel() for t in live.values())
    print(f"\nFedKSeed rebuild differs from step-by-step in {differing} of {total} fp32 elements")
    assert differing > 0


def test_fedkseed_rebuild_is_exact_for_one_record() -> None:
    settings = ZOSettings(swarm="fk", lr=1e-3, fedkseed_k=4)
    theta_0 = fp32_state(1000)
    log = [(0, [SeedRecord(0, "p", 0, 77, 2)])]
    kseed = KSeedState.for_run(settings)
    kseed.accumulate(log[0][1], settings)
    assert state_hash(rebuild_from_scalars(theta_0, kseed, settings)) == state_hash(
        replay(theta_0, log, settings)
    )


def test_fedkseed_trainers_stay_identical_and_log_round_trips() -> None:
    settings = ZOSettings(swarm="fk", lr=3e-3, fedkseed_k=16, weighted_seed_sampling=True)
    trainers = [
        ZOTrainer(make_lm(), lm_loss, bigram_batches(i), peer, settings)
        for i, peer in enumerate(PEERS[:2])
    ]
    snapshot = clone_params(trainers[0].model)
    log = []
    for step in range(6):
        records = [r for t in trainers for r in t.produce_records(step, 2)]
        assert all(r.seed_index is not None for r in records)
        for t in trainers:
            t.apply_step(step, records)
        log.append((step, records))
    assert trainers[0].state_hash() == trainers[1].state_hash()
    assert trainers[0].kseed is not None and trainers[1].kseed is not None
    assert trainers[0].kseed.scalars == trainers[1].kseed.scalars
    decoded = decode_record_log(encode_record_log(log, settings), settings)
    assert state_hash(replay(snapshot, decoded, settings)) == trainers[0].state_hash()


def test_fedkseed_rebase_lets_a_joiner_catch_up_from_theta_0_and_k_scalars() -> None:
    settings = ZOSettings(swarm="fk", lr=3e-3, fedkseed_k=8, fedkseed_rebase_steps=5)
    trainers = [
        ZOTrainer(make_lm(), lm_loss, bigram_batches(i), peer, settings)
        for i, peer in enumerate(PEERS[:2])
    ]
    theta_0 = clone_params(trainers[0].model)
    log = []
    scalars_after_step_9: list[float] = []
    for step in range(12):
        records = [r for t in trainers for r in t.produce_records(step, 2)]
        for t in trainers:
            t.apply_step(step, records)
        log.append((step, records))
        if step == 9:
            assert trainers[0].kseed is not None
            scalars_after_step_9 = list(trainers[0].kseed.scalars)
    live = trainers[0].state_hash()
    assert trainers[1].state_hash() == live

    # Joiner: theta_0 + the K scalars as of the rebase after step 9 + records of steps 10, 11.
    kseed = KSeedState.for_run(settings)
    kseed.scalars = list(scalars_after_step_9)
    at_rebase = rebuild_from_scalars(theta_0, kseed, settings)
    caught_up = replay(at_rebase, log[10:], settings, theta_0=theta_0, kseed=kseed)
    assert state_hash(caught_up) == live
    # A full replay from theta_0 reproduces it too, rebases included.
    full = replay(theta_0, log, settings, theta_0=theta_0, kseed=KSeedState.for_run(settings))
    assert state_hash(full) == live
    # The rebase really changed the path: plain step-by-step lands on other (close) bits.
    plain = ZOSettings(swarm="fk", lr=3e-3, fedkseed_k=8)
    assert state_hash(replay(theta_0, log, plain)) != live
    with pytest.raises(ValueError, match="theta_0"):
        replay(theta_0, log, settings)


def test_fedkseed_rebase_at_a_snapshot_keeps_the_state_rebuildable_from_it_and_k_scalars() -> None:
    settings = ZOSettings(
        swarm="fk", lr=3e-3, fedkseed_k=8, fedkseed_rebase_steps=5, weighted_seed_sampling=True
    )
    trainers = [
        ZOTrainer(make_lm(), lm_loss, bigram_batches(i), peer, settings)
        for i, peer in enumerate(PEERS[:2])
    ]
    snapshot: dict[str, torch.Tensor] = {}
    log = []
    for step in range(20):
        records = [r for t in trainers for r in t.produce_records(step, 2)]
        for t in trainers:
            t.apply_step(step, records)
        log.append((step, records))
        if step + 1 == 10:  # the snapshot of step 10: the state after step 9
            for t in trainers:
                t.rebase()
            snapshot = clone_params(trainers[0].model)
    live = trainers[0].state_hash()
    assert trainers[1].state_hash() == live
    kseed = trainers[0].kseed
    assert kseed is not None and any(kseed.scalars)
    # After the rebase step 14 (and 19), the state is the snapshot plus the K scalars since.
    assert state_hash(rebuild_from_scalars(snapshot, kseed, settings)) == live
    # A joiner from the snapshot with zero scalars replays steps 10..19 to the same bits.
    joiner = KSeedState.for_run(settings)
    caught_up = replay(snapshot, log[10:], settings, theta_0=snapshot, kseed=joiner)
    assert state_hash(caught_up) == live and joiner.scalars == kseed.scalars
    # Control: the scalars since theta_0 do not rebuild it from the snapshot.
    total = KSeedState.for_run(settings)
    for _step, recs in log:
        total.accumulate(sorted(recs, key=lambda r: r.order_key), settings)
    assert state_hash(rebuild_from_scalars(snapshot, total, settings)) != live


def test_weighted_seed_sampling_prefers_seeds_with_large_accumulated_scalars() -> None:
    settings = ZOSettings(swarm="fk", fedkseed_k=8)
    kseed = KSeedState.for_run(settings)
    uniform = [kseed.choose_seed_index("fk", 0, "p", i, weighted=True) for i in range(4000)]
    assert max(uniform.count(k) for k in range(8)) < 700  # all zero: uniform (500 each)
    kseed.scalars[3] = -10.0
    kseed.scalars[5] = 0.1
    picks = [kseed.choose_seed_index("fk", 0, "p", i, weighted=True) for i in range(4000)]
    # Weights |A_k| + mean: seed 3 gets (10 + 1.26) / (10.1 + 8 * 1.2625) ~= 56 %.
    assert 0.5 < picks.count(3) / 4000 < 0.62
    assert all(picks.count(k) > 0 for k in range(8))
    assert picks == [kseed.choose_seed_index("fk", 0, "p", i, weighted=True) for i in range(4000)]


def test_fedkseed_records_need_a_valid_seed_index() -> None:
    settings = ZOSettings(swarm="fk", fedkseed_k=4)
    for bad in (None, 4, -1):
        with pytest.raises(InvalidRecord, match="seed_index"):
            apply_step(fp32_state(100), 0, [SeedRecord(0, "p", 0, 5, bad)], settings)
