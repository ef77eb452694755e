import itertools
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from trainer.data import CorpusSettings, TokenBlocks, heldout_batches, load_corpus
from trainer.diloco import (
    MOMENTUM_PREFIX,
    PARAM_PREFIX,
    DiLoCoSettings,
    DiLoCoWorker,
    InnerLossNotFiniteError,
    OuterUpdateError,
    OverlappedRounds,
    PseudoGradient,
    RoundOrderError,
    SharedStateError,
    shared_state_hash,
    shared_tensor_hashes,
    warmup_lr,
    weighted_mean,
)
from trainer.model import ModelConfig, build_model


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Other jobs share this machine's 2 cores; spinning intra-op threads then slow torch
    down many times over. One thread gives the same numbers, predictably fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TEST_CONFIG = ModelConfig(context_tokens=16, d_model=16, n_layers=1, n_heads=2, mlp_hidden=32)


class Vector(nn.Module):
    """A model that is just one parameter vector, for outer-step arithmetic by hand."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(values))


def linear_loss(
    coeffs: torch.Tensor,
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """loss = sum(coeffs * w): a constant gradient, so AdamW moves each weight by
    -lr * sign(coeff) per step (weight decay 0) and the pseudo-gradient is known."""

    def loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (model.w * coeffs).sum()

    return loss


def dummy_batches(
    on_fetch: Callable[[int], None] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    index = 0
    while True:
        if on_fetch is not None:
            on_fetch(index)
        index += 1
        yield torch.zeros((2, 4), dtype=torch.int64), torch.zeros((2, 4), dtype=torch.int64)


def token_batches(seed: int) -> TokenBlocks:
    tokens = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(seed))
    return TokenBlocks(tokens.to(torch.int16), batch_size=2, context_tokens=16, seed=seed)


def test_pseudo_gradient_sign_and_two_nesterov_outer_steps_by_hand() -> None:
    theta0 = [1.0, -2.0, 0.5]
    worker = DiLoCoWorker(Vector(theta0), dummy_batches(), DiLoCoSettings())
    worker.begin_round()
    with torch.no_grad():
        worker.model.w.sub_(torch.tensor([0.1, -0.2, 0.0]))  # what "training" did locally
    grad = worker.pseudo_gradient()
    # delta = theta - theta_local: positive where the local step went down
    torch.testing.assert_close(grad.buffer, torch.tensor([0.1, -0.2, 0.0]), rtol=0, atol=1e-7)
    assert grad.buffer.dtype == torch.float32 and grad.buffer.is_contiguous()
    assert grad.buffer.data_ptr() != worker.theta.data_ptr()

    g1 = grad.buffer.clone()
    g2 = torch.tensor([-0.3, 0.05, 0.4])
    worker.apply_outer(g1, round_index=0)
    # step 1: buf = g1; update = g1 + 0.9 * buf = 1.9 g1; theta -= 0.7 * 1.9 g1
    expected1 = [t - 0.7 * 1.9 * g for t, g in zip(theta0, [0.1, -0.2, 0.0], strict=True)]
    torch.testing.assert_close(worker.theta, torch.tensor(expected1), rtol=0, atol=1e-6)
    # the outer step moves theta the way the local training went
    assert worker.theta[0] < theta0[0] and worker.theta[1] > theta0[1]
    worker.apply_outer(g2, round_index=1)
    # step 2: buf = 0.9 g1 + g2; update = g2 + 0.9 * buf = 1.9 g2 + 0.81 g1
    expected2 = [
        e - 0.7 * (1.9 * b + 0.81 * a)
        for e, a, b in zip(expected1, [0.1, -0.2, 0.0], [-0.3, 0.05, 0.4], strict=True)
    ]
    torch.testing.assert_close(worker.theta, torch.tensor(expected2), rtol=0, atol=1e-6)
    momentum = worker.shared_state()[MOMENTUM_PREFIX + "w"]
    torch.testing.assert_close(momentum, 0.9 * g1 + g2, rtol=0, atol=1e-7)
    assert worker.revision == 2

    # and the same as torch's own SGD(lr=0.7, momentum=0.9, nesterov=True)
    reference = torch.tensor(theta0, requires_grad=True)
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    for g in (g1, g2):
        reference.grad = g.clone()
        sgd.step()
    torch.testing.assert_close(worker.theta, reference.detach(), rtol=0, atol=1e-6)


def test_apply_outer_refuses_bad_updates_and_leaves_theta_alone() -> None:
    worker = DiLoCoWorker(Vector([1.0, 2.0]), dummy_batches(), DiLoCoSettings())
    before = worker.state_hash()
    with pytest.raises(OuterUpdateError, match="shape"):
        worker.apply_outer(torch.zeros(3))
    with pytest.raises(OuterUpdateError, match="float32"):
        worker.apply_outer(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(OuterUpdateError, match="NaN"):
        worker.apply_outer(torch.tensor([0.0, float("nan")]))
    with pytest.raises(RoundOrderError):
        worker.apply_outer(torch.zeros(2), round_index=1)
    assert worker.state_hash() == before and worker.revision == 0


def test_a_nan_inner_loss_stops_the_round_before_touching_the_optimizer() -> None:
    calls = []

    def loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        scale = float("nan") if len(calls) == 3 else 1.0
        return (model.w * scale).sum()

    worker = DiLoCoWorker(
        Vector([1.0, 2.0]), dummy_batches(), DiLoCoSettings(inner_steps=5), loss_fn=loss
    )
    worker.begin_round()
    with pytest.raises(InnerLossNotFiniteError):
        worker.run_inner_steps()
    assert worker.inner_step == 2
    assert int(worker.inner.state[worker.model.w]["step"]) == 2
    assert torch.isfinite(worker.model.w).all()


def test_inner_lr_warms_up_linearly_then_cosine_decays_to_the_floor() -> None:
    assert [warmup_lr(1.0, 4, k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # decay over steps 4..12 (after the warmup): halfway is the mean of 1 and the 0.1 floor
    assert warmup_lr(1.0, 4, 8, decay_steps=12) == pytest.approx(0.55)
    assert warmup_lr(1.0, 4, 12, decay_steps=12) == pytest.approx(0.1)
    assert warmup_lr(1.0, 4, 50, decay_steps=12) == pytest.approx(0.1)
    lrs = [warmup_lr(2e-3, 0, k, decay_steps=10, final_ratio=0.0) for k in range(11)]
    assert lrs[0] == 2e-3 and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in itertools.pairwise(lrs))
    # the worker's AdamW runs each inner step at the rule's lr (warmup 1, decay over 3)
    settings = DiLoCoSettings(
        inner_steps=1, inner_lr=1e-2, inner_warmup_steps=1, inner_decay_steps=3
    )
    tokens = torch.randint(0, 256, (512,), generator=torch.Generator().manual_seed(0))
    worker = DiLoCoWorker(
        build_model(TEST_CONFIG, seed=0),
        TokenBlocks(tokens, batch_size=2, context_tokens=16, seed=0),
        settings,
    )
    seen = []
    for _ in range(4):
        worker.train_round()
        seen.append(worker.inner.param_groups[0]["lr"])
    assert seen == pytest.approx([1e-2, 1e-2, 1e-2 * 0.55, 1e-3])


def test_weighted_mean_weights_by_tokens() -> None:
    grads = [
        PseudoGradient(0, 0, torch.tensor([1.0, 0.0]), tokens=300, inner_steps=3),
        PseudoGradient(0, 0, torch.tensor([0.0, 1.0]), tokens=100, inner_steps=1),
    ]
    torch.testing.assert_close(weighted_mean(grads), torch.tensor([0.75, 0.25]))
    idle = [PseudoGradient(0, 0, torch.zeros(2), tokens=0, inner_steps=0)] * 2
    assert torch.equal(weighted_mean(idle), torch.zeros(2))


def test_two_workers_make_the_tiny_models_eval_loss_fall() -> None:
    corpus = load_corpus(CorpusSettings(max_total_bytes=2**20))
    eval_batches = heldout_batches(
        corpus.heldout_tokens, batch_size=8, context_tokens=64, max_batches=4
    )
    settings = DiLoCoSettings(inner_steps=8, inner_lr=3e-3, inner_weight_decay=0.0)
    workers = [
        DiLoCoWorker(
            build_model("tiny", seed=0),
            TokenBlocks(corpus.train_shard(i, 2), batch_size=8, context_tokens=64, seed=i),
            settings,
        )
        for i in range(2)
    ]
    assert workers[0].state_hash() == workers[1].state_hash()  # same seed, same theta
    initial = workers[0].evaluate(eval_batches)
    for round_index in range(3):
        grads = [w.train_round() for w in workers]
        assert all(g.round_index == round_index and g.tokens == 8 * 8 * 64 for g in grads)
        assert not torch.equal(grads[0].buffer, grads[1].buffer)  # different shards
        mean = torch.stack([g.buffer for g in grads]).mean(dim=0)
        for w in workers:
            w.apply_outer(mean, round_index=round_index)
        assert workers[0].state_hash() == workers[1].state_hash()
    final = workers[0].evaluate(eval_batches)
    assert final == workers[1].evaluate(eval_batches)
    assert final < initial - 1.0, (initial, final)
    metrics = workers[0].metrics()
    assert metrics.revision == 3 and metrics.inner_step == 24
    assert metrics.tokens_total == 3 * 8 * 8 * 64
    assert metrics.eval_loss == final and metrics.train_loss is not None
    # the inner AdamW state carried over all three rounds
    embed = workers[0].model.embed.weight
    assert int(workers[0].inner.state[embed]["step"]) == 24
    assert metrics.tokens_per_s is not None and metrics.tokens_per_s > 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_budget_ends_the_round_before_it_would_overrun() -> None:
    clock = FakeClock()

    def two_seconds_per_batch(index: int) -> None:
        clock.now += 2.0

    settings = DiLoCoSettings(inner_steps=100, round_time_budget_s=7.0, inner_lr=1e-3)
    worker = DiLoCoWorker(
        build_model(TEST_CONFIG),
        dummy_batches(two_seconds_per_batch),
        settings,
        clock=clock,
    )
    grad = worker.train_round()
    # after 3 steps 6 s are used; a 4th would end at 8 s > 7 s, so the round stops at 3
    assert worker.last_report is not None
    assert worker.last_report.inner_steps == 3 == grad.inner_steps
    assert worker.last_report.elapsed_s == 6.0
    assert grad.tokens == 3 * 2 * 4
    assert worker.last_report.tokens_per_s == 24 / 6.0

    # a budget shorter than one step still runs min_inner_steps (default 1)
    short = DiLoCoSettings(inner_steps=100, round_time_budget_s=0.5)
    worker = DiLoCoWorker(
        build_model(TEST_CONFIG), dummy_batches(two_seconds_per_batch), short, clock=clock
    )
    assert worker.train_round().inner_steps == 1

    # without a budget, the round runs exactly inner_steps
    worker = DiLoCoWorker(
        build_model(TEST_CONFIG),
        dummy_batches(two_seconds_per_batch),
        DiLoCoSettings(inner_steps=5),
        clock=clock,
    )
    assert worker.train_round().inner_steps == 5


def test_overlapped_rounds_apply_each_average_one_round_late() -> None:
    coeffs = torch.tensor([1.0, -1.0, 2.0, -0.5])
    step = 0.02 * torch.sign(coeffs)  # two inner AdamW steps of lr 0.01 on a linear loss
    theta0 = torch.tensor([0.5, 0.25, -1.0, 2.0])
    seen_at_fetch: list[torch.Tensor] = []
    on_fetch: list[Callable[[], None]] = []

    def record(index: int) -> None:
        seen_at_fetch.append(worker.model.w.detach().clone())
        while on_fetch:
            on_fetch.pop()()

    settings = DiLoCoSettings(
        inner_steps=2, inner_lr=0.01, inner_weight_decay=0.0, inner_grad_clip_norm=None
    )
    worker = DiLoCoWorker(
        Vector(theta0.tolist()), dummy_batches(record), settings, loss_fn=linear_loss(coeffs)
    )
    rounds = OverlappedRounds(worker)

    g0 = rounds.train_round()
    g1 = rounds.train_round()  # round 0's all-reduce is still running
    assert (g0.round_index, g1.round_index) == (0, 1)
    assert torch.equal(seen_at_fetch[2], theta0)  # round 1 started from theta0 too
    torch.testing.assert_close(g0.buffer, step, rtol=0, atol=1e-5)
    torch.testing.assert_close(g1.buffer, step, rtol=0, atol=1e-5)
    assert rounds.outstanding == (0, 1)
    with pytest.raises(RoundOrderError):
        rounds.train_round()  # would leave three rounds outstanding
    with pytest.raises(RoundOrderError):
        rounds.apply(1, g1.buffer)  # round 0 comes first

    a0, a1 = 1.0 * g0.buffer, 3.0 * g1.buffer  # stand-ins for the swarm's averages
    rounds.apply(0, a0)
    theta1 = theta0 - 0.7 * 1.9 * a0
    torch.testing.assert_close(worker.theta, theta1, rtol=0, atol=1e-6)

    # round 2 starts from theta1; round 1's average lands while round 2 trains
    on_fetch.append(lambda: rounds.apply(1, a1))
    g2 = rounds.train_round()
    torch.testing.assert_close(seen_at_fetch[4], theta1, rtol=0, atol=0)
    theta2 = theta1 - 0.7 * (1.9 * a1 + 0.81 * a0)
    torch.testing.assert_close(worker.theta, theta2, rtol=0, atol=1e-6)
    # the pseudo-gradient is against the round's own start (theta1), not the moved theta
    assert g2.base_revision == 1
    torch.testing.assert_close(g2.buffer, step, rtol=0, atol=1e-5)
    assert rounds.outstanding == (2,) and worker.revision == 2

    # a newcomer that joins while round 2 is in flight takes the same average and matches
    newcomer = DiLoCoWorker(
        Vector([0.0] * 4), dummy_batches(), settings, loss_fn=linear_loss(coeffs)
    )
    newcomer.load_shared_state(worker.shared_state(), revision=worker.revision)
    joined = OverlappedRounds(newcomer, in_flight=2)
    assert joined.train_round().round_index == 3
    a2 = 0.5 * g2.buffer
    rounds.apply(2, a2)
    joined.apply(2, a2)
    assert newcomer.state_hash() == worker.state_hash() and newcomer.revision == 3


def test_fresh_worker_loading_shared_state_hashes_equal() -> None:
    settings = DiLoCoSettings(inner_steps=2, inner_lr=1e-2)
    trained = DiLoCoWorker(build_model(TEST_CONFIG, seed=1), token_batches(1), settings)
    for round_index in range(2):
        trained.apply_outer(trained.train_round().buffer, round_index=round_index)
    state = trained.shared_state()
    assert list(state) == sorted(state)
    assert PARAM_PREFIX + "embed.weight" in state
    assert MOMENTUM_PREFIX + "embed.weight" in state
    assert {n.split("/", 1)[0] for n in state} == {"param", "outer_momentum"}
    assert state[MOMENTUM_PREFIX + "embed.weight"].abs().sum() > 0

    fresh = DiLoCoWorker(build_model(TEST_CONFIG, seed=2), token_batches(2), settings)
    assert fresh.state_hash() != trained.state_hash()
    copied = {name: t.clone() for name, t in state.items()}
    fresh.load_shared_state(copied, revision=trained.revision)
    assert fresh.state_hash() == trained.state_hash() == shared_state_hash(copied)
    assert fresh.revision == 2
    assert not fresh.inner.state  # inner AdamW starts fresh for a newcomer
    # and the model it trains from is the loaded theta
    fresh.begin_round()
    assert torch.equal(fresh.model.embed.weight.detach(), state[PARAM_PREFIX + "embed.weight"])

    # the same bytes under another name order hash the same; one flipped bit does not
    reordered = dict(reversed(list(copied.items())))
    assert shared_state_hash(reordered) == shared_state_hash(copied)
    copied[PARAM_PREFIX + "embed.weight"].view(torch.int32)[0, 0] ^= 1
    assert shared_state_hash(copied) != trained.state_hash()
    # per-tensor hashes single out the one tensor a peer would have to fetch
    ours, theirs = shared_tensor_hashes(copied), shared_tensor_hashes(trained.shared_state())
    assert [n for n in ours if ours[n] != theirs[n]] == [PARAM_PREFIX + "embed.weight"]
    snapshot, revision = trained.snapshot_shared_state()
    assert revision == 2 and shared_state_hash(snapshot) == trained.state_hash()
    trained.apply_outer(torch.ones(trained.layout.numel), round_index=2)
    assert shared_state_hash(snapshot) != trained.state_hash()  # a copy, not views


def test_loading_mismatched_shared_state_is_refused_without_changes() -> None:
    worker = DiLoCoWorker(build_model(TEST_CONFIG), token_batches(0), DiLoCoSettings())
    before = worker.state_hash()
    good = {name: t.clone() for name, t in worker.shared_state().items()}
    missing = dict(good)
    missing.pop(PARAM_PREFIX + "embed.weight")
    with pytest.raises(SharedStateError, match="missing"):
        worker.load_shared_state(missing, revision=1)
    wrong_shape = dict(good)
    wrong_shape[PARAM_PREFIX + "embed.weight"] = torch.zeros(3)
    with pytest.raises(SharedStateError, match="expected"):
        worker.load_shared_state(wrong_shape, revision=1)
    nan = {name: t.clone() for name, t in good.items()}
    nan[MOMENTUM_PREFIX + "final_norm.weight"][0] = float("nan")
    with pytest.raises(SharedStateError, match="NaN"):
        worker.load_shared_state(nan, revision=1)
    assert worker.state_hash() == before and worker.revision == 0
