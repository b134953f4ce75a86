"""Audit a run's sample ledger (train.ledger: true): samples lost and duplicated, per stream and epoch.

    python tools/ledger_check.py runs/my-run

Reads runs/<name>/ledger/rank*.jsonl and the checkpoint history. Each start of the run (a segment) resumed from
some step; of a segment's steps, only those up to the step the next segment resumed from were committed (the
rest were lost with the crash and replayed), and of the last segment those up to its latest checkpoint. Over the
committed steps, every usable sample of the data set (the run's config and shards) must come exactly once per
epoch: a sample seen twice in an epoch is duplicated, one never seen in an epoch that ended is lost. Samples
skipped while decoding count as consumed. Prints one JSON line; exit status 1 if anything was lost or duplicated.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from vidiff.config import load_config
from vidiff.data.pipeline import STREAMS, ShardLoader, sample_name
from vidiff.train.checkpoint import CONFIG_NAME
from vidiff.train.ledger import LEDGER_DIR


def read_lines(run: Path) -> list[dict]:
    """Every well-formed line of every rank's ledger (a line torn by a crash is dropped)."""
    lines = []
    for path in sorted((run / LEDGER_DIR).glob("rank*.jsonl")):
        for text in path.read_text().splitlines():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                continue
    return lines


def committed_steps(lines: list[dict], latest_step: int) -> list[dict]:
    """The step lines of committed steps: of each segment, the steps up to where the next one resumed."""
    headers = {}
    for line in lines:
        if "resumed_from" in line:
            headers.setdefault(line["segment"], line)
    order = sorted(headers.values(), key=lambda h: h["started"])
    limit = {h["segment"]: nxt["resumed_from"] for h, nxt in zip(order, order[1:])}
    if order:
        limit[order[-1]["segment"]] = latest_step
    return [line for line in lines if "step" in line and line["step"] <= limit.get(line["segment"], -1)]


def audit(run: Path) -> dict:
    cfg = load_config(run / CONFIG_NAME)
    loader = ShardLoader(cfg.data.model_copy(update={"num_workers": 0}), 0, 1, cfg.seed,
                         batch_size=cfg.parallel.micro_batch)
    usable = {s: {sample_name(loader.samples[i]) for _, ids in loader.planners[s].plan(0) for i in ids}
              for s in STREAMS}
    latest = run / "checkpoints" / "latest"
    latest_step = int(latest.read_text().strip().removeprefix("step")) if latest.is_file() else 0
    lines = read_lines(run)
    steps = committed_steps(lines, latest_step)
    seen: dict[tuple[str, int], Counter] = defaultdict(Counter)
    for line in steps:
        for batch in line["batches"]:
            seen[batch["stream"], batch["epoch"]].update(batch["ids"] + batch["skipped_ids"])
    epochs, problems = {}, 0
    for (stream, epoch), counts in sorted(seen.items()):
        complete = any(s == stream and e > epoch for s, e in seen)          # a later epoch began: this one ended
        duplicated = sorted(i for i, n in counts.items() if n > 1)
        lost = sorted(usable[stream] - set(counts)) if complete else []
        unknown = sorted(set(counts) - usable[stream])
        problems += len(duplicated) + len(lost) + len(unknown)
        epochs[f"{stream}/{epoch}"] = {"samples": len(counts), "of": len(usable[stream]), "complete": complete,
                                       "duplicated": duplicated[:20], "lost": lost[:20], "unknown": unknown[:20],
                                       "n_duplicated": len(duplicated), "n_lost": len(lost)}
    return {"run": str(run), "segments": len({line["segment"] for line in lines if "resumed_from" in line}),
            "committed_steps": len({line["step"] for line in steps}), "latest_checkpoint_step": latest_step,
            "epochs": epochs, "ok": problems == 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the run folder (out_dir)")
    args = parser.parse_args()
    run = Path(args.run)
    if not (run / LEDGER_DIR).is_dir():
        sys.exit(f"{run} has no ledger ({run / LEDGER_DIR}): train with train.ledger=true")
    report = audit(run)
    print(json.dumps(report))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
