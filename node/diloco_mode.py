"""``--train diloco``: the node trains its replica with DiLoCo and averages with the swarm.

Each round: H inner AdamW steps (or ``diloco_round_time_s`` of them) on this node's shard of
the text, in a worker thread (``trio.to_thread``) so the event loop keeps answering heartbeats
and ``shoal status``; then the group all-reduces the pseudo-gradient (global params minus
local params) weighted by the tokens each member processed, and every member applies the same
outer Nesterov step to the same global params, so they stay bit-identical.

Shared state (what a joiner fetches, what the vote after a skipped round compares): the global
params and the outer momentum (``param/<name>``, ``outer_momentum/<name>``) at a revision, the
number of outer steps applied. It is published to the group only after the outer step of a
round is applied, so a joiner admitted for the next round receives the state that round starts
from (``AllReduceGroup.allreduce(mark_state=False)`` + ``publish_state``).

Skipped rounds: alone in the group, the node applies its own pseudo-gradient (the mean of one)
and goes on training; with others around it drops the round's work and takes the group's
state through the shared-state vote; if its rounds keep being skipped (the group went on
without it) it joins the group again as a newcomer.

Overlapped mode (``diloco_overlapped``): the all-reduce of round r runs on the event loop
while round r + 1's inner steps run in the thread, and round r's average is applied when
round r + 1 ends (one-round-delayed outer update, as async DiLoCo). A node that joins (or
resyncs) takes part in the round in flight with weight 0 and applies its average with the
others (``trainer.diloco.OverlappedRounds(in_flight=...)``).

Checkpoints: the shared state every ``diloco_checkpoint_every`` outer steps, as safetensors
under ``<home>/checkpoints`` (``trainer.checkpoint``); a restarted node resumes from the
newest one (and, when the swarm is ahead, the newcomer sync replaces it with the swarm's).
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import trio

from node.collective import AllReduceGroup
from protocols.allreduce import Completed
from protocols.codec import Compression
from protocols.shared_state import SharedState
from trainer.checkpoint import CheckpointError, load_latest_checkpoint, save_checkpoint
from trainer.data import Batch, CorpusSettings, TokenBlocks, heldout_batches, load_corpus
from trainer.diloco import (
    DiLoCoSettings,
    DiLoCoWorker,
    InnerLossNotFiniteError,
    OuterUpdateError,
    OverlappedRounds,
    PseudoGradient,
    SharedStateError,
)
from trainer.model import build_model, model_config

if TYPE_CHECKING:
    from node.config import NodeConfig
    from node.daemon import Node

log = logging.getLogger("shoal.node.diloco")

HISTORY_ROUNDS = 200
TENSOR_NAME = "pseudo_gradient"


@dataclass(frozen=True)
class DiLoCoModeSettings:
    """The ``diloco_*`` config keys, in the units the mode uses."""

    model: str
    seed: int
    inner: DiLoCoSettings
    overlapped: bool
    batch_size: int
    corpus: CorpusSettings
    shards: int
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    threads: int
    compression: Compression

    @classmethod
    def from_config(cls, c: NodeConfig) -> DiLoCoModeSettings:
        return cls(
            model=c.diloco_model,
            seed=c.diloco_seed,
            inner=DiLoCoSettings(
                inner_steps=c.diloco_inner_steps,
                round_time_budget_s=c.diloco_round_time_s or None,
                inner_lr=c.diloco_inner_lr,
                outer_lr=c.diloco_outer_lr,
                outer_momentum=c.diloco_outer_momentum,
            ),
            overlapped=c.diloco_overlapped,
            batch_size=c.diloco_batch_size,
            corpus=CorpusSettings(sources=c.diloco_data, max_total_bytes=c.diloco_corpus_bytes),
            shards=c.diloco_shards,
            eval_every=c.diloco_eval_every,
            eval_batches=c.diloco_eval_batches,
            checkpoint_every=c.diloco_checkpoint_every,
            threads=c.diloco_threads,
            compression=Compression(c.allreduce_compression),
        )


def shard_of(peer_id: str, shards: int) -> int:
    """This node's shard of the train text: a stable hash of its peer id (crc32)."""
    return zlib.crc32(peer_id.encode()) % shards


class StopTraining(Exception):
    """The node is stopping: raised inside the inner steps at the next batch."""


class _CountingBatches:
    """Wraps the batch iterator: the event loop sees the inner step of a running round, and
    a stopping node ends the round's inner steps at the next batch (a torch step in a thread
    cannot be cancelled; this makes a graceful stop wait one step, not a round)."""

    def __init__(self, inner: Iterator[Batch]) -> None:
        self.inner = inner
        self.drawn = 0
        self.stop = threading.Event()

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.stop.is_set():
            raise StopTraining
        batch = next(self.inner)
        self.drawn += 1
        return batch


class DiLoCoMode:
    """The DiLoCo training mode of one node (see the module doc)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.settings = DiLoCoModeSettings.from_config(node.config)
        self.phase = "loading"
        self.error: str | None = None
        self.worker: DiLoCoWorker | None = None
        self.heldout: list[Batch] = []
        self.batches: _CountingBatches | None = None
        self.round_started_drawn = 0
        self.shard = shard_of(node.peer_id, self.settings.shards)
        self.resumed_revision: int | None = None
        self.initial_eval_loss: float | None = None
        self.state_hash = ""
        self.bytes_last_round = 0
        self.bytes_total = 0
        self.rounds_completed = 0
        self.rounds_skipped = 0
        self.last_members: list[str] = []
        self.last_checkpoint: str | None = None
        self.last_checkpoint_revision: int | None = None
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_ROUNDS)
        self._published: SharedState | None = None
        self._dropped = False  # the last round's inner steps hit a NaN/inf loss

    # ------------------------------------------------------------------ set-up (thread)

    def _build(self) -> None:
        s = self.settings
        if s.threads:
            torch.set_num_threads(s.threads)
        config = model_config(s.model)
        corpus = load_corpus(s.corpus)
        shard = corpus.train_shard(self.shard, s.shards)
        seed = zlib.crc32(self.node.peer_id.encode())
        self.batches = _CountingBatches(
            TokenBlocks(
                shard, batch_size=s.batch_size, context_tokens=config.context_tokens, seed=seed
            )
        )
        self.heldout = heldout_batches(
            corpus.heldout_tokens,
            batch_size=s.batch_size,
            context_tokens=config.context_tokens,
            max_batches=s.eval_batches,
        )
        model = build_model(config, seed=s.seed)
        worker = DiLoCoWorker(model, self.batches, s.inner)
        try:
            checkpoint = load_latest_checkpoint(self.node.config.home)
        except CheckpointError as exc:
            log.error("cannot read the newest checkpoint (%s); starting from scratch", exc)
            checkpoint = None
        if checkpoint is not None:
            try:
                revision = int(checkpoint.metadata["revision"])
                worker.load_shared_state(checkpoint.tensors, revision=revision)
                self.resumed_revision = revision
                log.info("resumed from %s at revision %d", checkpoint.path, revision)
            except SharedStateError as exc:
                log.error(
                    "checkpoint %s does not fit model %r (%s); starting from scratch",
                    checkpoint.path,
                    s.model,
                    exc,
                )
        if s.eval_every:  # the loss the training starts from, for the status and the demo
            self.initial_eval_loss = worker.evaluate(self.heldout)
        self.worker = worker
        self.state_hash = worker.state_hash()
        log.info(
            "DiLoCo: model %s (%d params), shard %d of %d (%d tokens), %d held-out batches",
            s.model,
            worker.layout.numel,
            self.shard,
            s.shards,
            shard.numel(),
            len(self.heldout),
        )

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        try:
            await trio.to_thread.run_sync(self._build)
        except Exception as exc:  # bad data path, too little text, ...: say so, keep the node
            self.phase, self.error = "error", f"{type(exc).__name__}: {exc}"
            log.error("DiLoCo training cannot start: %s", self.error)
            return
        group = self.node._make_group(workload="diloco")
        self._publish(group)  # before the group runs: a joiner's first query gets real state
        self.node.group = group
        async with trio.open_nursery() as nursery:
            nursery.start_soon(group.run)
            try:
                await self._train(group)
            except StopTraining:
                log.info("DiLoCo: inner steps ended for the node's stop")
            except Exception as exc:  # a bug or a torch error: say so, keep the node up
                self.phase, self.error = "error", f"{type(exc).__name__}: {exc}"
                log.exception("DiLoCo training stopped")
            finally:  # on a graceful stop too: keep the outer steps done since the last one
                await self._final_checkpoint()
            # this node no longer takes part in rounds: leave the group (the node stays up)
            self.node.group = None
            nursery.cancel_scope.cancel()

    async def _train(self, group: AllReduceGroup) -> None:
        """Join, train, and join again whenever the group went on without this node; returns
        only when this node cannot train with the group (the reason is in ``self.error``)."""
        while True:
            self.phase = "joining"
            await group.wait_member()
            joined = await self._adopt_group_state(group)
            if joined is None:
                return
            if self.settings.overlapped:
                await self._overlapped_rounds(group, joined)
            else:
                await self._rounds(group)
            log.info("DiLoCo: rounds keep being skipped; joining the group again")
            self._publish(group)
            group.request_rejoin()

    def request_stop(self) -> None:
        """The node is leaving: end the inner steps at the next batch (any thread)."""
        if self.batches is not None:
            self.batches.stop.set()

    def _require_worker(self) -> DiLoCoWorker:
        assert self.worker is not None
        return self.worker

    async def _adopt_group_state(self, group: AllReduceGroup) -> bool | None:
        """Load the group's state if the newcomer sync fetched one; True if it did, None if
        it cannot be loaded (another model)."""
        state = group.state
        if state is self._published and state.bytes_fetched == 0:
            if self._alone(group):
                return False
            changed = await self._resync(group)  # the newcomer fetch failed: vote again
            self._publish(group)
            return changed
        worker = self._require_worker()
        try:
            await trio.to_thread.run_sync(
                lambda: worker.load_shared_state(state.tensors, revision=state.revision)
            )
        except SharedStateError as exc:
            self.phase = "error"
            self.error = (
                f"the group's shared state does not fit model {self.settings.model!r} ({exc}); "
                "start this node with the swarm's diloco_model"
            )
            log.error("DiLoCo: %s", self.error)
            return None
        self.state_hash = await trio.to_thread.run_sync(worker.state_hash)
        log.info("DiLoCo: took the group's state at revision %d", state.revision)
        self._publish(group)
        return True

    def _publish(self, group: AllReduceGroup) -> None:
        tensors, revision = self._require_worker().snapshot_shared_state()
        group.publish_state(tensors, revision)
        self._published = group.state

    def _train_round(self, start: Any) -> PseudoGradient:
        """One round's inner steps (thread). A NaN/inf loss drops the round's work: the node
        contributes a zero pseudo-gradient with weight 0 and starts the next round from theta."""
        worker = self._require_worker()
        assert self.batches is not None
        self.round_started_drawn = self.batches.drawn
        try:
            grad: PseudoGradient = start()
        except InnerLossNotFiniteError as exc:
            log.warning("DiLoCo: %s; this round contributes nothing", exc)
            self._dropped = True
            zero = torch.zeros(worker.layout.numel, dtype=torch.float32)
            return PseudoGradient(worker.revision, worker.revision, zero, 0, 0)
        return grad

    async def _allreduce(self, group: AllReduceGroup, grad: PseudoGradient) -> Any:
        sent_before = self._bytes_sent(group)
        result = await group.allreduce(
            {TENSOR_NAME: grad.buffer},
            float(grad.tokens),
            self.settings.compression,
            mark_state=False,
        )
        self.bytes_last_round = max(0, self._bytes_sent(group) - sent_before)
        self.bytes_total += self.bytes_last_round
        return result

    @staticmethod
    def _bytes_sent(group: AllReduceGroup) -> int:
        return sum(c.bytes_sent for c in group.transport.bulk.channels.values())

    @staticmethod
    def _alone(group: AllReduceGroup) -> bool:
        assert group.runner is not None
        machine = group.runner.machine
        return not (machine.view - machine.lost - {machine.me})

    def _left_behind(self, group: AllReduceGroup, skipped_in_a_row: int) -> bool:
        assert group.runner is not None
        return (
            group.runner.machine.left_behind_at is not None
            or skipped_in_a_row >= group.settings.rejoin_after_skips
        )

    async def _resync(self, group: AllReduceGroup) -> bool:
        """After a skipped round with others around: take the group's most popular state;
        True if this node's state changed."""
        worker = self._require_worker()
        self.phase = "syncing"
        tensors, revision = worker.snapshot_shared_state()
        try:
            fetched = await group.sync_shared_state(tensors, revision)
        except Exception as exc:  # no answer, a bad donor: train on and vote again next time
            log.warning("DiLoCo: shared-state sync failed: %s", exc)
            return False
        if fetched or group.state.revision != revision:
            new_revision = group.state.revision
            await trio.to_thread.run_sync(
                lambda: worker.load_shared_state(tensors, revision=new_revision)
            )
            log.info("DiLoCo: synced to the group's state at revision %d", new_revision)
            return True
        return False

    async def _rounds(self, group: AllReduceGroup) -> None:
        """The synchronous schedule; returns when this node should join the group again."""
        worker = self._require_worker()
        skipped_in_a_row = 0
        while True:
            self.phase = "inner"
            started = time.monotonic()
            grad = await trio.to_thread.run_sync(self._train_round, worker.train_round)
            self.phase = "allreduce"
            result = await self._allreduce(group, grad)
            outcome = result.outcome
            if isinstance(outcome, Completed):
                skipped_in_a_row = 0
                await trio.to_thread.run_sync(self._apply, grad, grad.round_index)
            elif self._alone(group):
                await trio.to_thread.run_sync(self._apply, grad, grad.round_index)
            else:
                skipped_in_a_row += 1
                if self._left_behind(group, skipped_in_a_row):
                    self._record(outcome, grad, started)
                    return
                await self._resync(group)
            await self._after_round(group, outcome, grad, started)

    def _apply(self, grad: PseudoGradient, round_index: int) -> bool:
        """The outer step with an averaged pseudo-gradient (thread). An average with NaN/inf
        (an fp16 overflow, say) is refused by every member alike, since all hold the same
        bytes: logged, and the round is lost for all."""
        try:
            self._require_worker().apply_outer(grad.buffer, round_index=round_index)
        except OuterUpdateError as exc:
            log.warning("DiLoCo: round %d's average refused: %s", round_index, exc)
            return False
        return True

    async def _overlapped_rounds(self, group: AllReduceGroup, joined: bool) -> None:
        """One-round-delayed outer updates (see the module doc); returns to rejoin."""
        worker = self._require_worker()
        rounds, pending = OverlappedRounds(worker), None
        if joined:  # take part in the round in flight with nothing to add
            rounds, pending = self._in_flight_restart()
        skipped_in_a_row = 0
        while True:
            started = time.monotonic()
            self.phase = "inner+allreduce" if pending is not None else "inner"
            self._dropped = False
            fresh, result = await self._train_while_reducing(group, rounds, pending)
            if pending is not None:
                outcome = result.outcome
                if not (isinstance(outcome, Completed) or self._alone(group)):
                    # skipped with others around: drop both rounds' work, take the group's state
                    skipped_in_a_row += 1
                    self._record(outcome, pending, started)
                    if self._left_behind(group, skipped_in_a_row):
                        return
                    await self._resync(group)
                    self._publish(group)
                    rounds, pending = self._in_flight_restart()
                    continue
                skipped_in_a_row = 0 if isinstance(outcome, Completed) else skipped_in_a_row
                try:
                    await trio.to_thread.run_sync(rounds.apply, pending.round_index, pending.buffer)
                except OuterUpdateError as exc:  # the same bytes everywhere: refused by all
                    log.warning("DiLoCo: round %d's average refused: %s", pending.round_index, exc)
                    self._publish(group)
                    rounds, pending = self._in_flight_restart()
                    continue
                await self._after_round(group, outcome, pending, started)
            pending = fresh
            if self._dropped:  # the fresh round hit a NaN loss: it never became outstanding
                rounds, pending = self._in_flight_restart()

    def _in_flight_restart(self) -> tuple[OverlappedRounds, PseudoGradient]:
        """Bookkeeping for a node that takes part in the round in flight with nothing to add
        (weight 0) and applies its average with the others."""
        worker = self._require_worker()
        zero = torch.zeros(worker.layout.numel, dtype=torch.float32)
        rounds = OverlappedRounds(worker, in_flight=worker.revision)
        return rounds, PseudoGradient(worker.revision, worker.revision, zero, 0, 0)

    async def _train_while_reducing(
        self, group: AllReduceGroup, rounds: OverlappedRounds, pending: PseudoGradient | None
    ) -> tuple[PseudoGradient, Any]:
        """Round r + 1's inner steps (thread) while round r's all-reduce runs (event loop)."""
        results: dict[str, Any] = {"result": None}

        async def reduce(grad: PseudoGradient) -> None:
            results["result"] = await self._allreduce(group, grad)

        async with trio.open_nursery() as nursery:
            if pending is not None:
                nursery.start_soon(reduce, pending)
            fresh = await trio.to_thread.run_sync(self._train_round, rounds.train_round)
        return fresh, results["result"]

    async def _after_round(
        self, group: AllReduceGroup, outcome: Any, grad: PseudoGradient, started: float
    ) -> None:
        """Publish the new state, then eval and checkpoint when due, and record the round."""
        worker = self._require_worker()
        self._publish(group)
        self.state_hash = await trio.to_thread.run_sync(worker.state_hash)
        s = self.settings
        eval_loss = None
        # no inner steps run now (also in the overlapped schedule: the next round's pseudo-
        # gradient is already taken), so the model may hold theta for the eval
        if s.eval_every and worker.revision % s.eval_every == 0:
            self.phase = "eval"
            eval_loss = await trio.to_thread.run_sync(worker.evaluate, self.heldout)
        if s.checkpoint_every and worker.revision % s.checkpoint_every == 0:
            self.phase = "checkpoint"
            await trio.to_thread.run_sync(self._checkpoint)
        self._record(outcome, grad, started, eval_loss)

    async def _final_checkpoint(self) -> None:
        worker = self.worker
        if not self.settings.checkpoint_every or worker is None or worker.revision == 0:
            return
        if self.last_checkpoint_revision == worker.revision:
            return
        with trio.CancelScope(shield=True):  # the node's stop cancels us: finish the write
            await trio.to_thread.run_sync(self._checkpoint)

    def _checkpoint(self) -> None:
        tensors, revision = self._require_worker().snapshot_shared_state()
        try:
            path = save_checkpoint(
                self.node.config.home,
                tensors,
                revision=revision,
                metadata={"model": self.settings.model},
            )
        except (OSError, CheckpointError) as exc:
            log.error("DiLoCo: checkpoint of revision %d failed: %s", revision, exc)
            return
        self.last_checkpoint = str(path)
        self.last_checkpoint_revision = revision

    def _record(
        self,
        outcome: Any,
        grad: PseudoGradient,
        started: float,
        eval_loss: float | None = None,
    ) -> None:
        worker = self._require_worker()
        completed = isinstance(outcome, Completed)
        self.rounds_completed += completed
        self.rounds_skipped += not completed
        self.last_members = list(outcome.members) if completed else [self.node.peer_id]
        report = worker.last_report
        self.history.append(
            {
                "round": outcome.round,
                "outcome": "completed" if completed else "skipped",
                "reason": None if completed else outcome.reason,
                "members": self.last_members,
                "revision": worker.revision,
                "hash": self.state_hash,
                "inner_steps": grad.inner_steps,
                "tokens": grad.tokens,
                "train_loss": None if report is None else report.last_loss,
                "eval_loss": eval_loss,
                "bytes_sent": self.bytes_last_round,
                "duration_s": round(time.monotonic() - started, 3),
            }
        )

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        worker = self.worker
        metrics = None if worker is None else worker.metrics()
        round_step = 0
        if self.batches is not None and self.phase.startswith("inner"):
            round_step = self.batches.drawn - self.round_started_drawn
        group = self.node.group
        return {
            "mode": "diloco",
            "phase": self.phase,
            "error": self.error,
            "model": self.settings.model,
            "params": None if worker is None else worker.layout.numel,
            "overlapped": self.settings.overlapped,
            "shard": [self.shard, self.settings.shards],
            "round": None if group is None or group.runner is None else group.runner.machine.round,
            "revision": None if metrics is None else metrics.revision,
            "inner_step": None if metrics is None else metrics.inner_step,
            "round_inner_step": round_step,
            "inner_steps_per_round": self.settings.inner.inner_steps,
            "train_loss": None if metrics is None else metrics.train_loss,
            "eval_loss": None if metrics is None else metrics.eval_loss,
            "initial_eval_loss": self.initial_eval_loss,
            "tokens_per_s": None if metrics is None else metrics.tokens_per_s,
            "tokens_total": None if metrics is None else metrics.tokens_total,
            "bytes_last_round": self.bytes_last_round,
            "bytes_total": self.bytes_total,
            "rounds_completed": self.rounds_completed,
            "rounds_skipped": self.rounds_skipped,
            "members": self.last_members,
            "state_hash": self.state_hash,
            "resumed_revision": self.resumed_revision,
            "last_checkpoint": self.last_checkpoint,
            "history": list(self.history),
        }
