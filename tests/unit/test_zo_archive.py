"""The ZO replay archive on disk (node/zo_archive.py): append, reopen after a restart, a torn
last entry cut off, ranges served as a zo.log the log machine accepts, the bound."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from node.zo_archive import ArchiveError, ZOArchive
from protocols.zo_log import ClosedStep, ZOLog, ZOLogSettings, encode_log, genesis_digest

GENESIS = genesis_digest("arch", 0, b"t" * 16)
PEERS = ("12D3KooWa", "12D3KooWb", "12D3KooWc")


def chain(n: int, start: int = 0, before: bytes = GENESIS) -> list[tuple[ClosedStep, bytes, bytes]]:
    """n closed steps (every 4th with state hashes; c joins at step 5): (step, prev, digest)."""
    out = []
    previous = before
    members: tuple[str, ...] = PEERS[:2]
    for step in range(start, start + n):
        joiners = (PEERS[2],) if step == 5 else ()
        hashes = {p: bytes([step % 256]) * 16 for p in members} if step % 4 == 0 else {}
        closed = ClosedStep(
            step,
            members,
            members,
            {p: bytes([(step + i) % 127 + 1]) for i, p in enumerate(members)},
            hashes,
            joiners,
        )
        digest = closed.digest(previous)
        out.append((closed, previous, digest))
        previous = digest
        members = closed.next_members
    return out


def archive(folder: Path, max_steps: int = 1000) -> ZOArchive:
    return ZOArchive(folder, "arch", samples=1, max_steps=max_steps)


def test_steps_appended_survive_a_restart_and_are_served_as_an_authenticated_log(
    tmp_path: Path,
) -> None:
    steps = chain(300)
    a = archive(tmp_path)
    assert a.range is None
    for closed, previous, digest in steps:
        assert a.add(closed, previous, digest) is None
    assert a.range is not None and (a.range.start, a.range.end, a.range.before) == (0, 300, GENESIS)
    assert len(a.segments) == 2  # 250 steps a segment (a quarter of the bound)
    a.close()
    b = archive(tmp_path)  # a restart: everything is read back and the chain re-checked
    assert b.range == a.range and b.notes == []
    assert b.size_bytes < 300 * 60  # peer ids once a segment, not once a step
    previous, served = b.read(240, 260)  # across the segment boundary
    assert previous == steps[239][2] and served == [s[0] for s in steps[240:260]]
    # What a joiner gets: a zo.log its machine accepts from step 0 on.
    joiner = ZOLog("z", ZOLogSettings(), GENESIS, 0, None, 0.0)
    joiner.fetch_from("a")
    prev0, first = b.read(0, 200)
    events = joiner.on_message("a", encode_log(first, prev0) | {"h": 299}, 0.0)
    assert joiner.next_close == 200 and joiner.rejected_total == 0 and events
    with pytest.raises(ArchiveError):
        b.read(290, 310)  # beyond the archive
    # It goes on where it stopped.
    more = chain(5, 300, steps[-1][2])
    for closed, previous, digest in more:
        assert b.add(closed, previous, digest) is None
    assert b.range is not None and b.range.end == 305


def test_a_torn_last_entry_is_dropped_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = archive(tmp_path)
    steps = chain(20)
    for closed, previous, digest in steps:
        a.add(closed, previous, digest)
    a.close()
    (segment,) = tmp_path.glob("seg-*.zoa")
    data = segment.read_bytes()
    segment.write_bytes(data[:-7])  # a kill in the middle of the last write
    with caplog.at_level(logging.WARNING, logger="shoal.node.zo.archive"):
        b = archive(tmp_path)
    assert b.range is not None and b.range.end == 19
    assert "dropped the tail" in caplog.text and "after step 18" in caplog.text
    assert len(segment.read_bytes()) < len(data) - 7  # cut at the last whole entry
    # The node re-takes step 19 when it replays: appended again, the chain intact.
    closed, previous, digest = steps[19]
    assert b.add(closed, previous, digest) is None
    b.close()
    assert archive(tmp_path).range == b.range


def test_a_corrupt_entry_ends_the_archive_there(tmp_path: Path) -> None:
    a = archive(tmp_path)
    for closed, previous, digest in chain(20):
        a.add(closed, previous, digest)
    a.close()
    (segment,) = tmp_path.glob("seg-*.zoa")
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte in the middle: CRC (or chain) fails
    segment.write_bytes(bytes(data))
    b = archive(tmp_path)
    assert b.range is not None and 0 < b.range.end < 20 and b.notes


def test_a_replay_over_archived_steps_adds_nothing_and_a_gap_starts_over(tmp_path: Path) -> None:
    a = archive(tmp_path)
    steps = chain(30)
    for closed, previous, digest in steps:
        a.add(closed, previous, digest)
    size = a.size_bytes
    for closed, previous, digest in steps[10:30]:  # a re-sync from the snapshot of step 10
        assert a.add(closed, previous, digest) is None
    assert a.size_bytes == size
    later = chain(3, 100, b"\x01" * 16)  # synced a far later snapshot: no longer contiguous
    note = a.add(*later[0])
    assert note is not None and "does not continue" in note
    assert a.range is not None and (a.range.start, a.range.end) == (100, 101)


def test_the_archive_is_bounded_by_dropping_its_oldest_segment(tmp_path: Path) -> None:
    a = archive(tmp_path, max_steps=40)  # segments of 10 steps
    for closed, previous, digest in chain(95):
        a.add(closed, previous, digest)
    assert a.steps <= 40 and a.range is not None and a.range.end == 95
    assert a.range.start == 60 and len(list(tmp_path.glob("seg-*.zoa"))) == 4
    # It no longer reaches step 0, and says so to a joiner (its offer's start is 60).


def test_an_archive_of_another_swarm_is_not_taken(tmp_path: Path) -> None:
    a = archive(tmp_path)
    for closed, previous, digest in chain(5):
        a.add(closed, previous, digest)
    a.close()
    other = ZOArchive(tmp_path, "another", samples=1, max_steps=1000)
    assert other.range is None and "of swarm 'arch'" in other.notes[0]
