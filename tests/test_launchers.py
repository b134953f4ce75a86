"""The multi-node launchers, on one machine: two `launchers/multinode.sh` started as two nodes (one launcher per
node, no ssh, node ranks 0 and 1, one rank each) train like one node's two ranks; `launchers/slurm.sbatch`
builds its hostfile and srun command from faked SLURM variables; bad node settings fail before any rank starts."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, free_port, launch, multinode, two_node_root
from vidiff.train.monitor import read_scalars

STEPS = 4


def _overrides(root, name: str) -> list[str]:
    return [f"out_dir={root / name}", f"data.shards={root / 'latents'}", "data.buckets=[[9,32,32]]",
            "data.caption_dropout=0.0", f"vae.checkpoint={root / 'vae'}", "model.hidden_size=32", "model.depth=2",
            "model.num_heads=2", "model.zero_init=false", "text.max_tokens=8", f"train.steps={STEPS}",
            "train.log_every=1", "train.checkpoint_every=1000", "parallel.micro_batch=2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return two_node_root(tmp_path_factory, "launchers", samples=24, per_shard=8)


def _multinode(root, name: str, node_rank: int, port: int) -> subprocess.Popen:
    return multinode(root, "configs/demo.yaml", _overrides(root, name), node_rank, port)


@pytest.mark.slow
def test_two_nodes_started_one_launcher_each_train_like_one_node(root):
    launch(REPO / "configs/demo.yaml", _overrides(root, "one-node"), 2, root)
    port = free_port()
    nodes = [_multinode(root, "two-nodes", r, port) for r in (0, 1)]
    outs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(out[-3000:] for out in outs)
    assert "world 2 = data 2" in outs[0]
    ours, theirs = (read_scalars(root / name, "train/loss") for name in ("two-nodes", "one-node"))
    assert sorted(ours) == list(range(1, STEPS + 1))
    # The same ranks, the same collectives: the same losses (measured: identical).
    np.testing.assert_allclose([ours[s] for s in sorted(ours)], [theirs[s] for s in sorted(ours)], rtol=1e-6)


def test_a_node_rank_outside_the_hostfile_fails_before_any_rank_starts(root):
    node = _multinode(root, "bad-rank", 2, free_port())
    out = node.communicate(timeout=300)[0]
    assert node.returncode == 2 and "NODE_RANK=2" in out and "valid: 0 to 1" in out
    assert "spawned" not in out


def test_slurm_sbatch_builds_the_hostfile_and_srun_command(root, tmp_path):
    script = REPO / "launchers/slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"                      # what `scontrol show hostnames gpu[01-03]` prints
    scontrol.write_text('#!/bin/sh\n'
                        '[ "$1 $2 $3" = "show hostnames gpu[01-03]" ] && printf "gpu01\\ngpu02\\ngpu03\\n"\n')
    scontrol.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VIDIFF_PYTHON": sys.executable,
           "PYTHONPATH": str(REPO), "VIDIFF_REPO": str(tmp_path / "repo"), "SLURM_JOB_NODELIST": "gpu[01-03]",
           "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "2", "VIDIFF_SLURM_DRY_RUN": "1"}
    shutil.copytree(REPO / "launchers", tmp_path / "repo/launchers")    # the hostfile goes under repo/runs/slurm
    result = subprocess.run(["bash", str(script), str(REPO / "configs/demo.yaml"), *_overrides(root, "slurm")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world 6 = data 6" in result.stdout                         # checked for the whole world size
    hostfile = tmp_path / "repo/runs/slurm/4242.hostfile"
    assert hostfile.read_text() == "gpu01 slots=2\ngpu02 slots=2\ngpu03 slots=2\n"
    command = result.stdout.strip().splitlines()[-1]
    for part in ("srun --nodes=3 --ntasks-per-node=1", f"HOSTFILE={hostfile}", "MASTER_ADDR=gpu01",
                 'NODE_RANK="$SLURM_NODEID"', "launchers/multinode.sh", "model.depth=2"):
        assert part in command.replace("\\", ""), command
    # A world the layout cannot use is refused before srun: tensor 4 does not divide 6 ranks.
    bad = subprocess.run(["bash", str(script), str(REPO / "configs/demo.yaml"), *_overrides(root, "slurm"),
                          "parallel.tensor=4"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "world size 6" in bad.stderr and "srun" not in bad.stdout
