"""Print the first and last value of every scalar a run logged to TensorBoard, as one JSON line.

    python tools/tb_summary.py runs/demo/dit
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vidiff.train.monitor import read_scalars, scalar_tags


def summary(run_dir: Path) -> dict[str, dict[str, float]]:
    out = {}
    for tag in scalar_tags(run_dir):
        points = sorted(read_scalars(run_dir, tag).items())
        out[tag] = {"steps": len(points), "first": round(points[0][1], 6), "last": round(points[-1][1], 6)}
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/tb_summary.py RUN_DIR")
    print(json.dumps(summary(Path(sys.argv[1]))))
