"""DiLoCo against data-parallel training and one worker alone, at the same total tokens.

Four workers train the built-in `tiny` transformer on the default corpus (Python's standard
library, four disjoint shards), in one process, one after another on the CPU:

(a) DiLoCo: H inner AdamW steps per worker per round, then shoal's all-reduce (the ring of
    `protocols.simnet.RoundRunner`, the same code the daemon runs, over in-memory mailboxes)
    of the pseudo-gradients weighted by tokens, and the outer Nesterov step. Bench defaults:
    H=20 with uint8 pseudo-gradients (a quarter of fp32's bytes, so ~4x the outer steps of
    H=50 fp32 for about the same bytes), outer lr 0.7, momentum 0.6: the best of a
    reduced-scale sweep (BENCHMARKS.md); the trainer's defaults (0.7 / 0.9, the paper's) are
    for runs with hundreds of outer steps, this one has 25;
(b) data parallel (the DDP baseline): every step each worker's gradient on its own batch goes
    through the same all-reduce; the averaged gradient drives one AdamW step on every replica
    (the replicas stay identical, so one model stands for the four);
(c) one worker alone on the whole train text, with as many steps as the four workers together.

All three see the same number of training tokens and, unless flags say otherwise, the same
AdamW settings (lr 1e-3 was the best of 5e-4..2e-3 for both DDP and DiLoCo; no warmup
unless --warmup, which then applies to all three runs). Reported:
the final held-out loss of each, the tensor bytes each worker sends in the all-reduce (counted
at the transport), their ratios, and the loss curves as a PNG (with matplotlib installed).

    .venv/bin/python tests/bench/bench_diloco.py [--steps 500] [--inner-steps 20] [--png PATH]

(`--help` lists the sweep flags: outer lr/momentum/Nesterov, per-run lr, warmup, cosine,
shard layout, `--runs` to do only some of the three.)

The last stdout line is one JSON object. Targets: loss_ratio_vs_ddp <= 1.03 and
bytes_ratio_ddp_over_diloco >= 50 (the DiLoCo paper: matched at 500x less communication).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from protocols.allreduce import Completed
from protocols.codec import Compression
from protocols.simnet import SimSwarm
from trainer.data import (
    CorpusSettings,
    TokenBlocks,
    evaluate_loss,
    heldout_batches,
    load_corpus,
)
from trainer.diloco import DiLoCoSettings, DiLoCoWorker, ParamLayout, warmup_lr
from trainer.model import build_model, model_config, next_token_loss

WORKERS = 4
PEERS = [f"worker{i}" for i in range(WORKERS)]


class CountingTransport:
    """Delegates to a member's transport and counts the tensor bytes it sends."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.bytes_sent = 0

    async def send_control(self, peer: str, msg: dict[str, Any]) -> None:
        await self.inner.send_control(peer, msg)

    async def send_tensor(self, peer: str, tag: str, data: bytes) -> None:
        self.bytes_sent += len(data)
        await self.inner.send_tensor(peer, tag, data)

    async def recv_tensor(self, peer: str, tag: str) -> bytes:
        data: bytes = await self.inner.recv_tensor(peer, tag)
        return data

    def discard_tensors(self, tag_prefix: str) -> None:
        self.inner.discard_tensors(tag_prefix)


class Ring:
    """Four simulated members running shoal's all-reduce; counts bytes per member."""

    def __init__(self, swarm: SimSwarm) -> None:
        self.swarm = swarm
        self.counters = {}
        for peer in PEERS:
            runner = swarm.members[peer].runner
            counter = CountingTransport(runner.transport)
            runner.transport = counter
            self.counters[peer] = counter

    async def mean(
        self,
        buffers: list[torch.Tensor],
        weights: list[float],
        compression: Compression = Compression.NONE,
    ) -> None:
        """In place: every buffer becomes the weighted mean (bit-identical everywhere)."""
        inputs = {p: {"x": b} for p, b in zip(PEERS, buffers, strict=True)}
        results = await self.swarm.allreduce_all(
            inputs, dict(zip(PEERS, weights, strict=True)), compression
        )
        for peer in PEERS:
            if not isinstance(results[peer].outcome, Completed):
                raise RuntimeError(f"{peer}: round not completed: {results[peer].outcome}")

    def bytes_per_worker(self) -> float:
        return sum(c.bytes_sent for c in self.counters.values()) / WORKERS


def adamw(params: Any, settings: DiLoCoSettings, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        params,
        lr=lr,
        betas=settings.inner_betas,
        eps=settings.inner_eps,
        weight_decay=settings.inner_weight_decay,
    )


def set_lr(
    optimizer: torch.optim.Optimizer, args: argparse.Namespace, lr: float, step: int, total: int
) -> None:
    """The baselines' lr at `step` (from 0) of `total`: DiLoCo's inner lr rule (warmup, and
    with --cosine a decay over the run's own steps)."""
    for group in optimizer.param_groups:
        group["lr"] = warmup_lr(lr, args.warmup, step, decay_steps=total if args.cosine else None)


async def run_diloco(
    args: argparse.Namespace, setup: dict[str, Any], ring: Ring, curve: list[Any]
) -> float:
    settings = setup["settings"]
    workers = [
        DiLoCoWorker(
            build_model(setup["config"], seed=0),
            TokenBlocks(
                setup["shards"][i], batch_size=args.batch, context_tokens=setup["ctx"], seed=i
            ),
            settings,
        )
        for i in range(WORKERS)
    ]
    tokens = 0
    curve.append((0, workers[0].evaluate(setup["heldout"])))
    for _ in range(args.steps // args.inner_steps):
        grads = [w.train_round() for w in workers]
        tokens += sum(g.tokens for g in grads)
        await ring.mean(
            [g.buffer for g in grads],
            [float(g.tokens) for g in grads],
            Compression(args.diloco_compression),
        )
        for w, g in zip(workers, grads, strict=True):
            w.apply_outer(g.buffer, round_index=w.revision)
            if args.reset_inner_state:  # ablation: fresh AdamW moments every round
                w.inner = adamw(w.model.parameters(), settings, settings.inner_lr)
        hashes = {w.state_hash() for w in workers}
        assert len(hashes) == 1, "DiLoCo replicas diverged"
        curve.append((tokens, workers[0].evaluate(setup["heldout"])))
        print(f"diloco  tokens {tokens:>9}  eval {curve[-1][1]:.4f}", file=sys.stderr)
    return float(curve[-1][1])


async def run_ddp(
    args: argparse.Namespace, setup: dict[str, Any], ring: Ring, curve: list[Any]
) -> float:
    settings = setup["settings"]
    model = build_model(setup["config"], seed=0)
    optimizer = adamw(model.parameters(), settings, args.ddp_lr)
    layout = ParamLayout.of(model)
    params = [p for _, p in model.named_parameters()]
    streams = [
        TokenBlocks(setup["shards"][i], batch_size=args.batch, context_tokens=setup["ctx"], seed=i)
        for i in range(WORKERS)
    ]
    curve.append((0, evaluate_loss(model, setup["heldout"])))
    tokens = 0
    for step in range(1, args.steps + 1):
        model.train()
        flats, weights = [], []
        for stream in streams:
            inputs, targets = next(stream)
            model.zero_grad(set_to_none=True)
            next_token_loss(model, inputs, targets).backward()
            flat = torch.empty(layout.numel, dtype=torch.float32)
            for slot, p in zip(layout.slots, params, strict=True):
                assert p.grad is not None
                flat[slot.offset : slot.offset + slot.numel].copy_(p.grad.reshape(-1))
            flats.append(flat)
            weights.append(float(targets.numel()))
            tokens += targets.numel()
        await ring.mean(flats, weights)
        for slot, p in zip(layout.slots, params, strict=True):
            p.grad = flats[0][slot.offset : slot.offset + slot.numel].view(slot.shape).clone()
        if settings.inner_grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.inner_grad_clip_norm)
        set_lr(optimizer, args, args.ddp_lr, step - 1, args.steps)
        optimizer.step()
        if step % args.inner_steps == 0:
            curve.append((tokens, evaluate_loss(model, setup["heldout"])))
            print(f"ddp     tokens {tokens:>9}  eval {curve[-1][1]:.4f}", file=sys.stderr)
    return float(curve[-1][1])


def run_single(args: argparse.Namespace, setup: dict[str, Any], curve: list[Any]) -> float:
    settings = setup["settings"]
    model = build_model(setup["config"], seed=0)
    optimizer = adamw(model.parameters(), settings, args.single_lr)
    stream = TokenBlocks(
        setup["train"], batch_size=args.batch, context_tokens=setup["ctx"], seed=99
    )
    curve.append((0, evaluate_loss(model, setup["heldout"])))
    tokens = 0
    for step in range(1, WORKERS * args.steps + 1):
        model.train()
        inputs, targets = next(stream)
        optimizer.zero_grad(set_to_none=True)
        next_token_loss(model, inputs, targets).backward()
        if settings.inner_grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.inner_grad_clip_norm)
        set_lr(optimizer, args, args.single_lr, step - 1, WORKERS * args.steps)
        optimizer.step()
        tokens += targets.numel()
        if step % (WORKERS * args.inner_steps) == 0:
            curve.append((tokens, evaluate_loss(model, setup["heldout"])))
            print(f"single  tokens {tokens:>9}  eval {curve[-1][1]:.4f}", file=sys.stderr)
    return float(curve[-1][1])


def plot(path: Path, curves: dict[str, list[Any]], title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve in curves.items():
        ax.plot([t / 1e6 for t, _ in curve], [loss for _, loss in curve], marker=".", label=label)
    ax.set_xlabel("training tokens, all workers (millions)")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return str(path)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    config = model_config("tiny")
    corpus = load_corpus(CorpusSettings(max_total_bytes=args.corpus_bytes))
    settings = DiLoCoSettings(
        inner_steps=args.inner_steps,
        inner_lr=args.diloco_lr,
        inner_warmup_steps=args.diloco_warmup,
        inner_decay_steps=args.steps if args.cosine else None,
        outer_lr=args.outer_lr,
        outer_momentum=args.outer_momentum,
        outer_nesterov=args.outer_nesterov,
    )
    interleaved = args.shards == "interleaved"
    setup = {
        "config": config,
        "ctx": config.context_tokens,
        "settings": settings,
        "train": corpus.train_tokens,
        "shards": [corpus.train_shard(i, WORKERS, interleaved=interleaved) for i in range(WORKERS)],
        "heldout": heldout_batches(
            corpus.heldout_tokens,
            batch_size=16,
            context_tokens=config.context_tokens,
            max_batches=args.eval_batches,
        ),
    }
    curves: dict[str, list[Any]] = {"diloco": [], "ddp": [], "single": []}
    timings: dict[str, float] = {}
    bytes_sent: dict[str, float] = {}
    losses: dict[str, float] = {}
    runs: list[tuple[str, Callable[..., Any]]] = [("diloco", run_diloco), ("ddp", run_ddp)]
    for name, fn in runs:
        if name not in args.runs:
            continue
        async with trio.open_nursery() as nursery:
            swarm = SimSwarm(nursery, group=name)
            swarm.start(PEERS)
            ring = Ring(swarm)
            started = time.perf_counter()
            losses[name] = await fn(args, setup, ring, curves[name])
            timings[name] = time.perf_counter() - started
            bytes_sent[name] = ring.bytes_per_worker()
            nursery.cancel_scope.cancel()
    if "single" in args.runs:
        started = time.perf_counter()
        losses["single"] = run_single(args, setup, curves["single"])
        timings["single"] = time.perf_counter() - started
    curves = {k: v for k, v in curves.items() if v}
    title = (
        f"tiny ({config.parameter_count():,} params), {WORKERS} workers, "
        f"{args.steps} steps x batch {args.batch} x {config.context_tokens} tokens each\n"
        f"DiLoCo H={args.inner_steps}"
        + ("" if args.diloco_compression == "none" else f" ({args.diloco_compression})")
        + f", outer lr {args.outer_lr} mom {args.outer_momentum}"
        + ("" if args.outer_nesterov else " (no Nesterov)")
        + f"; {args.shards} shards"
    )
    png = plot(Path(args.png), curves, title) if args.png else None

    def loss(name: str) -> float | None:
        return round(losses[name], 4) if name in losses else None

    both = "diloco" in losses and "ddp" in losses
    return {
        "bench": "diloco",
        "model": "tiny",
        "params": config.parameter_count(),
        "workers": WORKERS,
        "steps_per_worker": args.steps,
        "inner_steps": args.inner_steps,
        "diloco_compression": args.diloco_compression,
        "batch": args.batch,
        "shards": args.shards,
        "lr": {"diloco_inner": args.diloco_lr, "ddp": args.ddp_lr, "single": args.single_lr},
        "warmup": {"diloco": args.diloco_warmup, "baselines": args.warmup},
        "cosine": args.cosine,
        "outer": {
            "lr": args.outer_lr,
            "momentum": args.outer_momentum,
            "nesterov": args.outer_nesterov,
        },
        "tokens_total": WORKERS * args.steps * args.batch * config.context_tokens,
        "diloco_eval_loss": loss("diloco"),
        "ddp_eval_loss": loss("ddp"),
        "single_eval_loss": loss("single"),
        "initial_eval_loss": round(next(iter(curves.values()))[0][1], 4),
        "loss_ratio_vs_ddp": round(losses["diloco"] / losses["ddp"], 4) if both else None,
        "diloco_bytes_per_worker": int(bytes_sent.get("diloco", 0)),
        "ddp_bytes_per_worker": int(bytes_sent.get("ddp", 0)),
        "single_bytes": 0,
        "bytes_ratio_ddp_over_diloco": (
            round(bytes_sent["ddp"] / bytes_sent["diloco"], 2) if both else None
        ),
        "curves": {k: [round(loss, 4) for _, loss in v] for k, v in curves.items()},
        "wall_s": {k: round(v, 1) for k, v in timings.items()},
        "png": png,
        "targets": {"loss_ratio_vs_ddp": "<= 1.03", "bytes_ratio_ddp_over_diloco": ">= 50"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500, help="inner steps per worker")
    parser.add_argument("--inner-steps", type=int, default=20, help="DiLoCo H")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--diloco-compression",
        default="uint8",
        choices=[c.value for c in Compression],
        help="codec of DiLoCo's pseudo-gradients in the all-reduce (the baseline sends fp32)",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW lr (all three runs)")
    parser.add_argument("--diloco-lr", type=float, help="DiLoCo's inner AdamW lr (default --lr)")
    parser.add_argument("--ddp-lr", type=float, help="the DDP baseline's lr (default --lr)")
    parser.add_argument("--single-lr", type=float, help="the single worker's lr (default --lr)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="linear lr warmup steps of every run (each run's own steps)",
    )
    parser.add_argument(
        "--reset-inner-state",
        action="store_true",
        help="ablation: DiLoCo workers start each round with fresh AdamW moments",
    )
    parser.add_argument(
        "--cosine",
        action="store_true",
        help="cosine-decay every run's lr to 0.1x over its own steps (after the warmup)",
    )
    parser.add_argument(
        "--diloco-warmup", type=int, help="DiLoCo's inner lr warmup steps (default --warmup)"
    )
    parser.add_argument("--outer-lr", type=float, default=0.7)
    parser.add_argument("--outer-momentum", type=float, default=0.6)
    parser.add_argument("--outer-nesterov", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--shards",
        default="contiguous",
        choices=["contiguous", "interleaved"],
        help="workers' train shards: contiguous slices of the sorted files (non-IID) or "
        "documents dealt out in turn (each shard samples the whole corpus); DiLoCo and DDP",
    )
    parser.add_argument(
        "--runs",
        default="diloco,ddp,single",
        type=lambda v: set(v.split(",")),
        help="comma list of runs to do (sweeps): diloco, ddp, single",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: shared cores)")
    parser.add_argument("--corpus-bytes", type=int, default=8 * 2**20)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--png", default="tests/bench/diloco_curves.png", help="'' = none")
    args = parser.parse_args()
    for name in ("diloco_lr", "ddp_lr", "single_lr"):
        if getattr(args, name) is None:
            setattr(args, name, args.lr)
    if args.diloco_warmup is None:
        args.diloco_warmup = args.warmup
    if not args.runs or args.runs - {"diloco", "ddp", "single"}:
        parser.error("--runs takes a comma list of diloco, ddp, single")
    if args.steps % args.inner_steps:
        parser.error("--steps must be a multiple of --inner-steps")
    print(json.dumps(trio.run(main_async, args)))


if __name__ == "__main__":
    main()
