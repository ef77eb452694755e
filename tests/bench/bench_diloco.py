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

Warm start (`--pretrain-steps N`, the DiLoCo paper's protocol: DiLoCo and its baseline start
from a pretrained checkpoint): before the three runs one process trains the model with plain
AdamW for N steps on the whole train text (`--pretrain-lr`, `--pretrain-warmup`,
`--pretrain-batch`); all three runs then start from that checkpoint with fresh optimizer
state and the same token budget as without it. The checkpoint is a safetensors file under
`--pretrain-cache`, named by a key of the model config, the pretraining settings, the seed
and a hash of the train tokens, so a rerun with the same key loads it instead of training.

The last stdout line is one JSON object. Targets: loss_ratio_vs_ddp <= 1.03 and
bytes_ratio_ddp_over_diloco >= 50 (the DiLoCo paper: matched at 500x less communication).
The defaults (warm start from 4000 steps, cached after the first run) gave 0.993 (80x);
from random init (`--pretrain-steps 0`) 1.065 (80x): BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from protocols.allreduce import Completed
from protocols.codec import Compression
from protocols.simnet import SimSwarm
from trainer.checkpoint import (
    CheckpointError,
    read_safetensors,
    tensor_raw_bytes,
    write_atomically,
)
from trainer.data import (
    CorpusSettings,
    TokenBlocks,
    evaluate_loss,
    heldout_batches,
    load_corpus,
)
from trainer.diloco import DiLoCoSettings, DiLoCoWorker, ParamLayout, warmup_lr
from trainer.model import MODEL_SIZES, build_model, model_config, next_token_loss

WORKERS = 4
PEERS = [f"worker{i}" for i in range(WORKERS)]


class CountingTransport:
    """Delegates to a member's transport and counts the tensor bytes it sends."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.bytes_sent = 0

    async def send_control(self, peer: str, msg: dict[str, Any]) -> None:
        await self.inner.send_control(peer, msg)

    async def send_tensor(self, peer: str, tag: str, data: bytes | bytearray | memoryview) -> None:
        self.bytes_sent += memoryview(data).nbytes
        await self.inner.send_tensor(peer, tag, data)

    async def recv_tensor(
        self, peer: str, tag: str, into: memoryview | None = None
    ) -> bytes | bytearray | memoryview:
        data: bytes | bytearray | memoryview = await self.inner.recv_tensor(peer, tag, into)
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


def initial_model(setup: dict[str, Any]) -> torch.nn.Module:
    """The model every run starts from: `--seed`'s init, then the warm-start weights if any."""
    model = build_model(setup["config"], seed=setup["seed"])
    state = setup.get("initial_state")
    if state is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(state[name])
    return model


def pretrain_key(
    args: argparse.Namespace, config: Any, train_tokens: torch.Tensor
) -> dict[str, str]:
    """What the warm-start checkpoint depends on; stored in the file and checked on load."""
    corpus_sha = hashlib.sha256(tensor_raw_bytes(train_tokens.contiguous())).hexdigest()
    s = DiLoCoSettings()
    return {
        "model": args.model,
        "config": json.dumps(asdict(config), sort_keys=True, default=str),
        "steps": str(args.pretrain_steps),
        "seed": str(args.seed),
        "lr": repr(args.pretrain_lr),
        "warmup": str(args.pretrain_warmup),
        "batch": str(args.pretrain_batch),
        "adamw": repr((s.inner_betas, s.inner_eps, s.inner_weight_decay, s.inner_grad_clip_norm)),
        "corpus_sha256": corpus_sha,
    }


def pretrain(
    args: argparse.Namespace, setup: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Warm start: `--pretrain-steps` of plain AdamW on the whole train text, or the cached
    checkpoint of the same key. Returns the weights and a summary for the JSON line."""
    key = pretrain_key(args, setup["config"], setup["train"])
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(args.pretrain_cache) / (
        f"pretrain-{args.model}-{args.pretrain_steps}steps-seed{args.seed}-{digest}.safetensors"
    )
    model = build_model(setup["config"], seed=setup["seed"])
    summary: dict[str, Any] = {
        "steps": args.pretrain_steps,
        "lr": args.pretrain_lr,
        "warmup": args.pretrain_warmup,
        "batch": args.pretrain_batch,
        "random_init_eval_loss": round(evaluate_loss(model, setup["heldout"]), 4),
        "checkpoint": str(path),
    }
    if path.exists():
        try:
            checkpoint = read_safetensors(path)
        except CheckpointError as exc:
            raise SystemExit(f"{path}: {exc}; delete it to pretrain again") from exc
        if checkpoint.metadata != key:
            raise SystemExit(f"{path}: its key does not match this run's; delete it")
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        if {n: tuple(t.shape) for n, t in checkpoint.tensors.items()} != shapes:
            raise SystemExit(f"{path}: tensors do not match the model's parameters; delete it")
        summary.update(cached=True, wall_s=0.0)
        print(f"pretrain: loaded {path}", file=sys.stderr)
        return checkpoint.tensors, summary
    settings = DiLoCoSettings()
    optimizer = adamw(model.parameters(), settings, args.pretrain_lr)
    # A seed no run's stream uses (workers use 0..3, the single worker 99).
    stream = TokenBlocks(
        setup["train"],
        batch_size=args.pretrain_batch,
        context_tokens=setup["ctx"],
        seed=1000 + args.seed,
    )
    started = time.perf_counter()
    for step in range(args.pretrain_steps):
        for group in optimizer.param_groups:
            group["lr"] = warmup_lr(args.pretrain_lr, args.pretrain_warmup, step)
        plain_step(model, optimizer, stream, settings)
        if (step + 1) % 500 == 0:
            loss = evaluate_loss(model, setup["heldout"])
            print(f"pretrain step {step + 1:>6}  eval {loss:.4f}", file=sys.stderr)
    tensors = {n: p.detach().clone() for n, p in model.named_parameters()}
    write_atomically(path, tensors, key)
    summary.update(cached=False, wall_s=round(time.perf_counter() - started, 1))
    return tensors, summary


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
            initial_model(setup),
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
    model = initial_model(setup)
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


def plain_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, stream: Any, settings: Any
) -> int:
    """One plain AdamW step on the next batch (lr already set); returns its target tokens."""
    model.train()
    inputs, targets = next(stream)
    optimizer.zero_grad(set_to_none=True)
    next_token_loss(model, inputs, targets).backward()
    if settings.inner_grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.inner_grad_clip_norm)
    optimizer.step()
    return int(targets.numel())


def run_single(args: argparse.Namespace, setup: dict[str, Any], curve: list[Any]) -> float:
    settings = setup["settings"]
    model = initial_model(setup)
    optimizer = adamw(model.parameters(), settings, args.single_lr)
    stream = TokenBlocks(
        setup["train"], batch_size=args.batch, context_tokens=setup["ctx"], seed=99
    )
    curve.append((0, evaluate_loss(model, setup["heldout"])))
    tokens = 0
    for step in range(1, WORKERS * args.steps + 1):
        set_lr(optimizer, args, args.single_lr, step - 1, WORKERS * args.steps)
        tokens += plain_step(model, optimizer, stream, settings)
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
    config = model_config(args.model)
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
    setup: dict[str, Any] = {
        "config": config,
        "seed": args.seed,
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
    pretrain_summary = None
    if args.pretrain_steps:
        setup["initial_state"], pretrain_summary = pretrain(args, setup)
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
        f"{args.model} ({config.parameter_count():,} params), {WORKERS} workers, "
        f"{args.steps} steps x batch {args.batch} x {config.context_tokens} tokens each\n"
        + (
            f"from a checkpoint of {args.pretrain_steps} AdamW steps x batch "
            f"{args.pretrain_batch}\n"
            if args.pretrain_steps
            else ""
        )
        + f"DiLoCo H={args.inner_steps}"
        + ("" if args.diloco_compression == "none" else f" ({args.diloco_compression})")
        + f", outer lr {args.outer_lr} mom {args.outer_momentum}"
        + ("" if args.outer_nesterov else " (no Nesterov)")
        + f"; {args.shards} shards"
    )
    png = plot(Path(args.png), curves, title) if args.png else None

    def loss(name: str) -> float | None:
        return round(losses[name], 4) if name in losses else None

    both = "diloco" in losses and "ddp" in losses
    initial = next(iter(curves.values()))[0][1]
    return {
        "bench": "diloco",
        "model": args.model,
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
        "pretrain_steps": args.pretrain_steps,
        "pretrain": pretrain_summary,
        "tokens_total": WORKERS * args.steps * args.batch * config.context_tokens,
        "diloco_eval_loss": loss("diloco"),
        "ddp_eval_loss": loss("ddp"),
        "single_eval_loss": loss("single"),
        "initial_eval_loss": round(initial, 4),
        "loss_ratio_vs_ddp": round(losses["diloco"] / losses["ddp"], 4) if both else None,
        # How much of DDP's loss drop (from the common start) DiLoCo achieved: the ratio
        # above shrinks as the start gets closer to the end, this one does not.
        "diloco_drop_over_ddp_drop": (
            round((initial - losses["diloco"]) / (initial - losses["ddp"]), 4) if both else None
        ),
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
    parser.add_argument("--model", default="tiny", choices=list(MODEL_SIZES))
    parser.add_argument("--seed", type=int, default=0, help="model init seed (every run)")
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
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=4000,
        help="warm start: AdamW steps of one process on the whole train text before the runs "
        "(0: all three from random init)",
    )
    parser.add_argument("--pretrain-lr", type=float, help="warm start lr (default --lr)")
    parser.add_argument("--pretrain-warmup", type=int, default=100, help="warm start warmup")
    parser.add_argument("--pretrain-batch", type=int, help="warm start batch (default --batch)")
    parser.add_argument(
        "--pretrain-cache",
        default=".cache/bench_diloco",
        help="folder of warm-start checkpoints (safetensors), reused when the key matches",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: shared cores)")
    parser.add_argument("--corpus-bytes", type=int, default=8 * 2**20)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--png", default="tests/bench/diloco_curves.png", help="'' = none")
    args = parser.parse_args()
    for name in ("diloco_lr", "ddp_lr", "single_lr"):
        if getattr(args, name) is None:
            setattr(args, name, args.lr)
    if args.pretrain_lr is None:
        args.pretrain_lr = args.lr
    if args.pretrain_batch is None:
        args.pretrain_batch = args.batch
    if args.pretrain_steps < 0:
        parser.error("--pretrain-steps must be 0 or more")
    if args.diloco_warmup is None:
        args.diloco_warmup = args.warmup
    if not args.runs or args.runs - {"diloco", "ddp", "single"}:
        parser.error("--runs takes a comma list of diloco, ddp, single")
    if args.steps % args.inner_steps:
        parser.error("--steps must be a multiple of --inner-steps")
    print(json.dumps(trio.run(main_async, args)))


if __name__ == "__main__":
    main()
