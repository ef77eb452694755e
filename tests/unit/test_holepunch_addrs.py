"""DCUtR's CONNECT carries our public address: each side waits (bounded) until it knows one.

The lab failure this guards against: the relayed connection came up before A's probes told A
its public address, A's CONNECT listed none, B had nothing to dial and all three attempts
failed, leaving the pair on the relay for good."""

from __future__ import annotations

from typing import Any

import trio

from net.holepunch import HolePuncher, HolePunchSettings


class _Host:
    def set_stream_handler(self, protocol: str, handler: Any) -> None:
        pass


def puncher(addrs: list[str], observed: trio.Event, wait_s: float = 3.0) -> HolePuncher:
    return HolePuncher(
        _Host(),  # type: ignore[arg-type]
        "/shoal/dcutr/1",
        HolePunchSettings(addrs_wait_s=wait_s),
        own_addrs=lambda: list(addrs),
        wait_own_addrs=observed.wait,
        source=lambda: None,
        is_direct=lambda peer: False,
        on_direct=lambda peer: None,
    )


async def test_connect_addresses_wait_for_the_first_observation(autojump_clock: Any) -> None:
    addrs: list[str] = []
    observed = trio.Event()
    p = puncher(addrs, observed)
    got: list[list[str]] = []
    async with trio.open_nursery() as nursery:

        async def ask() -> None:
            got.append(await p._addrs())

        nursery.start_soon(ask)
        await trio.sleep(1.0)  # (autojump clock) a member's probe server answers after 1 s
        assert got == []
        addrs.append("/ip4/203.0.113.1/tcp/4001")
        observed.set()
    assert got == [["/ip4/203.0.113.1/tcp/4001"]]


async def test_no_observation_in_time_goes_on_without_one(autojump_clock: Any) -> None:
    p = puncher([], trio.Event(), wait_s=3.0)
    start = trio.current_time()
    assert await p._addrs() == []
    assert trio.current_time() - start == 3.0


async def test_a_known_address_is_used_at_once(autojump_clock: Any) -> None:
    p = puncher(["/ip4/203.0.113.2/tcp/4001"], trio.Event())
    start = trio.current_time()
    assert await p._addrs() == ["/ip4/203.0.113.2/tcp/4001"]
    assert trio.current_time() == start
