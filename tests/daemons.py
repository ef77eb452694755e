"""Real ``shoal start`` processes for multi-process tests: start, wait for, ask, kill."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from node.control import ControlError, DaemonNotRunning, call

_SCRIPT = Path(sys.executable).parent / "shoal"
# The installed console script when there is one (what a user runs), else the same entry point.
SHOAL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "node.cli"]
REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 60.0

# Fast membership for tests: records expire 4 s after their last refresh.
FAST = ["--heartbeat-s", "0.3", "--record-ttl-s", "4", "--join-retry-s", "0.5"]


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.1
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (DaemonNotRunning, ControlError, OSError) as exc:
            last_error = exc
        time.sleep(poll_s)
    raise AssertionError(
        f"timed out after {timeout_s} s waiting for {what} (last error: {last_error})"
    )


def free_port() -> int:
    """A loopback TCP port free a moment ago (for a daemon that must keep its address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """One ``shoal start`` process with its own home."""

    def __init__(
        self,
        home: Path,
        args: list[str],
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        self.home = home
        self.prefix = prefix or []  # e.g. enter a network namespace of the NAT lab
        self.args = args
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PYTHONFAULTHANDLER": "1",  # a native crash prints its Python stack
            **(env or {}),
        }
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()

    def start(self) -> Daemon:
        self.lines.clear()
        self._ready.clear()
        self.proc = subprocess.Popen(
            [*self.prefix, *SHOAL, "start", "--home", str(self.home), *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            cwd=REPO,
        )
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()
        return self

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.strip() == "ready":
                self._ready.set()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> Daemon:
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.1):
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n" + self.output())
            if time.monotonic() > deadline:
                raise AssertionError("node not ready in time:\n" + self.output())
        return self

    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def join_addr(self) -> str:
        for line in self.lines:
            if line.startswith("join with"):
                return line.split()[-1]
        raise AssertionError("node printed no join address:\n" + self.output())

    @property
    def peer_id(self) -> str:
        return self.join_addr.rsplit("/p2p/", 1)[1]

    def control(self, cmd: str, timeout_s: float = 5.0, **args: Any) -> Any:
        return call(self.home / "control.sock", cmd, timeout_s=timeout_s, **args)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.control("status")
        return result

    def view(self) -> set[str]:
        """Peer ids this node counts as live members, itself included."""
        status = self.status()
        return {status["peer_id"], *(p["peer_id"] for p in status["peers"])}

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*SHOAL, *args, "--home", str(self.home)],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=REPO,
            check=check,
            timeout=60,
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 15) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@contextmanager
def swarm_of(tmp: Path) -> Iterator[Callable[..., Daemon]]:
    """A factory of daemons that are all killed when the block ends."""
    daemons: list[Daemon] = []

    def spawn(
        name: str,
        *args: str,
        join: Daemon | None = None,
        env: dict[str, str] | None = None,
        listen: str = "/ip4/127.0.0.1/tcp/0",
    ) -> Daemon:
        extra = ["--join", join.join_addr] if join is not None else []
        daemon = Daemon(tmp / name, ["--listen", listen, *FAST, *extra, *args], env)
        daemons.append(daemon)
        return daemon.start()

    try:
        yield spawn
    finally:
        for daemon in daemons:
            daemon.kill()


def check_workload_args(elems: int, join_wait_s: float = 2) -> list[str]:
    """`shoal start` flags for the all-reduce check workload on ``elems`` float32 per member."""
    return [
        "--allreduce-workload",
        "check",
        "--allreduce-check-elems",
        str(elems),
        "--allreduce-join-wait-s",
        str(join_wait_s),
    ]
