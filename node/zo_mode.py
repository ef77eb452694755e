"""Daemon ZO mode (``train = "zo"``): shared-seed zeroth-order training over the record log.

Wiring only: the agreement rules are :mod:`protocols.zo_log` (sans-IO), the numerics are
:mod:`trainer.zo`. This module moves the log's messages over the node's control links (one
ordered queue per peer, :class:`node.collective.NetTransport`), runs every torch step
(SPSA records, applying a closed step, state hashes) in a worker thread one at a time, keeps
the run's latest agreed snapshot for joiners and re-syncs, and reports what ``shoal status``
shows.

Snapshots: theta_0 is the first (revision 0). Every ``zo_snapshot_every_steps`` steps (S) each
node keeps a copy of its weights after step s - 1 as its candidate; when the log machine says
every hash of step s matched (``SnapshotAgreed``), the candidate replaces the served snapshot
(shared-state revision s, with the chain digest of step s - 1 as one more small tensor, so the
replay from it is authenticated), is saved under the home (``zo-snapshots/``), and the log
drops the steps before s - S. Until then the previous snapshot is served. FedKSeed's K scalars
restart from zero at every snapshot step (``ZOTrainer.rebase``), on every node alike.

Joining: a node that finds a group first asks the members how far back they serve the log
(``zo.ask`` -> ``zo.offer``). Every node keeps each closed step in an archive under its home
(``zo-archive/``, :mod:`node.zo_archive`, up to ``zo_archive_max_steps``) and answers wants for
steps its log in memory dropped from there. A joiner that holds theta_0 (its snapshot is of
step 0 and its genesis digest, which covers theta_0's hash, is the one a member's archive
chains from) and finds a member whose archive reaches step 0, with the head within
``zo_replay_join_max_steps``, replays the whole log from step 0 and fetches no tensor
(join by replay; ``protocols.zo_log.choose_join_path``). Otherwise it votes with its own
snapshot (theta_0, or the one it saved before a restart) in the shared-state sync
(``protocols.simnet.StateSync``: it fetches only tensors whose hash differs, none when it holds
the winning snapshot), then fetches the log from the snapshot's step and replays it; a node
whose state or log differs from the swarm's does the same from its snapshot.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import torch
import trio

from node.collective import NetTransport
from node.zo_archive import ARCHIVE_FOLDER, ArchiveError, ZOArchive
from protocols.shared_state import SharedState, SharedStateError
from protocols.simnet import StateSync, StateSyncSettings, TransportError
from protocols.wire import encode_frame
from protocols.zo_log import (
    DIGEST_BYTES,
    HASH_BYTES,
    Apply,
    ArchiveOffer,
    ClosedStep,
    Event,
    JoinChoice,
    LogFormatError,
    Produce,
    Rejected,
    Resync,
    Send,
    ServeArchive,
    SnapshotAgreed,
    ZOLog,
    ZOLogSettings,
    choose_join_path,
    encode_log,
    genesis_digest,
    parse_offer,
)
from trainer.checkpoint import (
    CheckpointError,
    CheckpointSettings,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)
from trainer.data import CorpusSettings, TokenBlocks, load_corpus
from trainer.model import ModelConfig, build_model, model_config, next_token_loss
from trainer.zo import SeedRecord, ZOSettings, ZOTrainer, clone_params, state_bytes, state_hash

if TYPE_CHECKING:
    from node.daemon import Node

log = logging.getLogger("shoal.node.zo")

# libp2p framing around each control frame: a Yamux header (12 B) and a Noise message's
# length prefix and AEAD tag (2 + 16 B). Used to report on-the-wire bytes per message.
LIBP2P_FRAMING_BYTES = 30
HISTORY = 600
FAULT_EVERY_STEPS = 10
DRIFT_STEP = 150  # zo_fault = drift: this node's weights move off the swarm's after this step
CHAIN_TENSOR = "_zo_chain"  # the snapshot's extra tensor: chain digest of the step before it
SNAPSHOTS = CheckpointSettings(folder_name="zo-snapshots", keep_last=2)
HOME_LOG_FILE = "zo-log.msgpack"  # the closed steps since the saved snapshot (a zo.log message)
JOIN_SYNC_ATTEMPTS = 3  # a donor may swap its snapshot between its summary and our fetch


def chain_tensor(digest: bytes) -> torch.Tensor:
    return torch.tensor(list(digest), dtype=torch.uint8)


def chain_of(tensors: dict[str, torch.Tensor]) -> bytes | None:
    """The chain digest a snapshot carries, or None when it has none of the right size."""
    t = tensors.get(CHAIN_TENSOR)
    if t is None or t.dtype != torch.uint8 or tuple(t.shape) != (DIGEST_BYTES,):
        return None
    return bytes(t.tolist())


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Start from a checkpoint (a DiLoCo one, say): every trained parameter by name and shape."""
    tensors = load_checkpoint(path).tensors
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise CheckpointError(f"{path} lacks parameters {missing[:5]} of the zo_model")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{path}: {name} has shape {tuple(tensors[name].shape)}, the zo_model "
                    f"needs {tuple(param.shape)}"
                )
            param.copy_(tensors[name].to(param.dtype))


def zo_model_config(name: str, context_tokens: int) -> ModelConfig:
    """``nano`` (~25k parameters) and ``micro`` (~0.1M), for tests, or a registered size of
    :mod:`trainer.model`."""
    if name == "nano":
        return ModelConfig(
            context_tokens=context_tokens, d_model=32, n_layers=1, n_heads=2, mlp_hidden=64
        )
    if name == "micro":
        return ModelConfig(
            context_tokens=context_tokens, d_model=64, n_layers=2, n_heads=2, mlp_hidden=128
        )
    return model_config(name, context_tokens=context_tokens)


@dataclass(frozen=True)
class AppliedStep:
    """What applying one closed step gave (computed in the worker thread)."""

    records: int
    loss: float | None
    state_hex: str | None  # the state hash after the step, on the steps before a check
    candidate: dict[str, torch.Tensor] | None  # the state after the step, before a snapshot

    @property
    def state(self) -> bytes | None:
        return bytes.fromhex(self.state_hex)[:HASH_BYTES] if self.state_hex else None


class ZOMode:
    """This node's part in the swarm's ZO run."""

    def __init__(self, node: Node) -> None:
        self.node = node
        c = node.config
        self.me = node.peer_id
        self.log_settings = ZOLogSettings(
            samples_per_step=c.zo_samples_per_step,
            step_timeout_s=c.zo_step_timeout_s,
            close_timeout_s=c.zo_close_timeout_s,
            hash_every_steps=c.zo_hash_every_steps,
            anti_entropy_s=c.zo_anti_entropy_s,
            repair_wait_s=c.zo_repair_wait_s,
            min_members=c.zo_min_members,
            snapshot_every_steps=c.zo_snapshot_every_steps,
        )
        self.zo_settings = ZOSettings(
            swarm=c.swarm,
            lr=c.zo_lr,
            eps=c.zo_eps,
            fedkseed_k=c.zo_fedkseed_k,
            weighted_seed_sampling=c.zo_seed_sampling == "weighted",
        )
        self.genesis = genesis_digest(c.swarm, 0)  # with theta_0's hash once it is built
        self.phase = "loading"
        self.machine: ZOLog | None = None
        self.trainer: ZOTrainer | None = None
        self.snapshot: dict[str, torch.Tensor] = {}  # the served snapshot's weights
        self.snapshot_step = 0  # its step (= shared-state revision)
        self.snapshot_chain = self.genesis  # chain digest of step snapshot_step - 1
        self._candidate: tuple[int, dict[str, torch.Tensor]] | None = None
        self.snapshots_agreed = 0
        self.resumed_from: int | None = None  # the saved snapshot this node restarted from
        self._home_log: dict[str, Any] | None = None  # its saved steps since, replayed once
        self.generation = 0
        self._work_send, self._work_recv = trio.open_memory_channel[tuple[int, Event]](math.inf)
        self.transport: NetTransport | None = None
        self.sync: StateSync | None = None
        self._nursery: trio.Nursery | None = None
        self.losses: deque[tuple[int, float]] = deque(maxlen=HISTORY)
        self.hash_checks: deque[tuple[int, str]] = deque(maxlen=HISTORY)
        self.state_hash = ""
        self.records_per_step: deque[int] = deque(maxlen=50)
        self.bytes_sent: dict[str, int] = {}
        self.messages_sent: dict[str, int] = {}
        self.rejections: deque[str] = deque(maxlen=50)
        self.rejected = 0
        self.ignored = 0
        self.resyncs = 0
        self.resync_reasons: deque[str] = deque(maxlen=10)
        self._drifted = False
        self._kseed_summary: dict[str, Any] | None = None
        self._stopping = False
        self.join: dict[str, Any] | None = None
        self._join_log_bytes = 0
        self._join_started: float | None = None
        self.full_state_bytes = 0
        self.started_at = time.monotonic()
        self._torch_lock = trio.Lock()
        self._home_write_lock = trio.Lock()
        self.archive: ZOArchive | None = None  # zo-archive/: every closed step, for replays
        self._archived_for: ZOLog | None = None  # the machine the archive is aligned with
        self._offers: dict[str, ArchiveOffer] = {}  # zo.offer answers to this joiner's zo.ask
        self._offers_wanted: set[str] = set()
        self._offers_in = trio.Event()
        self._replay_started: float | None = None
        self.archive_steps_served = 0
        self._replay_records = 0

    # -- daemon hooks ------------------------------------------------------------------------

    async def on_control(self, sender: str, message: dict[str, Any]) -> None:
        kind = str(message.get("t"))
        if kind.startswith("ss."):
            if self.sync is not None:
                self.sync.on_control(sender, message)
            return
        if kind == "zo.offer":
            self._on_offer(sender, message)
            return
        if self.machine is None:  # loading or re-syncing: the log catches up by fetching
            self.ignored += 1
            return
        if kind == "zo.log" and self.phase == "joining":
            self._join_log_bytes += len(encode_frame(message)) + LIBP2P_FRAMING_BYTES
        await self._handle(self.machine.on_message(sender, message, time.monotonic()))

    def on_peer_lost(self, peer: str) -> None:
        if self.machine is not None and self._nursery is not None:
            events = self.machine.on_peer_lost(peer, time.monotonic())
            self._nursery.start_soon(self._handle, events)

    def request_stop(self) -> None:
        """The node is leaving: no more torch work (the others close steps without us)."""
        self.generation += 1
        self._stopping = True

    def presence(self) -> dict[str, Any]:
        """What the presence record says about this node's ZO run (kept small: it is gossiped)."""
        step = self.machine.applied if self.machine is not None else 0
        return {"mode": "zo", "zo": {"phase": self.phase, "step": step}}

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        c = self.node.config
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.transport = NetTransport(
                self.node.links,
                self.node.bulk,
                c.bulk_io_timeout_s,
                nursery,
                lambda peer, reason: self.on_peer_lost(peer),
            )
            if c.zo_fault == "outsider":
                self.phase = "outsider"
                self._publish_presence()
                await self._outsider()
                return
            await trio.to_thread.run_sync(self._load)
            self.sync = StateSync(
                self.me,
                self._served_state(),
                self.transport,
                nursery,
                StateSyncSettings(fetch_timeout_s=c.bulk_io_timeout_s),
            )
            self.sync.mark_round(1)  # the snapshot is ready to serve
            self.phase = "waiting"
            self._publish_presence()
            nursery.start_soon(self._worker)
            nursery.start_soon(self._ticker)
            contacts = await self._find_group()
            if contacts:
                await self._join(contacts)
            else:
                log.info("founding ZO run in swarm %r at step %d", c.swarm, self.snapshot_step)
                self.machine = ZOLog(
                    self.me,
                    self.log_settings,
                    self.snapshot_chain,
                    self.snapshot_step,
                    [self.me],
                    time.monotonic(),
                )
                self._set_phase("member")
                await self._handle(self.machine.start(time.monotonic()))

    def _load(self) -> None:
        c = self.node.config
        torch.set_num_threads(c.zo_torch_threads)
        config = zo_model_config(c.zo_model, c.zo_context_tokens)
        model = build_model(config, seed=c.zo_model_seed)
        if c.zo_init_checkpoint:
            load_weights(model, Path(c.zo_init_checkpoint))
        # theta_0 (snapshot revision 0) is in the genesis digest, so the chain from step 0
        # authenticates the base weights too (choose_join_path compares it).
        theta_0 = bytes.fromhex(state_hash(model))[:HASH_BYTES]
        self.genesis = self.snapshot_chain = genesis_digest(c.swarm, 0, theta_0)
        if c.zo_archive_max_steps:
            self.archive = ZOArchive(
                c.home / ARCHIVE_FOLDER, c.swarm, c.zo_samples_per_step, c.zo_archive_max_steps
            )
            r = self.archive.range
            log.info(
                "ZO archive: %s",
                f"steps {r.start}..{r.end - 1} on disk" if r is not None else "empty",
            )
        saved = self._saved_snapshot(model)
        if saved is not None:
            self.snapshot_step, self.snapshot_chain, tensors = saved
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(tensors[name])
            self.resumed_from = self.snapshot_step
            self._home_log = self._saved_log(self.snapshot_step)
            log.info(
                "resuming from the ZO snapshot of step %d saved in the home (and %s)",
                saved[0],
                "its log since" if self._home_log else "no log since",
            )
        corpus = load_corpus(
            CorpusSettings(sources=c.zo_corpus_sources, max_total_bytes=c.zo_corpus_bytes)
        )
        seed = int.from_bytes(hashlib.blake2b(self.me.encode(), digest_size=4).digest(), "big")
        batches = TokenBlocks(
            corpus.train_tokens,
            batch_size=c.zo_batch_size,
            context_tokens=c.zo_context_tokens,
            seed=seed,
        )
        self.snapshot = clone_params(model)
        self.full_state_bytes = state_bytes(model)
        self.trainer = ZOTrainer(
            model,
            lambda m, batch: next_token_loss(m, *batch),
            batches,
            self.me,
            self.zo_settings,
            start_step=self.snapshot_step,
        )
        self.state_hash = state_hash(model)

    def _saved_snapshot(
        self, model: torch.nn.Module
    ) -> tuple[int, bytes, dict[str, torch.Tensor]] | None:
        """(step, chain digest, weights) of the newest snapshot saved in the home, if it is
        one of this run (same swarm and model); anything else is logged and ignored."""
        c = self.node.config
        try:
            saved = load_latest_checkpoint(c.home, SNAPSHOTS)
        except CheckpointError as exc:
            log.warning("ignoring the saved ZO snapshot: %s", exc)
            return None
        if saved is None:
            return None
        meta = saved.metadata
        if (meta.get("swarm"), meta.get("zo_model")) != (c.swarm, c.zo_model):
            log.warning(
                "ignoring the saved ZO snapshot %s: it is of swarm %r, model %r",
                saved.path,
                meta.get("swarm"),
                meta.get("zo_model"),
            )
            return None
        chain = chain_of(saved.tensors)
        params = dict(model.named_parameters())
        tensors = {n: t for n, t in saved.tensors.items() if n != CHAIN_TENSOR}
        if chain is None or set(tensors) != set(params):
            log.warning("ignoring the saved ZO snapshot %s: not this model's tensors", saved.path)
            return None
        for name, param in params.items():
            if tensors[name].shape != param.shape or tensors[name].dtype != param.dtype:
                log.warning("ignoring the saved ZO snapshot %s: %s differs", saved.path, name)
                return None
        return int(meta["revision"]), chain, tensors

    def _saved_log(self, step: int) -> dict[str, Any] | None:
        """The steps since snapshot ``step`` saved in the home (a zo.log message; the log
        machine checks it against the snapshot's chain digest like any relayed log)."""
        path = self.node.config.home / HOME_LOG_FILE
        try:
            msg = msgpack.unpackb(path.read_bytes(), raw=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, msgpack.UnpackException) as exc:
            log.warning("ignoring the saved ZO log %s: %s", path, exc)
            return None
        if not isinstance(msg, dict) or msg.get("t") != "zo.log" or msg.get("s0") != step:
            return None  # of another snapshot (a kill between the two saves): not ours
        return msg

    def _save_log(self, upto: int) -> None:
        """Every hash check: the applied steps since the snapshot, for a restart. Encoded here
        in the event loop (the log changes only here), written by a thread."""
        m = self.machine
        if m is None or upto <= self.snapshot_step or self.snapshot_step < m.log_start:
            return
        steps = [m.log[s] for s in range(self.snapshot_step, upto)]
        data = msgpack.packb(encode_log(steps, m.chain[self.snapshot_step - 1]), use_bin_type=True)
        path = self.node.config.home / HOME_LOG_FILE
        if self._nursery is not None:
            self._nursery.start_soon(self._write_home_file, path, data)

    async def _write_home_file(self, path: Path, data: bytes) -> None:
        def write() -> None:
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)

        async with self._home_write_lock:
            try:
                await trio.to_thread.run_sync(write)
            except OSError as exc:
                log.warning("could not save the ZO log to %s: %s", path, exc)

    def _served_state(self) -> SharedState:
        """The snapshot as shared state: its weights, its chain digest, revision = its step."""
        tensors = {**self.snapshot, CHAIN_TENSOR: chain_tensor(self.snapshot_chain)}
        return SharedState(tensors, self.snapshot_step)

    async def _find_group(self) -> list[str]:
        c = self.node.config
        deadline = trio.current_time() + c.zo_join_wait_s
        while True:
            peers = self._zo_peers()
            members = sorted(p for p, phase in peers.items() if phase == "member")
            if members:
                return members
            waiting = [p for p, phase in peers.items() if phase in ("waiting", "joining")]
            if trio.current_time() >= deadline and all(self.me < p for p in waiting):
                return []
            await trio.sleep(c.heartbeat_s / 2)

    def _zo_peers(self) -> dict[str, str]:
        out = {}
        for member in self.node.membership.table.others():
            zo = (member.record.training or {}).get("zo")
            if isinstance(zo, dict) and isinstance(zo.get("phase"), str):
                out[member.record.peer_id] = zo["phase"]
        return out

    async def _join(self, contacts: list[str]) -> None:
        """Either the whole log from step 0 on the theta_0 this node holds (join by replay:
        no tensor moves), or the latest snapshot through the shared-state sync and the log
        since, replayed (:func:`protocols.zo_log.choose_join_path` decides)."""
        assert self.sync is not None and self.trainer is not None
        self._set_phase("joining")
        self._join_started = time.monotonic()
        self._join_log_bytes = 0
        self._replay_started, self._replay_records = None, 0
        choice = await self._choose_join(contacts)
        if choice.path == "replay" and choice.donor is not None:
            # theta_0 (revision 0) and its chain digest (the genesis) are ours already; we
            # serve them until the replay agrees a later snapshot. The donor is asked first.
            contacts = [choice.donor, *(p for p in contacts if p != choice.donor)]
            snapshot_bytes = 0
        else:
            snapshot_bytes = await self._sync_snapshot(contacts)
            self._take_synced_snapshot(snapshot_bytes)
        async with self._torch_lock:
            await trio.to_thread.run_sync(self._reset_to_snapshot)
        self.join = {
            "path": choice.path,
            "reason": choice.reason,
            "donor": choice.donor,
            "snapshot_step": self.snapshot_step,
            "snapshot_bytes": snapshot_bytes,
            "log_bytes": 0,
            "full_state_bytes": self.full_state_bytes,
            "steps_replayed": 0,
            "done": False,
        }
        now = time.monotonic()
        self.machine = ZOLog(
            self.me, self.log_settings, self.snapshot_chain, self.snapshot_step, None, now
        )
        log.info(
            "joining ZO run through %s by %s: snapshot of step %d (%d B fetched), replaying "
            "the log since",
            contacts,
            choice.path,
            self.snapshot_step,
            snapshot_bytes,
        )
        if self._home_log is not None and self._home_log.get("s0") == self.snapshot_step:
            # Restarted with the snapshot the swarm still serves: replay our own saved steps
            # first (the chain digest of the snapshot authenticates them), fetch the rest.
            events = self.machine.on_message(self.me, self._home_log, now)
            self.join["home_log_steps"] = self.machine.next_close - self.snapshot_step
            self._home_log = None
            await self._handle(events)
        if self.machine is not None:
            await self._handle(self.machine.fetch_from(contacts[0]))

    def _take_synced_snapshot(self, snapshot_bytes: int) -> None:
        assert self.sync is not None
        state = self.sync.state
        chain = chain_of(state.tensors)
        if chain is None:  # the winner carries no chain digest: keep ours (the log will tell)
            log.warning("the synced ZO snapshot has no chain digest; keeping the local snapshot")
            self.sync.state = self._served_state()
            return
        self.snapshot = {n: t for n, t in state.tensors.items() if n != CHAIN_TENSOR}
        self.snapshot_step, self.snapshot_chain = state.revision, chain
        if snapshot_bytes and self.snapshot_step and self._nursery is not None:
            # The snapshot we now serve, in the home too: a restart resumes from it.
            self._nursery.start_soon(self._save_snapshot, self._served_state())

    async def _choose_join(self, contacts: list[str]) -> JoinChoice:
        """Ask the members how far back they serve the log (zo.ask -> zo.offer, while this
        node holds theta_0 and may replay), then take the join rule's choice."""
        c = self.node.config
        self._offers = {}
        if c.zo_replay_join_max_steps and self.snapshot_step == 0:
            self._offers_wanted = set(contacts)
            self._offers_in = trio.Event()
            for peer in contacts:
                await self._send(peer, {"t": "zo.ask"})
            with trio.move_on_after(c.zo_join_offer_timeout_s):
                await self._offers_in.wait()
            self._offers_wanted = set()
        choice = choose_join_path(
            self.snapshot_step,
            self.genesis,
            list(self._offers.values()),
            c.zo_replay_join_max_steps,
        )
        log.info(
            "ZO join path: %s (%d of %d members answered): %s",
            choice.path,
            len(self._offers),
            len(contacts),
            choice.reason,
        )
        return choice

    def _on_offer(self, sender: str, message: dict[str, Any]) -> None:
        if sender not in self._offers_wanted:
            # An answer after the join rule chose, or from a peer this node did not ask (it
            # must not become the donor by sending an offer nobody asked for).
            self.ignored += 1
            return
        try:
            self._offers[sender] = parse_offer(sender, message)
        except LogFormatError as exc:
            self._note_rejection(sender, f"malformed zo.offer: {exc}")
            return
        if self._offers_wanted <= set(self._offers):
            self._offers_in.set()

    def _archive_step(self, event: Apply) -> None:
        """Keep a closed step in the archive (in step order: Apply events come so), and tell
        the machine what the archive now holds (it answers wants from there)."""
        archive, machine = self.archive, self.machine
        if archive is None or not event.digest:
            return
        try:
            note = archive.add(event.closed, event.previous, event.digest)
        except (OSError, ArchiveError) as exc:
            log.warning(
                "ZO archive off until a restart: step %d not kept: %s", event.closed.step, exc
            )
            archive.close()
            self.archive = None
            if machine is not None:
                machine.archive = None
            return
        if note:
            log.warning("ZO archive: %s", note)
        if machine is not None:
            machine.archive = archive.range

    async def _serve_archive(self, event: ServeArchive) -> None:
        """A want for steps the log in memory dropped: read them from the archive, in a worker
        thread (13 ms to read and decode 512 steps, the most per reply, measured: a peer's
        wants, one after another, must not stall the event loop and its record deadlines)."""
        try:
            archive = self.archive
            if archive is None:
                raise ArchiveError("this node keeps no archive now")
            previous, steps = await trio.to_thread.run_sync(archive.read, event.start, event.stop)
        except (OSError, ArchiveError) as exc:
            log.warning(
                "ZO archive: cannot serve steps %d..%d: %s", event.start, event.stop - 1, exc
            )
            m = self.machine
            await self._send(event.peer, {"t": "zo.pruned", "s": m.log_start if m else event.stop})
            return
        self.archive_steps_served += len(steps)
        await self._send(event.peer, encode_log(steps, previous) | {"h": event.head})

    async def _sync_snapshot(self, contacts: list[str]) -> int:
        """Vote with our snapshot; fetch the tensors of the winner that differ (bytes)."""
        assert self.sync is not None
        for attempt in range(1, JOIN_SYNC_ATTEMPTS + 1):
            try:
                fetched = await self.sync.sync(contacts, 0, newcomer=False)
                plan = self.sync.last_plan
                if plan is not None and plan.holders == (self.me,):
                    # Our own snapshot won alone (a tie, say after a restart): the members'
                    # is the one their log continues from.
                    fetched += await self.sync.sync(contacts, 0, newcomer=True)
                return fetched
            except (SharedStateError, trio.TooSlowError, TransportError) as exc:
                log.warning(
                    "snapshot sync attempt %d of %d failed: %s", attempt, JOIN_SYNC_ATTEMPTS, exc
                )
        log.warning("snapshot sync failed; replaying from the local snapshot")
        return 0

    def _reset_to_snapshot(self) -> None:
        assert self.trainer is not None
        with torch.no_grad():
            for name, p in self.trainer.model.named_parameters():
                if name in self.snapshot:
                    p.copy_(self.snapshot[name])
        self.trainer.step = self.snapshot_step
        self.trainer.rebase()  # FedKSeed: zero scalars at the snapshot, as on every member
        self._candidate = None
        self.state_hash = state_hash(self.trainer.model)

    def _promote_snapshot(self, step: int) -> None:
        """Every hash of step ``step`` matched ours: serve our candidate from now on."""
        candidate, machine = self._candidate, self.machine
        if candidate is None or candidate[0] != step or machine is None:
            log.warning("snapshot of step %d agreed, but this node holds no candidate", step)
            return
        self._candidate = None
        self.snapshot, self.snapshot_step = candidate[1], step
        self.snapshot_chain = machine.chain[step - 1]
        self.snapshots_agreed += 1
        if self.sync is not None:
            self.sync.state = self._served_state()
        log.info(
            "ZO snapshot of step %d agreed; the log keeps steps from %d", step, machine.log_start
        )
        if self._nursery is not None:
            self._nursery.start_soon(self._save_snapshot, self._served_state())

    async def _save_snapshot(self, state: SharedState) -> None:
        c = self.node.config
        meta: dict[str, str | int] = {"swarm": c.swarm, "zo_model": c.zo_model}
        try:
            await trio.to_thread.run_sync(
                lambda: save_checkpoint(
                    c.home,
                    state.tensors,
                    revision=state.revision,
                    metadata=meta,
                    settings=SNAPSHOTS,
                )
            )
        except (OSError, CheckpointError) as exc:
            log.warning("could not save the ZO snapshot of step %d: %s", state.revision, exc)

    def _begin_resync(self, reason: str) -> None:
        if self.machine is None or self._nursery is None:
            return
        log.warning("ZO state differs from the swarm's (%s): re-syncing from the snapshot", reason)
        self.resyncs += 1
        self.resync_reasons.append(reason)
        contacts = sorted(set(self.machine.members or ()) - {self.me})
        self.generation += 1  # queued torch work of the old log is skipped
        self.machine = None
        self._nursery.start_soon(self._resync, contacts)

    async def _resync(self, contacts: list[str]) -> None:
        async with self._torch_lock:
            await trio.to_thread.run_sync(self._reset_to_snapshot)
        while not contacts:
            contacts = sorted(p for p, phase in self._zo_peers().items() if phase == "member")
            await trio.sleep(self.node.config.heartbeat_s)
        await self._join(contacts)

    # -- events ------------------------------------------------------------------------------

    async def _handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Send):
                await self._send(event.peer, event.msg)
            elif isinstance(event, Rejected):
                self._note_rejection(event.peer, event.reason)
            elif isinstance(event, Resync):
                self._begin_resync(event.reason)
                return
            elif isinstance(event, SnapshotAgreed):
                self._promote_snapshot(event.step)
            elif isinstance(event, ServeArchive):
                await self._serve_archive(event)
            elif not self._stopping:
                if isinstance(event, Apply):
                    self._archive_step(event)
                self._work_send.send_nowait((self.generation, event))

    async def _send(self, peer: str, msg: dict[str, Any]) -> None:
        assert self.transport is not None
        kind = str(msg["t"])
        size = len(encode_frame(msg)) + LIBP2P_FRAMING_BYTES
        self.bytes_sent[kind] = self.bytes_sent.get(kind, 0) + size
        self.messages_sent[kind] = self.messages_sent.get(kind, 0) + 1
        await self.transport.send_control(peer, msg)

    def _note_rejection(self, peer: str, reason: str) -> None:
        self.rejected += 1
        self.rejections.append(f"{peer}: {reason}")
        log.warning("ZO: rejected from %s: %s", peer, reason)

    async def _worker(self) -> None:
        """Torch work, one item at a time, in a thread; the loop keeps serving meanwhile."""
        async for generation, event in self._work_recv:
            if generation != self.generation or self.machine is None or self._stopping:
                continue
            machine = self.machine
            if isinstance(event, Produce):
                async with self._torch_lock:
                    codes = await trio.to_thread.run_sync(self._produce, event.step)
                if generation == self.generation:
                    await self._handle(
                        machine.on_records_ready(event.step, codes, time.monotonic())
                    )
                    if self.node.config.zo_fault == "bad_records":
                        await self._send_bad_records(event.step)
            elif isinstance(event, Apply):
                async with self._torch_lock:
                    applied = await trio.to_thread.run_sync(self._apply, event.closed)
                if generation == self.generation:
                    self._after_apply(event.closed, applied)
                    await self._handle(
                        machine.on_applied(event.closed.step, applied.state, time.monotonic())
                    )

    def _produce(self, step: int) -> bytes:
        assert self.trainer is not None
        records = self.trainer.produce_records(step, self.log_settings.samples_per_step)
        return bytes(r.code & 0xFF for r in records)

    def _apply(self, closed: ClosedStep) -> AppliedStep:
        """In the worker thread: torch only. What the status shows is recorded by the event
        loop (:meth:`_after_apply`), never here: ``status()`` iterates those deques, and a
        thread appending meanwhile breaks the iteration ("deque mutated during iteration")."""
        assert self.trainer is not None
        trainer = self.trainer
        records = []
        for peer, index, code in closed.records():
            seed_index = None
            if trainer.kseed is not None:
                seed_index = trainer.kseed.choose_seed_index(
                    self.zo_settings.swarm,
                    closed.step,
                    peer,
                    index,
                    self.zo_settings.weighted_seed_sampling,
                )
            records.append(SeedRecord(closed.step, peer, index, code, seed_index))
        metrics = trainer.apply_step(closed.step, records)
        if trainer.kseed is not None:  # read here, in the worker: the scalars of this step
            scalars = list(trainer.kseed.scalars)
            self._kseed_summary = {
                "k": len(scalars),
                "step": closed.step + 1,
                "seeds_used": sum(1 for a in scalars if a != 0.0),
                "scalars_digest": hashlib.blake2b(
                    repr(scalars).encode(), digest_size=8
                ).hexdigest(),
            }
        candidate = None
        if self.log_settings.is_snapshot_step(closed.step + 1):
            # Every node: FedKSeed's scalars restart here; the state is our candidate snapshot.
            trainer.rebase()
            candidate = clone_params(trainer.model)
        if self.node.config.zo_fault == "drift" and closed.step == DRIFT_STEP and not self._drifted:
            self._drifted = True  # once: the replay after the re-sync must not drift again
            with torch.no_grad():
                next(iter(trainer.model.parameters())).view(-1)[0] += 1e-3
        count = metrics.records_applied + metrics.records_skipped_zero
        if (closed.step + 1) % self.log_settings.hash_every_steps:
            return AppliedStep(count, metrics.loss, None, candidate)
        return AppliedStep(count, metrics.loss, state_hash(trainer.model), candidate)

    def _after_apply(self, closed: ClosedStep, applied: AppliedStep) -> None:
        self.records_per_step.append(applied.records)
        if applied.loss is not None:
            self.losses.append((closed.step, applied.loss))
        if applied.state_hex is not None:
            self.state_hash = applied.state_hex
            self.hash_checks.append((closed.step + 1, applied.state_hex))
            if self.phase == "member":
                self._save_log(closed.step + 1)
        if applied.candidate is not None:
            self._candidate = (closed.step + 1, applied.candidate)
        machine = self.machine
        if self.phase == "joining" and self.join is not None:
            now = time.monotonic()
            if self._replay_started is None:
                self._replay_started = now
            self._replay_records += applied.records
            replayed = closed.step + 1 - self.join["snapshot_step"]
            seconds = now - self._replay_started
            self.join["steps_replayed"] = replayed
            self.join["records_replayed"] = self._replay_records
            self.join["log_bytes"] = self._join_log_bytes
            self.join["bytes_fetched"] = self.join["snapshot_bytes"] + self._join_log_bytes
            if seconds > 0:  # from the first step applied, so the ask and the sync are out
                self.join["replay_steps_per_s"] = round((replayed - 1) / seconds, 2)
                self.join["replay_records_per_s"] = round(self._replay_records / seconds, 2)
        if machine is not None and machine.is_member and not machine.joining:
            if self.phase != "member":
                self._set_phase("member")
                if self.join is not None and self._join_started is not None:
                    self.join["done"] = True
                    self.join["seconds"] = round(time.monotonic() - self._join_started, 3)
                    log.info("joined ZO run at step %d by replay: %s", closed.step, self.join)
        elif self.phase == "member" and machine is not None and machine.joining:
            self._set_phase("joining")

    def _set_phase(self, phase: str) -> None:
        if phase != self.phase:
            self.phase = phase
            self._publish_presence()

    def _publish_presence(self) -> None:
        self.node.training = self.presence()

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(self.node.config.zo_tick_s)
            if self.machine is not None:
                await self._handle(self.machine.on_tick(time.monotonic()))
            if self.machine is not None:
                self.node.training = self.presence()

    # -- fault injection (tests) -------------------------------------------------------------

    async def _send_bad_records(self, step: int) -> None:
        """``zo_fault = bad_records``: besides its honest records, every few steps send what the
        others must reject: a far-future step, a flood of codes, a second record set, and a
        tampered copy of a closed step."""
        machine = self.machine
        if machine is None or step % FAULT_EVERY_STEPS or step < 2:
            return
        n = self.log_settings.samples_per_step
        closed = machine.log.get(step - 1)
        bad: list[dict[str, Any]] = [
            {"t": "zo.r", "s": step + 100_000, "c": bytes([1]) * n},
            {"t": "zo.r", "s": step, "c": bytes([2]) * (n + 40)},
            {"t": "zo.r", "s": step, "c": bytes([3]) * n},
        ]
        if closed is not None and closed.included:
            victim = closed.included[0]
            forged = bytes((b ^ 0x7F) & 0x7F for b in closed.codes[victim])
            tampered = ClosedStep(
                closed.step,
                closed.members,
                closed.included,
                {**closed.codes, victim: forged},
                closed.hashes,
                closed.joiners,
            )
            bad.append(encode_log([tampered], machine.chain[closed.step - 1]))
        for peer in machine.members or ():
            if peer != self.me:
                for msg in bad:
                    await self._send(peer, msg)

    async def _outsider(self) -> None:
        """``zo_fault = outsider``: never joins, keeps sending records (all must be rejected)."""
        while True:
            await trio.sleep(self.node.config.zo_tick_s * 5)
            peers = self._zo_peers()
            for peer, phase in peers.items():
                if phase == "member":
                    step = self._peer_step(peer)
                    n = self.log_settings.samples_per_step
                    await self._send(peer, {"t": "zo.r", "s": step, "c": bytes([5]) * n})

    def _peer_step(self, peer: str) -> int:
        member = self.node.membership.table.get(peer)
        zo = ((member.record.training or {}) if member else {}).get("zo") or {}
        step = zo.get("step", 0)
        return step if isinstance(step, int) and step >= 0 else 0

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        m = self.machine
        steps = m.applied if m is not None else 0
        zo_bytes = sum(self.bytes_sent.values())
        record_bytes = self.bytes_sent.get("zo.r", 0)
        record_msgs = max(1, self.messages_sent.get("zo.r", 0))
        recent = [loss for _, loss in list(self.losses)[-20:]]
        return {
            "mode": "zo",
            "phase": self.phase,
            "step": steps,
            "loss": round(sum(recent) / len(recent), 5) if recent else None,
            "records_per_step": round(sum(self.records_per_step) / len(self.records_per_step), 3)
            if self.records_per_step
            else None,
            "bytes_per_step": round(zo_bytes / steps, 1) if steps else None,
            "bytes_per_record_message": round(record_bytes / record_msgs, 1),
            "bytes_sent": dict(self.bytes_sent),
            "messages_sent": dict(self.messages_sent),
            "members": list(m.members or ()) if m is not None else [],
            "coordinator": m.coordinator() if m is not None else None,
            "state_hash": self.state_hash,
            "parity_checks_passed": m.parity_checks_passed if m is not None else 0,
            "parity_checks_failed": m.parity_checks_failed if m is not None else 0,
            "hash_checks": [list(c) for c in self.hash_checks],
            "losses": [[s, round(v, 5)] for s, v in self.losses],
            "rejected": self.rejected,
            "rejections": list(self.rejections),
            "resyncs": self.resyncs,
            "resync_reasons": list(self.resync_reasons),
            "ignored_while_syncing": self.ignored,
            "fetches": m.fetches if m is not None else 0,
            "snapshot_step": self.snapshot_step,
            "snapshots_agreed": self.snapshots_agreed,
            "resumed_from": self.resumed_from,
            "log_steps": len(m.log) if m is not None else 0,
            "log_start": m.log_start if m is not None else None,
            "join": self.join,
            "archive": self._archive_status(),
            "full_state_bytes": self.full_state_bytes,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "fedkseed": self._fedkseed_status(),
        }

    def _archive_status(self) -> dict[str, Any] | None:
        a = self.archive
        if a is None:
            return None
        r = a.range
        return {
            "start": r.start if r is not None else None,
            "end": r.end if r is not None else None,
            "steps": a.steps,
            "bytes": a.size_bytes,
            "steps_served": self.archive_steps_served,
            "wants_refused": self.machine.archive_refused if self.machine is not None else 0,
        }

    def _fedkseed_status(self) -> dict[str, Any] | None:
        return self._kseed_summary
