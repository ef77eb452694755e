"""The local control API: JSON lines over a unix socket in the node's home, mode 0600.

One request per connection: ``{"cmd": "status"}`` -> ``{"ok": true, "result": {...}}`` or
``{"ok": false, "error": "..."}``. Only the node's owner can open the socket (file mode 0600
inside a 0700 home), so the API needs no authentication of its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger("shoal.node.control")

MAX_REQUEST_BYTES = 64 * 1024
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
REQUEST_TIMEOUT_S = 5.0

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class DaemonNotRunning(RuntimeError):
    """No daemon answers on the control socket."""


class ControlError(RuntimeError):
    """The daemon answered with an error."""


def socket_in_use(path: Path) -> bool:
    """True if a live daemon answers at ``path``; a stale socket file is removed."""
    if not path.exists():
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        path.unlink(missing_ok=True)  # left behind by a node that was killed
        return False
    finally:
        probe.close()


async def serve_control(
    path: Path, handler: Handler, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        await trio.serve_listeners(lambda s: _serve_one(s, handler), [listener])
    finally:
        path.unlink(missing_ok=True)


async def _serve_one(stream: trio.SocketStream, handler: Handler) -> None:
    async with stream:
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                request = await _read_request(stream)
            result = await handler(request)
            reply: dict[str, Any] = {"ok": True, "result": result}
        except trio.TooSlowError:
            log.warning("control request timed out after %.0f s", REQUEST_TIMEOUT_S)
            return
        except ControlError as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control request failed")
            reply = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(json.dumps(reply).encode() + b"\n")


async def _read_request(stream: trio.SocketStream) -> dict[str, Any]:
    buffer = bytearray()
    while b"\n" not in buffer:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buffer += chunk
        if len(buffer) > MAX_REQUEST_BYTES:
            log.warning("control request over %d bytes rejected", MAX_REQUEST_BYTES)
            raise ControlError(f"request exceeds {MAX_REQUEST_BYTES} bytes")
    try:
        request = json.loads(buffer.split(b"\n", 1)[0])
    except (ValueError, UnicodeDecodeError):
        log.warning("control request is not JSON: %r", bytes(buffer[:80]))
        raise ControlError("request is not a JSON object line") from None
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        raise ControlError('request must be a JSON object with a string "cmd"')
    return request


def call(path: Path, cmd: str, timeout_s: float = REQUEST_TIMEOUT_S, **args: Any) -> Any:
    """Ask the daemon at ``path`` (blocking; for the CLI). Raises DaemonNotRunning/ControlError."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(timeout_s)
    try:
        try:
            client.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(str(path)) from exc
        client.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buffer = bytearray()
        while not buffer.endswith(b"\n"):
            chunk = client.recv(1 << 16)
            if not chunk:
                break
            buffer += chunk
            if len(buffer) > MAX_RESPONSE_BYTES:
                raise ControlError("daemon response too large")
    finally:
        client.close()
    if not buffer:
        raise ControlError("daemon closed the connection without answering")
    reply = json.loads(buffer)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "unknown error"))
    return reply["result"]
