"""The ZO replay archive: every closed step this node took, on disk under its home.

The log in memory (:mod:`protocols.zo_log`) drops the steps before the previous snapshot; the
archive keeps them, so a joiner that holds theta_0 can replay the whole run from step 0 and
fetch no tensor (``choose_join_path``). Which requests the archive answers is the log
machine's rule (:class:`protocols.zo_log.ServeArchive`); this module is only the file IO.

Layout: ``<home>/zo-archive/seg-<first step>.zoa``, append-only segment files of up to
``segment_steps`` steps each. A file is a sequence of frames (u32 payload length, u32 CRC-32
of the payload, payload = one msgpack list):

* ``["zoa", version, swarm, first_step, before]``: the segment's header (``before``: the chain
  digest of step first_step - 1);
* ``["p", [peer ids]]``: more peers for the segment's peer table (a step names its members by
  index, so a peer id is stored once a segment, not once a step: ~50 B a step for four
  members, ~115 B on the hash-check steps);
* ``["s", step, digest, [member indices], [included indices], codes, hashes, [joiners]]``.

Authentication is the chain, as for any relayed log: each step's digest is recomputed from its
content and the previous digest when the archive is opened, and a joiner checks it again.
Restart-safe: a frame cut short by a kill (or failing its CRC or the chain) ends the archive
there; the torn tail is cut off with a log line. Bounded: past ``max_steps`` steps the oldest
segment is deleted, so the archive then no longer reaches step 0 (joiners sync the snapshot).

Writes are one ``write`` + ``flush`` of ~50 B per closed step from the event loop (no fsync:
a SIGKILL keeps what the kernel holds; a power cut may cost the tail, which the scan drops).
"""

from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgpack

from protocols.zo_log import DIGEST_BYTES, HASH_BYTES, ArchiveRange, ClosedStep

log = logging.getLogger("shoal.node.zo.archive")

ARCHIVE_FOLDER = "zo-archive"
VERSION = 1
FRAME = struct.Struct("<II")  # payload length, CRC-32 of the payload
MAX_FRAME_BYTES = 1 << 20
MAX_SEGMENT_STEPS = 1024


class ArchiveError(ValueError):
    """An archive frame that is torn, corrupt, or not the next step of the chain."""


@dataclass
class _Segment:
    first: int
    path: Path
    before: bytes
    peers: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # offsets[i]: frame of step first + i
    last_digest: bytes = b""
    size: int = 0

    @property
    def end(self) -> int:
        return self.first + len(self.offsets)


def _frame(payload: list[Any]) -> bytes:
    raw = msgpack.packb(payload, use_bin_type=True)
    return FRAME.pack(len(raw), zlib.crc32(raw)) + raw


def _read_frames(data: bytes) -> tuple[list[tuple[int, int, list[Any]]], int, str | None]:
    """(offset, end offset, payload) of every whole frame, the offset after the last one, and
    why the scan stopped early (None: at the end of the data)."""
    out: list[tuple[int, int, list[Any]]] = []
    pos = 0
    while pos < len(data):
        if pos + FRAME.size > len(data):
            return out, pos, f"a frame header cut short at byte {pos}"
        length, crc = FRAME.unpack_from(data, pos)
        body = pos + FRAME.size
        if length > MAX_FRAME_BYTES or body + length > len(data):
            return out, pos, f"a frame of {length} B cut short at byte {pos}"
        raw = data[body : body + length]
        if zlib.crc32(raw) != crc:
            return out, pos, f"a frame failing its CRC at byte {pos}"
        try:
            payload = msgpack.unpackb(raw, raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            return out, pos, f"an undecodable frame at byte {pos} ({exc})"
        if not isinstance(payload, list) or not payload:
            return out, pos, f"a frame that is not a list at byte {pos}"
        out.append((pos, body + length, payload))
        pos = body + length
    return out, pos, None


def _step_from(payload: list[Any], peers: list[str], samples: int) -> tuple[ClosedStep, bytes]:
    """(closed step, its digest) from a step frame; raises ArchiveError."""
    if len(payload) != 8:
        raise ArchiveError("a step frame needs 8 fields")
    _, step, digest, members_i, included_i, codes, hashes, joiners_i = payload
    if not (isinstance(step, int) and step >= 0 and isinstance(digest, bytes)):
        raise ArchiveError("a step frame needs an integer step and a digest")
    if not (isinstance(codes, bytes) and isinstance(hashes, bytes)):
        raise ArchiveError(f"step {step}: codes and hashes must be bytes")
    try:
        members = tuple(peers[i] for i in members_i)
        included = tuple(peers[i] for i in included_i)
        joiners = tuple(peers[i] for i in joiners_i)
    except (IndexError, TypeError) as exc:
        raise ArchiveError(f"step {step}: a peer index outside the segment's table") from exc
    if len(codes) != samples * len(included) or len(hashes) not in (
        0,
        HASH_BYTES * len(included),
    ):
        raise ArchiveError(f"step {step}: codes or hashes of the wrong size")
    closed = ClosedStep(
        step=step,
        members=members,
        included=included,
        codes={p: codes[i * samples : (i + 1) * samples] for i, p in enumerate(included)},
        hashes={p: hashes[i * HASH_BYTES : (i + 1) * HASH_BYTES] for i, p in enumerate(included)}
        if hashes
        else {},
        joiners=joiners,
    )
    return closed, digest


class ZOArchive:
    """The closed steps [start, end) of this node's run, in segment files under ``folder``."""

    def __init__(self, folder: Path, swarm: str, samples: int, max_steps: int) -> None:
        if max_steps < 1:
            raise ValueError("max_steps must be >= 1 (0 = no archive: do not open one)")
        self.folder = folder
        self.swarm = swarm
        self.samples = samples
        self.max_steps = max_steps
        # A quarter of the bound (at most 1024): dropping the oldest segment keeps >= 3/4.
        self.segment_steps = max(1, min(MAX_SEGMENT_STEPS, max_steps // 4))
        self.segments: list[_Segment] = []
        self.notes: list[str] = []  # what the scan dropped, for the node's log and tests
        self._file: IO[bytes] | None = None
        self.folder.mkdir(parents=True, exist_ok=True)
        self._scan()

    # -- reading -----------------------------------------------------------------------------

    @property
    def range(self) -> ArchiveRange | None:
        if not self.segments or not self.segments[0].offsets:
            return None
        first = self.segments[0]
        return ArchiveRange(first.first, self.segments[-1].end, first.before)

    @property
    def steps(self) -> int:
        return sum(len(s.offsets) for s in self.segments)

    @property
    def size_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    def read(self, start: int, stop: int) -> tuple[bytes, list[ClosedStep]]:
        """(chain digest of step start - 1, closed steps [start, stop)); raises ArchiveError
        (or OSError) when the range is not all here."""
        r = self.range
        if r is None or not r.start <= start < stop <= r.end:
            raise ArchiveError(f"steps {start}..{stop - 1} are not all in the archive ({r})")
        previous = b""
        out: list[ClosedStep] = []
        # A copy: the node reads in a worker thread while the event loop may append (or drop
        # the oldest segment); a segment dropped meanwhile fails to open (OSError).
        for seg in list(self.segments):
            lo, hi = max(start, seg.first), min(stop, seg.end)
            if lo >= hi:
                continue
            with seg.path.open("rb") as f:
                f.seek(seg.offsets[lo - seg.first])
                end = seg.offsets[hi - seg.first] if hi < seg.end else seg.size
                data = f.read(end - seg.offsets[lo - seg.first])
            frames, _, problem = _read_frames(data)
            steps = [p for _, _, p in frames if p[0] == "s"]
            if problem or len(steps) != hi - lo:
                raise ArchiveError(f"{seg.path.name}: {problem or 'steps missing'}")
            for payload in steps:
                out.append(_step_from(payload, seg.peers, self.samples)[0])
            if lo == start:
                previous = seg.before if lo == seg.first else self._digest_at(seg, lo - 1)
        if len(out) != stop - start or (out and out[0].step != start):
            raise ArchiveError(f"steps {start}..{stop - 1} changed while being read")
        return previous, out

    def digest_at(self, step: int) -> bytes | None:
        for seg in self.segments:
            if seg.first <= step < seg.end:
                return self._digest_at(seg, step)
        return None

    def _digest_at(self, seg: _Segment, step: int) -> bytes:
        if step == seg.end - 1:
            return seg.last_digest
        with seg.path.open("rb") as f:
            f.seek(seg.offsets[step - seg.first])
            data = f.read(seg.offsets[step - seg.first + 1] - seg.offsets[step - seg.first])
        frames, _, problem = _read_frames(data)
        steps = [p for _, _, p in frames if p[0] == "s"]
        if problem or len(steps) != 1:
            raise ArchiveError(f"{seg.path.name}: no step {step} at its offset")
        return bytes(steps[0][2])

    # -- writing -----------------------------------------------------------------------------

    def add(self, closed: ClosedStep, previous: bytes, digest: bytes) -> str | None:
        """Archive one closed step (the node's Apply, in step order). A step already here is
        checked against the archived digest; one that does not continue the archive (a gap:
        the node synced a later snapshot; or another history) starts it over. Returns a note
        for the log when something was dropped, else None."""
        r = self.range
        if r is not None and closed.step < r.end:
            if closed.step < r.start or self.digest_at(closed.step) == digest:
                return None  # a replay over what we hold (or before it): nothing to add
            note = f"step {closed.step} differs from the archived one: archive started over"
            self.reset()
        elif r is not None and (closed.step > r.end or previous != self.segments[-1].last_digest):
            note = (
                f"step {closed.step} does not continue the archive (steps {r.start}.."
                f"{r.end - 1}): archive started over"
            )
            self.reset()
        else:
            note = None
        self._append(closed, previous, digest)
        while self.steps > self.max_steps and len(self.segments) > 1:
            old = self.segments.pop(0)
            old.path.unlink(missing_ok=True)
        return note

    def _append(self, closed: ClosedStep, previous: bytes, digest: bytes) -> None:
        seg = self.segments[-1] if self.segments else None
        frames = b""
        if seg is None or len(seg.offsets) >= self.segment_steps:
            self._close_file()
            path = self.folder / f"seg-{closed.step:012d}.zoa"
            seg = _Segment(closed.step, path, previous)
            frames += _frame(["zoa", VERSION, self.swarm, closed.step, previous])
            self.segments.append(seg)
            path.write_bytes(b"")
        index = {p: i for i, p in enumerate(seg.peers)}
        new = sorted({*closed.members, *closed.joiners} - set(index))
        if new:
            frames += _frame(["p", new])
            for p in new:
                index[p] = len(seg.peers)
                seg.peers.append(p)
        step_frame = _frame(
            [
                "s",
                closed.step,
                digest,
                [index[p] for p in closed.members],
                [index[p] for p in closed.included],
                b"".join(closed.codes[p] for p in closed.included),
                b"".join(closed.hashes.get(p, b"") for p in closed.included)
                if closed.hashes
                else b"",
                [index[p] for p in closed.joiners],
            ]
        )
        if self._file is None:
            self._file = seg.path.open("ab")
        offset = seg.size + len(frames)
        self._file.write(frames + step_frame)
        self._file.flush()
        seg.offsets.append(offset)
        seg.size = offset + len(step_frame)
        seg.last_digest = digest

    def reset(self) -> None:
        self._close_file()
        for seg in self.segments:
            seg.path.unlink(missing_ok=True)
        self.segments = []

    def close(self) -> None:
        self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- opening -----------------------------------------------------------------------------

    def _scan(self) -> None:
        """Load every segment, check each step's digest against the chain; cut a torn or
        corrupt tail, and drop what does not continue the segments before it."""
        paths = sorted(self.folder.glob("seg-*.zoa"))
        previous: bytes | None = None
        end: int | None = None
        for n, path in enumerate(paths):
            seg, problem = self._load_segment(path, previous, end)
            if seg is not None and seg.offsets:
                self.segments.append(seg)
                previous, end = seg.last_digest, seg.end
            if problem is None and seg is not None and seg.offsets:
                continue
            if seg is None or not seg.offsets:
                path.unlink(missing_ok=True)
                problem = problem or "no step in it"
                self._note(f"dropped {path.name}: {problem}")
            else:
                with path.open("r+b") as f:
                    f.truncate(seg.size)
                self._note(f"dropped the tail of {path.name} after step {seg.end - 1}: {problem}")
            for later in paths[n + 1 :]:
                later.unlink(missing_ok=True)
                self._note(f"dropped {later.name}: it follows a damaged segment")
            break

    def _load_segment(
        self, path: Path, previous: bytes | None, end: int | None
    ) -> tuple[_Segment | None, str | None]:
        data = path.read_bytes()
        frames, _, problem = _read_frames(data)
        if not frames:
            return None, problem or "empty"
        header = frames[0][2]
        if not (
            len(header) == 5
            and header[0] == "zoa"
            and header[1] == VERSION
            and isinstance(header[3], int)
            and isinstance(header[4], bytes)
            and len(header[4]) == DIGEST_BYTES
        ):
            return None, "not a ZO archive segment of this version"
        if header[2] != self.swarm:
            return None, f"of swarm {header[2]!r}, not {self.swarm!r}"
        first, before = header[3], header[4]
        if end is not None and (first != end or before != previous):
            return None, f"starts at step {first}, the segment before ends at step {end - 1}"
        seg = _Segment(first, path, before)
        seg.size = frames[0][1]
        chain = before
        for offset, after, payload in frames[1:]:
            kind = payload[0]
            if kind == "p" and len(payload) == 2 and isinstance(payload[1], list):
                seg.peers.extend(str(p) for p in payload[1])
            elif kind == "s":
                try:
                    closed, digest = _step_from(payload, seg.peers, self.samples)
                except ArchiveError as exc:
                    return seg, str(exc)
                if closed.step != seg.end or closed.digest(chain) != digest:
                    return seg, f"step {closed.step} does not chain to step {seg.end - 1}"
                seg.offsets.append(offset)
                seg.last_digest = chain = digest
            else:
                return seg, f"an unknown frame at byte {offset}"
            seg.size = after
        return seg, problem

    def _note(self, text: str) -> None:
        self.notes.append(text)
        log.warning("ZO archive %s: %s", self.folder, text)
