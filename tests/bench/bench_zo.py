"""Benchmark: shared-seed ZO training across four real daemons, then a late joiner by replay.

Four ``shoal start --train zo`` processes on loopback (two with ATEN_CPU_CAPABILITY=default,
two with the machine's best) run ``--steps`` steps, agreeing a snapshot every
``--snapshot-every`` steps (100: a joiner after 300 steps comes after three); a fifth node then
joins. It holds theta_0 (the same checkpoint), so it replays the whole log from step 0, the
steps the members' logs dropped from their archives on disk, and fetches no tensor
(``path: replay``); with ``--replay-join-max-steps 0`` it syncs the latest snapshot through
the shared-state sync and replays the log since (``path: snapshot``). Reported beside
shoal's figures, measured in the same run: the same four trainers in lockstep in one process
with no network (``reference_steps_per_s``), the full state, and the 64-byte Ed25519 signature
a signed record would carry.

    .venv/bin/python tests/bench/bench_zo.py [--steps 300] [--model tiny] [--snapshot-every 100]
        [--replay-join-max-steps N]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.daemons import REPO, Daemon, swarm_of, wait_until


# The fine-tuning text: the package descriptions (README prose in the METADATA files) of the
# installed packages, copied to <name>.md files; pretraining saw only the standard library's
# Python code.
def docs_folder(tmp: Path) -> Path:
    folder = tmp / "docs"
    folder.mkdir(parents=True, exist_ok=True)
    for meta in sorted((REPO / ".venv").glob("lib/python3*/site-packages/*.dist-info/METADATA")):
        (folder / f"{meta.parent.name}.md").write_bytes(meta.read_bytes())
    return folder


def training(d: Daemon) -> dict[str, Any]:
    result: dict[str, Any] = d.status()["training"]
    return result


def reference_steps_per_s(model: str, context: int, batch: int, steps: int) -> float:
    """Four ZO trainers in lockstep in one process: the compute floor, no network."""
    import torch

    from node.zo_mode import zo_model_config
    from trainer.data import CorpusSettings, TokenBlocks, load_corpus
    from trainer.model import build_model, next_token_loss
    from trainer.zo import ZOSettings, ZOTrainer

    torch.set_num_threads(1)
    corpus = load_corpus(CorpusSettings(max_total_bytes=1 << 20))
    settings = ZOSettings(swarm="bench", lr=1e-3, eps=1e-3)
    trainers = []
    for i in range(4):
        blocks = TokenBlocks(corpus.train_tokens, batch_size=batch, context_tokens=context, seed=i)
        m = build_model(zo_model_config(model, context), seed=0)
        trainers.append(
            ZOTrainer(m, lambda mod, b: next_token_loss(mod, *b), blocks, f"p{i}", settings)
        )
    started = time.perf_counter()
    for step in range(steps):
        records = [r for t in trainers for r in t.produce_records(step, 1)]
        for t in trainers:
            t.apply_step(step, records)
    return steps / (time.perf_counter() - started)


def pretrain(home: Path, docs: Path, model: str, context: int, steps: int) -> tuple[Path, float]:
    """The fine-tuning task's starting point: ``model`` trained with AdamW (backprop) on the
    standard library's Python, saved as a checkpoint; returns (path, its loss on the docs)."""
    import torch

    from node.zo_mode import zo_model_config
    from trainer.checkpoint import save_checkpoint
    from trainer.data import CorpusSettings, TokenBlocks, evaluate_loss, load_corpus
    from trainer.model import build_model, next_token_loss

    torch.manual_seed(0)
    m = build_model(zo_model_config(model, context), seed=0)
    code = load_corpus(CorpusSettings(max_total_bytes=4 << 20))
    blocks = TokenBlocks(code.train_tokens, batch_size=16, context_tokens=context, seed=0)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = next_token_loss(m, *next(blocks))
        opt.zero_grad()
        loss.backward()
        opt.step()
    text = load_corpus(CorpusSettings(sources=(str(docs),)))
    batches = [
        TokenBlocks(text.train_tokens, batch_size=16, context_tokens=context, seed=9).batch_at(i)
        for i in range(4)
    ]
    path = save_checkpoint(home, dict(m.named_parameters()), revision=steps)
    return path, evaluate_loss(m, batches)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--snapshot-every", type=int, default=100, help="0: theta_0 only")
    parser.add_argument(
        "--replay-join-max-steps",
        type=int,
        default=None,
        help="the joiner's zo_replay_join_max_steps (0: sync the snapshot); default: the config's",
    )
    args = parser.parse_args()
    tmp_home = Path(tempfile.mkdtemp())
    docs = docs_folder(tmp_home)
    checkpoint, start_loss = pretrain(tmp_home, docs, args.model, args.context, args.pretrain_steps)
    zo = [
        "--zo-init-checkpoint",
        str(checkpoint),
        "--zo-corpus-sources",
        str(docs),
        "--zo-lr",
        str(args.lr),
        "--train",
        "zo",
        "--zo-model",
        args.model,
        "--zo-batch-size",
        str(args.batch),
        "--zo-context-tokens",
        str(args.context),
        "--zo-min-members",
        "4",
        "--zo-join-wait-s",
        "2",
        "--zo-hash-every-steps",
        "10",
        "--zo-snapshot-every-steps",
        str(args.snapshot_every),
    ]
    with tempfile.TemporaryDirectory() as tmp, swarm_of(Path(tmp)) as spawn:
        default = {"ATEN_CPU_CAPABILITY": "default"}
        a = spawn("a", *zo, env=default).wait_ready()
        others = [spawn("b", *zo, join=a, env=default), spawn("c", *zo, join=a)]
        others.append(spawn("d", *zo, join=a))
        members = [a, *[d.wait_ready() for d in others]]
        wait_until(lambda: all(training(d)["step"] >= 10 for d in members), 180, "step 10")
        t0, s0 = time.monotonic(), min(training(d)["step"] for d in members)
        wait_until(
            lambda: all(training(d)["step"] >= args.steps for d in members),
            1800,
            f"{args.steps} steps",
            poll_s=0.5,
        )
        steps_per_s = (min(training(d)["step"] for d in members) - s0) / (time.monotonic() - t0)
        stats = [training(d) for d in members]
        tables = [dict((s, h) for s, h in t["hash_checks"]) for t in stats]
        common = sorted(set.intersection(*(set(t) for t in tables)))
        agreed = sum(1 for s in common if len({t[s] for t in tables}) == 1)
        losses = [loss for t in stats for _, loss in t["losses"]]
        by_node = [[loss for _, loss in t["losses"]] for t in stats]
        drop = statistics.mean(
            statistics.mean(ls[:30]) - statistics.mean(ls[-30:]) for ls in by_node
        )
        steps = min(t["step"] for t in stats)
        swarm_zo_bytes = sum(sum(t["bytes_sent"].values()) for t in stats)
        record_message = stats[0]["bytes_per_record_message"]
        step_field = len(msgpack.packb(steps))
        joiner_flags = []
        if args.replay_join_max_steps is not None:
            joiner_flags = ["--zo-replay-join-max-steps", str(args.replay_join_max_steps)]
        joiner = spawn("late", *zo, *joiner_flags, join=a).wait_ready()
        wait_until(lambda: (training(joiner).get("join") or {}).get("done"), 600, "the join")
        join = training(joiner)["join"]
        after = training(joiner)["step"]
        wait_until(
            lambda: all(training(d)["step"] >= after + 20 for d in [*members, joiner]),
            300,
            "steps after the join",
        )
        j_table = dict((s, h) for s, h in training(joiner)["hash_checks"])
        a_table = dict((s, h) for s, h in training(a)["hash_checks"])
        joiner_matches = sorted(s for s in j_table if s in a_table and j_table[s] == a_table[s])
        joiner_mismatch = sum(1 for s in j_table if s in a_table and j_table[s] != a_table[s])
        capabilities = [t["cpu_capability"] for t in stats]
        final = [training(d) for d in [*members, joiner]]
        served = sum((t.get("archive") or {}).get("steps_served", 0) for t in final)
        snapshots_at_join = min(t["snapshots_agreed"] for t in stats)
        log_steps_kept = max(t["log_steps"] for t in final)
        run_steps = min(t["step"] for t in final)
    reference = reference_steps_per_s(args.model, args.context, args.batch, 30)
    replay = join["snapshot_bytes"] + join["log_bytes"]
    result = {
        "bench": "zo",
        "model": args.model,
        "members": 4,
        "cpu_capabilities": capabilities,
        "steps": steps,
        "bytes_per_peer_step": record_message,
        "payload_bytes_per_peer_step": step_field + 1,
        "signed_record_payload_bytes_reference": step_field + 1 + 64,
        "swarm_zo_bytes_per_step": round(swarm_zo_bytes / steps, 1),
        "parity_checks_passed": agreed,
        "parity_checks_total": len(common),
        "steps_per_s": round(steps_per_s, 2),
        "reference_steps_per_s": round(reference, 2),
        "pretrained_loss_on_docs": round(start_loss, 4),
        "zo_loss_first": round(statistics.mean(losses[:120]), 4),
        "zo_loss_drop": round(drop, 4),
        "snapshot_every_steps": args.snapshot_every,
        "snapshots_agreed_before_the_join": snapshots_at_join,
        "replay_join_path": join.get("path"),
        "replay_join_reason": join.get("reason"),
        "replay_join_bytes": replay,
        "replay_join_snapshot_step": join.get("snapshot_step", 0),
        "replay_join_snapshot_bytes": join["snapshot_bytes"],
        "replay_join_log_bytes": join["log_bytes"],
        "replay_join_steps": join["steps_replayed"],
        "replay_join_records": join.get("records_replayed"),
        "replay_join_seconds": join.get("seconds"),
        "replay_steps_per_s": join.get("replay_steps_per_s"),
        "replay_records_per_s": join.get("replay_records_per_s"),
        "archive_steps_served": served,
        "joiner_hash_checks_matched": len(joiner_matches),
        "joiner_hash_checks_mismatched": joiner_mismatch,
        "full_state_bytes": join["full_state_bytes"],
        "full_over_replay": round(join["full_state_bytes"] / max(1, replay), 2),
        "full_over_log": round(join["full_state_bytes"] / max(1, join["log_bytes"]), 1),
        "log_steps_kept_max": log_steps_kept,
        "run_steps_at_end": run_steps,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
