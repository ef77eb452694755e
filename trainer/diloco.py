"""DiLoCo on one worker: inner AdamW rounds, the pseudo-gradient, and the outer Nesterov step.

The network side (all-reduce, shared-state sync) is not here. What it gets:

- `DiLoCoWorker.train_round()` -> `PseudoGradient`: one flat contiguous fp32 CPU buffer
  `theta - theta_local` (so the all-reduce can work in place) and `tokens`, the weight.
- `DiLoCoWorker.apply_outer(averaged, round_index=...)`: theta.grad = averaged; outer step.
- `shared_state()` / `load_shared_state()` / `state_hash()`: the global params and the outer
  momentum as named tensors (`param/<name>`, `outer_momentum/<name>`), plus `revision`, the
  number of outer steps applied. A fresh worker that loads them hashes equal to the others.
- `OverlappedRounds`: bookkeeping for one-round-delayed outer updates (the all-reduce of
  round t runs while round t+1 trains, as in PCCL's async DiLoCo).

The global params theta and the outer momentum live in flat fp32 CPU tensors; named tensors
are views into them. The inner model may sit on any device.

Revision and round numbers: applying the average of round r takes theta from revision r to
revision r + 1. In the synchronous schedule round r trains from revision r; in the
overlapped schedule round r trains from revision max(r - 1, 0).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from trainer.checkpoint import tensor_raw_bytes
from trainer.data import Batch, evaluate_loss
from trainer.model import next_token_loss

PARAM_PREFIX = "param/"
MOMENTUM_PREFIX = "outer_momentum/"

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
Clock = Callable[[], float]


class OuterUpdateError(ValueError):
    """An averaged pseudo-gradient of the wrong shape, dtype or with NaN/inf values."""


class SharedStateError(ValueError):
    """Shared-state tensors that do not match this worker's model (names, shapes, dtypes)."""


class RoundOrderError(RuntimeError):
    """A round result applied out of order, or a round started with too many in flight."""


class InnerLossNotFiniteError(FloatingPointError):
    """An inner step's loss is NaN/inf. Raised before that step's backward pass, so theta and
    the inner optimizer state are untouched; `begin_round()` restarts from theta."""


@dataclass(frozen=True)
class DiLoCoSettings:
    """Inner (AdamW) and outer (SGD, Nesterov) hyperparameters and the round budget.

    A round ends after `inner_steps` steps or when the next step would overrun
    `round_time_budget_s` (predicted from the last step's duration), whichever is first,
    but never before `min_inner_steps` steps.
    """

    inner_steps: int = 500
    round_time_budget_s: float | None = None
    min_inner_steps: int = 1
    inner_lr: float = 4e-4
    inner_betas: tuple[float, float] = (0.9, 0.95)
    inner_eps: float = 1e-8
    inner_weight_decay: float = 0.1
    inner_warmup_steps: int = 0
    inner_decay_steps: int | None = None
    inner_grad_clip_norm: float | None = 1.0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    outer_nesterov: bool = True
    autocast_bf16: bool = False

    def __post_init__(self) -> None:
        if self.inner_steps < 1 or not 0 <= self.min_inner_steps <= self.inner_steps:
            raise ValueError("need inner_steps >= 1 and 0 <= min_inner_steps <= inner_steps")
        if self.round_time_budget_s is not None and not self.round_time_budget_s > 0:
            raise ValueError("round_time_budget_s must be positive or None")
        if not (self.inner_lr > 0 and self.outer_lr > 0 and 0 <= self.outer_momentum < 1):
            raise ValueError("need inner_lr > 0, outer_lr > 0 and 0 <= outer_momentum < 1")


@dataclass(frozen=True)
class ParamSlot:
    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


class ParamLayout:
    """Where each named parameter lives inside one flat buffer (named_parameters order)."""

    def __init__(self, named_shapes: Sequence[tuple[str, tuple[int, ...]]]) -> None:
        slots, offset = [], 0
        for name, shape in named_shapes:
            numel = math.prod(shape)
            slots.append(ParamSlot(name, tuple(shape), offset, numel))
            offset += numel
        self.slots: tuple[ParamSlot, ...] = tuple(slots)
        self.numel = offset

    @classmethod
    def of(cls, model: nn.Module) -> ParamLayout:
        return cls([(name, tuple(p.shape)) for name, p in model.named_parameters()])

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into `flat` (no copies)."""
        return {s.name: flat[s.offset : s.offset + s.numel].view(s.shape) for s in self.slots}


class OuterNesterovSGD:
    """SGD with (Nesterov) momentum on a flat fp32 theta, as torch.optim.SGD with dampening 0.

        buf = momentum * buf + grad
        step = grad + momentum * buf   (Nesterov)   or   buf   (plain momentum)
        theta = theta - lr * step

    Each line is done as separate elementwise ops, never a fused multiply-add: every op is
    then one IEEE-rounded result, so peers with different vector units stay bit-identical.
    The momentum buffer starts at zero, which gives torch's first step (buf = grad) exactly.
    """

    def __init__(self, theta: torch.Tensor, *, lr: float, momentum: float, nesterov: bool) -> None:
        self.theta = theta
        self.momentum_buffer = torch.zeros_like(theta)
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov

    def step(self, grad: torch.Tensor) -> None:
        buf = self.momentum_buffer
        buf.mul_(self.momentum)
        buf.add_(grad)
        if self.nesterov:
            update = torch.mul(buf, self.momentum)
            update.add_(grad)
        else:
            update = buf.clone()
        update.mul_(self.lr)
        self.theta.sub_(update)


@dataclass(frozen=True)
class PseudoGradient:
    """theta_base - theta_local after one round, flat fp32 on CPU, with its weight.

    `tokens` is the number of training tokens the round processed: the weight of this
    worker in a weighted average. `base_revision` is the theta revision the round began from.
    """

    round_index: int
    base_revision: int
    buffer: torch.Tensor
    tokens: int
    inner_steps: int


@dataclass(frozen=True)
class RoundReport:
    round_index: int
    inner_steps: int
    tokens: int
    mean_loss: float
    last_loss: float
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class TrainingMetrics:
    revision: int
    inner_step: int
    tokens_total: int
    train_loss: float | None
    tokens_per_s: float | None
    eval_loss: float | None


def warmup_lr(
    lr: float,
    warmup_steps: int,
    step: int,
    *,
    decay_steps: int | None = None,
    final_ratio: float = 0.1,
) -> float:
    """`lr` ramped linearly over the first `warmup_steps` steps (step counts from 0); with
    `decay_steps`, then cosine-decayed to `lr * final_ratio` at step `decay_steps` and held."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if decay_steps is None or decay_steps <= warmup_steps:
        return lr
    progress = min((step - warmup_steps) / (decay_steps - warmup_steps), 1.0)
    return lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def weighted_mean(grads: Sequence[PseudoGradient]) -> torch.Tensor:
    """sum(tokens_i * delta_i) / sum(tokens_i): what a weighted all-reduce computes.

    All-zero weights give the plain mean (no worker did any work, so all deltas are zero).
    """
    if not grads:
        raise OuterUpdateError("no pseudo-gradients to average")
    total = sum(g.tokens for g in grads)
    if total == 0:
        return torch.stack([g.buffer for g in grads]).mean(dim=0)
    out = torch.zeros_like(grads[0].buffer)
    for g in grads:
        out.add_(g.buffer * float(g.tokens))
    return out.div_(float(total))


def _update_with_tensor(digest: hashlib._Hash, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous()
    digest.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
    digest.update(tensor_raw_bytes(t))


def shared_state_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, raw bytes) of each tensor, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        _update_with_tensor(digest, name, tensors[name])
    return digest.hexdigest()


def shared_tensor_hashes(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """SHA-256 of each tensor's (name, dtype, shape, raw bytes), by name: what a peer
    compares to fetch only the tensors that differ from the popular state."""
    out = {}
    for name in sorted(tensors):
        digest = hashlib.sha256()
        _update_with_tensor(digest, name, tensors[name])
        out[name] = digest.hexdigest()
    return out


class DiLoCoWorker:
    """One DiLoCo replica: owns theta (global params), the outer optimizer and the inner AdamW.

    `model` holds the local params theta_local on its device; its current weights become
    the initial theta. `batches` yields (inputs, targets) on any device. `clock` returns
    seconds (monotonic) and is only used for the round time budget and tokens/s.
    The inner AdamW state persists across rounds; a new worker starts it fresh.

    Thread use: `apply_outer` may run on another thread while a round trains in the
    overlapped schedule; theta is guarded by a lock and the round keeps its own base copy.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterator[Batch],
        settings: DiLoCoSettings | None = None,
        *,
        clock: Clock = time.monotonic,
        loss_fn: LossFn = next_token_loss,
        revision: int = 0,
    ) -> None:
        self.settings = settings or DiLoCoSettings()
        self.model = model
        self.batches = batches
        self.clock = clock
        self.loss_fn = loss_fn
        self.layout = ParamLayout.of(model)
        self.device = next(model.parameters()).device
        self._params = [p for _, p in model.named_parameters()]
        self.theta = self._gather_local()
        self.outer = OuterNesterovSGD(
            self.theta,
            lr=self.settings.outer_lr,
            momentum=self.settings.outer_momentum,
            nesterov=self.settings.outer_nesterov,
        )
        self.inner = torch.optim.AdamW(
            model.parameters(),
            lr=self.settings.inner_lr,
            betas=self.settings.inner_betas,
            eps=self.settings.inner_eps,
            weight_decay=self.settings.inner_weight_decay,
        )
        self.revision = revision
        self.inner_step = 0
        self.tokens_total = 0
        self.last_report: RoundReport | None = None
        self.last_eval_loss: float | None = None
        self._lock = threading.Lock()
        self._round_base: torch.Tensor | None = None
        self._round_base_revision = revision

    # -- theta <-> local model ------------------------------------------------------------

    def _gather_local(self) -> torch.Tensor:
        """The local model's params as one new flat fp32 CPU tensor."""
        flat = torch.empty(self.layout.numel, dtype=torch.float32)
        for slot, param in zip(self.layout.slots, self._params, strict=True):
            flat[slot.offset : slot.offset + slot.numel].copy_(param.detach().reshape(-1))
        return flat

    def begin_round(self, *, keep_base_copy: bool = False) -> None:
        """Load theta into the local model. With `keep_base_copy`, remember this theta as the
        round's base so theta may change (an outer step) while the round trains."""
        with self._lock, torch.no_grad():
            for slot, param in zip(self.layout.slots, self._params, strict=True):
                src = self.theta[slot.offset : slot.offset + slot.numel].view(slot.shape)
                param.copy_(src)
            self._round_base = self.theta.clone() if keep_base_copy else None
            self._round_base_revision = self.revision

    # -- inner loop -----------------------------------------------------------------------

    def _inner_lr(self) -> float:
        s = self.settings
        return warmup_lr(
            s.inner_lr, s.inner_warmup_steps, self.inner_step, decay_steps=s.inner_decay_steps
        )

    def _inner_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        for group in self.inner.param_groups:
            group["lr"] = self._inner_lr()
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
            if self.settings.autocast_bf16
            else contextlib.nullcontext()
        )
        with autocast:
            loss = self.loss_fn(self.model, inputs, targets)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise InnerLossNotFiniteError(f"inner step {self.inner_step} loss is {value}")
        self.inner.zero_grad(set_to_none=True)
        loss.backward()
        if self.settings.inner_grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.inner_grad_clip_norm)
        self.inner.step()
        self.inner_step += 1
        return value

    def run_inner_steps(self, round_index: int | None = None) -> RoundReport:
        """Inner AdamW steps until `inner_steps` or the time budget (see DiLoCoSettings)."""
        settings = self.settings
        self.model.train()
        start = self.clock()
        last_step_s = 0.0
        steps, tokens, loss_sum, last_loss = 0, 0, 0.0, float("nan")
        while steps < settings.inner_steps:
            if settings.round_time_budget_s is not None and steps >= settings.min_inner_steps:
                elapsed = self.clock() - start
                if elapsed + last_step_s > settings.round_time_budget_s:
                    break
            step_start = self.clock()
            inputs, targets = next(self.batches)
            last_loss = self._inner_step(inputs, targets)
            last_step_s = self.clock() - step_start
            steps += 1
            tokens += targets.numel()
            loss_sum += last_loss
        report = RoundReport(
            round_index=self.revision if round_index is None else round_index,
            inner_steps=steps,
            tokens=tokens,
            mean_loss=loss_sum / steps if steps else float("nan"),
            last_loss=last_loss,
            elapsed_s=self.clock() - start,
        )
        self.tokens_total += tokens
        self.last_report = report
        return report

    def pseudo_gradient(self, round_index: int | None = None) -> PseudoGradient:
        """theta_base - theta_local as a new flat contiguous fp32 CPU buffer.

        theta_base is the round's base copy if `begin_round(keep_base_copy=True)` made one,
        else the current theta (the synchronous schedule, where theta does not move mid-round).
        """
        local = self._gather_local()
        with self._lock:
            base = self._round_base if self._round_base is not None else self.theta
            delta = torch.sub(base, local, out=local)  # in place into the fresh gather
        report = self.last_report
        return PseudoGradient(
            round_index=self.revision if round_index is None else round_index,
            base_revision=self._round_base_revision,
            buffer=delta,
            tokens=report.tokens if report else 0,
            inner_steps=report.inner_steps if report else 0,
        )

    def train_round(self) -> PseudoGradient:
        """Synchronous round: load theta, train, return the pseudo-gradient of round `revision`."""
        self.begin_round()
        self.run_inner_steps(self.revision)
        return self.pseudo_gradient(self.revision)

    # -- outer step -----------------------------------------------------------------------

    def apply_outer(self, averaged: torch.Tensor, *, round_index: int | None = None) -> None:
        """Set theta.grad = `averaged` and step the outer optimizer; revision += 1.

        `averaged` must be a flat fp32 tensor of theta's size with finite values. If
        `round_index` is given it must equal the current revision (round r moves theta
        from revision r to r + 1), so a stale or repeated result is refused.
        """
        if averaged.dim() != 1 or averaged.numel() != self.layout.numel:
            raise OuterUpdateError(
                f"averaged pseudo-gradient has shape {tuple(averaged.shape)}, "
                f"expected ({self.layout.numel},)"
            )
        if averaged.dtype != torch.float32:
            raise OuterUpdateError(
                f"averaged pseudo-gradient must be float32, got {averaged.dtype}"
            )
        grad = averaged.to("cpu")
        if not bool(torch.isfinite(grad).all()):
            raise OuterUpdateError("averaged pseudo-gradient contains NaN or inf")
        with self._lock:
            if round_index is not None and round_index != self.revision:
                raise RoundOrderError(
                    f"result of round {round_index} cannot apply at revision {self.revision}"
                )
            self.outer.step(grad)
            self.revision += 1

    # -- shared state ---------------------------------------------------------------------

    def shared_state(self) -> dict[str, torch.Tensor]:
        """Named views of theta and the outer momentum (no copies; sorted names)."""
        named = {PARAM_PREFIX + n: t for n, t in self.layout.views(self.theta).items()}
        momentum = self.layout.views(self.outer.momentum_buffer)
        named.update({MOMENTUM_PREFIX + n: t for n, t in momentum.items()})
        return dict(sorted(named.items()))

    def snapshot_shared_state(self) -> tuple[dict[str, torch.Tensor], int]:
        """Copies of the shared tensors and their revision, taken together under the lock,
        so a checkpoint or a sync donor never sees half of an outer step."""
        with self._lock:
            return {n: t.clone() for n, t in self.shared_state().items()}, self.revision

    def load_shared_state(self, tensors: Mapping[str, torch.Tensor], *, revision: int) -> None:
        """Replace theta and the outer momentum with `tensors` (same names, shapes, fp32,
        finite) and set `revision`. Checks everything before changing anything.
        Call `begin_round()` afterwards to load the new theta into the model."""
        own = self.shared_state()
        if set(tensors) != set(own):
            missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
            raise SharedStateError(f"shared state names differ: missing {missing}, extra {extra}")
        for name, target in own.items():
            src = tensors[name]
            if tuple(src.shape) != tuple(target.shape) or src.dtype != target.dtype:
                raise SharedStateError(
                    f"{name}: got {src.dtype}{tuple(src.shape)}, "
                    f"expected {target.dtype}{tuple(target.shape)}"
                )
            if not bool(torch.isfinite(src).all()):
                raise SharedStateError(f"{name} contains NaN or inf")
        if revision < 0:
            raise SharedStateError(f"revision must be non-negative, got {revision}")
        with self._lock, torch.no_grad():
            for name, target in own.items():
                target.copy_(tensors[name])
            self.revision = revision

    def state_hash(self) -> str:
        return shared_state_hash(self.shared_state())

    # -- metrics --------------------------------------------------------------------------

    def evaluate(self, batches: Sequence[Batch]) -> float:
        """Held-out loss of the *global* params theta. It loads theta into the local model,
        so call it between rounds, not while a round trains."""
        self.begin_round()
        self.last_eval_loss = evaluate_loss(self.model, batches, self.device)
        return self.last_eval_loss

    def metrics(self) -> TrainingMetrics:
        report = self.last_report
        return TrainingMetrics(
            revision=self.revision,
            inner_step=self.inner_step,
            tokens_total=self.tokens_total,
            train_loss=report.last_loss if report else None,
            tokens_per_s=report.tokens_per_s if report else None,
            eval_loss=self.last_eval_loss,
        )


class OverlappedRounds:
    """One-round-delayed outer updates: round r trains while round r-1's all-reduce runs.

    Driver loop (the all-reduce is the network side's; the calls may come from 2 threads):

        grad_r = rounds.train_round()          # trains from theta as it is now
        # meanwhile the all-reduce of round r-1 finishes:
        rounds.apply(r - 1, averaged_r_minus_1)
        # start the all-reduce of grad_r; then train round r + 1

    Round r's pseudo-gradient is taken against the theta it started from (a copy is kept,
    since round r-1's update may land mid-round) and is applied to the theta of revision r,
    which already holds round r-1's update: a staleness of one round. A round may start
    while at most one earlier result is outstanding; results must be applied in order.

    An all-reduce that cannot complete is retried with the survivors; a worker left alone
    applies its own pseudo-gradient (the mean of one), so round numbers never skip.

    A worker that joins while round j's all-reduce is in flight (it loaded shared state at
    revision j) passes `in_flight=j`: it trains round j + 1 at once and applies round j's
    average when the others do, so its theta stays equal to theirs.
    """

    def __init__(self, worker: DiLoCoWorker, *, in_flight: int | None = None) -> None:
        self.worker = worker
        if in_flight is not None and in_flight != worker.revision:
            raise RoundOrderError(
                f"round {in_flight} cannot be in flight at revision {worker.revision}"
            )
        self._outstanding: deque[int] = deque([] if in_flight is None else [in_flight])
        self.next_round = worker.revision if in_flight is None else in_flight + 1

    @property
    def outstanding(self) -> tuple[int, ...]:
        """Rounds whose pseudo-gradient exists but whose average is not applied yet."""
        return tuple(self._outstanding)

    def train_round(self) -> PseudoGradient:
        if len(self._outstanding) > 1:
            raise RoundOrderError(
                f"rounds {list(self._outstanding)} are outstanding; apply round "
                f"{self._outstanding[0]} before starting round {self.next_round}"
            )
        round_index = self.next_round
        worker = self.worker
        worker.begin_round(keep_base_copy=True)
        worker.run_inner_steps(round_index)
        grad = worker.pseudo_gradient(round_index)
        self._outstanding.append(round_index)
        self.next_round += 1
        return grad

    def apply(self, round_index: int, averaged: torch.Tensor) -> None:
        """Apply the averaged pseudo-gradient of `round_index` (the oldest outstanding)."""
        if not self._outstanding or self._outstanding[0] != round_index:
            raise RoundOrderError(
                f"round {round_index} is not the oldest outstanding round "
                f"(outstanding: {list(self._outstanding)})"
            )
        self.worker.apply_outer(averaged, round_index=round_index)
        self._outstanding.popleft()
