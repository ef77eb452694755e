"""CPU vs CUDA parity of shared-seed ZO: z(seed) bits and states after applied records.

Run: ``python tests/bench/zo_gpu_parity.py`` (from the repository root). Without CUDA it still
runs, measures the CPU side and reports ``"cuda_available": false``. The last line of output is
one JSON object; ``"parity_ok"`` is true when every parity-required comparison matched (z for
rademacher and sum4, and every state hash). Box-Muller is measured and reported, not required.

Reference beside shoal's figure: ``torch.randn`` on the same device (which itself gives
different streams on CPU and CUDA for one seed, and differs across CPU capabilities).
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer.zo import SeedRecord, ZOSettings, ZOTrainer, apply_step, state_hash
from trainer.zo_rng import ZKind, z_full

PEERS = ["12D3KooWAlice", "12D3KooWBob", "12D3KooWCarol", "12D3KooWDave"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], device: str, repeat: int = 5) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def compare_z(devices: list[str]) -> dict[str, dict[str, object]]:
    """For each kind: elements that differ between the first device and each other one."""
    out: dict[str, dict[str, object]] = {}
    for kind in ZKind:
        diff = 0
        total = 0
        for seed in (0, 1, 2**63 + 11, 0xFFFFFFFFFFFFFFFF):
            for n in (100_003, 1_000_003):
                ref = z_full(seed, "layer.weight", n, kind, devices[0])
                for dev in devices[1:]:
                    other = z_full(seed, "layer.weight", n, kind, dev).cpu()
                    diff += int((ref.view(torch.int32) != other.view(torch.int32)).sum())
                total += n
        out[kind.value] = {"elements": total, "differing": diff, "match": diff == 0}
    return out


def make_state(device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    shapes = {"a.weight": (256, 129), "a.bias": (256,), "b.weight": (1000, 256), "big": (70000,)}
    state = {}
    for name, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        z = z_full(7, name, n, ZKind.SUM4, device) * 0.05
        state[name] = z.reshape(shape).to(dtype)
    return state


def compare_states(devices: list[str]) -> dict[str, dict[str, object]]:
    rng = random.Random(1234)
    steps = [
        (step, [SeedRecord(step, p, i, rng.randint(-127, 127)) for p in PEERS for i in range(2)])
        for step in range(20)
    ]
    out: dict[str, dict[str, object]] = {}
    for kind in (ZKind.RADEMACHER, ZKind.SUM4):
        for dtype in (torch.float32, torch.bfloat16):
            settings = ZOSettings(swarm="parity", lr=1e-3, z_kind=kind, chunk_elements=1 << 16)
            hashes = {}
            for dev in devices:
                state = make_state(dev, dtype)
                for step, recs in steps:
                    apply_step(state, step, recs, settings)
                hashes[dev] = state_hash(state)
            out[f"{kind.value}/{str(dtype).removeprefix('torch.')}"] = {
                "hashes": hashes,
                "match": len(set(hashes.values())) == 1,
            }
    return out


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 64)
        self.out = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(self.emb(x))
        return out


def mixed_swarm(devices: list[str]) -> dict[str, object]:
    """One replica per device; each produces records from its own losses; all apply them all."""
    settings = ZOSettings(swarm="mixed", lr=1e-3)

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    def batches(seed: int, device: str):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(seed)
        while True:
            x = torch.randint(0, 64, (128,), generator=g)
            yield x.to(device), ((x * 5 + 3) % 64).to(device)

    torch.manual_seed(0)
    base = TinyLM()
    trainers = []
    for i, dev in enumerate(devices):
        model = TinyLM().to(dev)
        model.load_state_dict(base.state_dict())
        trainers.append(ZOTrainer(model, loss_fn, batches(i, dev), PEERS[i], settings))
    for step in range(10):
        records = [r for t in trainers for r in t.produce_records(step, 2)]
        for t in trainers:
            t.apply_step(step, records)
    hashes = {dev: t.state_hash() for dev, t in zip(devices, trainers, strict=True)}
    return {"hashes": hashes, "match": len(set(hashes.values())) == 1}


def timings(devices: list[str]) -> dict[str, dict[str, object]]:
    """Seconds for one z chunk (the size apply uses) and for applying one record."""
    out: dict[str, dict[str, object]] = {}
    for dev in devices:
        chunk = 1 << 20 if dev == "cpu" else 1 << 24
        n_params = 4 * chunk

        def rademacher(d: str = dev, n: int = chunk) -> object:
            return z_full(3, "w", n, ZKind.RADEMACHER, d)

        def sum4(d: str = dev, n: int = chunk) -> object:
            return z_full(3, "w", n, ZKind.SUM4, d)

        def randn(d: str = dev, n: int = chunk) -> object:
            return torch.randn(n, device=d)

        state = {"w": torch.zeros(n_params, device=dev)}
        settings = ZOSettings(swarm="t", chunk_elements=chunk)

        def apply_one(st: dict[str, torch.Tensor] = state, se: ZOSettings = settings) -> object:
            return apply_step(st, 0, [SeedRecord(0, "p", 0, 50)], se)

        out[dev] = {
            "chunk_elements": chunk,
            "rademacher_z_chunk_s": _time(rademacher, dev),
            "sum4_z_chunk_s": _time(sum4, dev),
            "reference_randn_chunk_s": _time(randn, dev),
            "apply_one_record_s": _time(apply_one, dev),
            "apply_params": n_params,
        }
    return out


def main() -> None:
    cuda = torch.cuda.is_available()
    devices = ["cpu", "cuda"] if cuda else ["cpu"]
    result: dict[str, object] = {
        "cuda_available": cuda,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if cuda:
        result["cuda_device"] = torch.cuda.get_device_name(0)
        torch.manual_seed(0)
        cpu_randn = torch.randn(9241)
        torch.manual_seed(0)
        cuda_randn = torch.randn(9241, device="cuda").cpu()
        result["reference_randn_cpu_vs_cuda_differing"] = int((cpu_randn != cuda_randn).sum())
        z = compare_z(devices)
        states = compare_states(devices)
        swarm = mixed_swarm(devices)
        result["z"] = z
        result["states"] = states
        result["mixed_swarm"] = swarm
        required = [z["rademacher"]["match"], z["sum4"]["match"], swarm["match"]]
        required += [v["match"] for v in states.values()]
        result["parity_ok"] = all(bool(x) for x in required)
        for kind, row in z.items():
            print(f"z {kind:11s} cpu vs cuda: {row['differing']} of {row['elements']} differ")
        for key, row in states.items():
            print(f"state after 20 steps {key:18s}: match={row['match']}")
        print(f"mixed cpu+cuda swarm, 10 steps: match={swarm['match']}")
    else:
        print("cuda unavailable: measuring the CPU side only")
        result["parity_ok"] = None
    times = timings(devices)
    result["timings"] = times
    for dev, row in times.items():
        print(dev, " ".join(f"{k}={v}" for k, v in row.items()))
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
