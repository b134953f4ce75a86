"""Preflight (`vidiff doctor`, and `vidiff train` at start): each fault fails fast on every rank, before any
step, with the rank, its host and the cause named. Faults made for real: a checkpoint folder that is a file,
shards missing on one node, a node given the wrong master port, and a node whose torch reports another version
(a sitecustomize on that node only)."""

import socket
import subprocess
import time

import pytest

from conftest import REPO, free_port, launcher, multinode, two_node_root

pytestmark = pytest.mark.slow
HOST = socket.gethostname()


def _overrides(root, name: str, *extra: str) -> list[str]:
    return [f"out_dir={root / name}", f"data.shards={root / 'latents'}", "data.buckets=[[9,32,32]]",
            f"vae.checkpoint={root / 'vae'}", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
            "text.max_tokens=8", "train.steps=2", "parallel.micro_batch=2", *extra]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return two_node_root(tmp_path_factory, "preflight", samples=8, per_shard=4)


def _doctor(root, name: str, *extra: str) -> subprocess.CompletedProcess:
    command, env = launcher(REPO / "configs/demo.yaml", _overrides(root, name, *extra), 2)
    return subprocess.run(command, cwd=root, env={**env, "VIDIFF_COMMAND": "doctor"}, capture_output=True,
                          text=True, timeout=300)


def _two_nodes(root, name: str, node1_env: dict, node1_extra: tuple = (), both: tuple = ()
               ) -> tuple[list[int], str, float]:
    """Two multinode.sh launchers as nodes 0 and 1 running `vidiff train`; node 1 gets node1_env and overrides.
    Returns the exit codes, the output of both and the seconds until both ended."""
    port, start = free_port(), time.monotonic()
    nodes = [multinode(root, "configs/demo.yaml", _overrides(root, name, *both, *extra), rank, port, **env)
             for rank, env, extra in ((0, {}, ()), (1, node1_env, node1_extra))]
    outs = [node.communicate(timeout=300)[0] for node in nodes]
    return [node.returncode for node in nodes], "\n".join(outs), time.monotonic() - start


def test_doctor_reports_every_rank(root):
    result = _doctor(root, "healthy")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"rank 0: {HOST}" in result.stdout and f"rank 1: {HOST}" in result.stdout
    assert "preflight ok: 2 ranks on 1 host(s)" in result.stdout


def test_an_unwritable_run_folder_is_named_by_every_rank(root):
    (root / "unwritable").mkdir()
    (root / "unwritable" / "checkpoints").write_text("a file where the checkpoint folder goes")
    result = _doctor(root, "unwritable")
    assert result.returncode == 2, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} on {HOST}: cannot write checkpoints to" in result.stderr, result.stderr[-3000:]


def test_shards_missing_on_one_node_are_named_before_any_step(root):
    codes, out, _ = _two_nodes(root, "missing-shards", {}, (f"data.shards={root / 'not-mounted'}",))
    assert codes[0] != 0 and codes[1] != 0
    assert f"rank 1 on {HOST}: data.shards {root / 'not-mounted'}: no *.tar shards there" in out, out[-4000:]
    assert f"rank 0 on {HOST}: data" not in out
    assert "train/loss" not in out and not (root / "missing-shards" / "tb").exists()


def test_a_rank_that_cannot_join_fails_within_the_timeout(root):
    """Node 1 is given another master port: nobody hangs; both nodes fail within the 15 s timeout (plus start-up)
    saying the ranks did not all join, and where."""
    codes, out, seconds = _two_nodes(root, "cannot-join", {"MASTER_PORT": str(free_port())},
                                     both=("train.preflight_timeout=15",))
    assert codes[0] != 0 and codes[1] != 0
    assert "did not all join" in out and "train.preflight_timeout 15 s" in out, out[-4000:]
    assert "rank 0 on" in out and "rank 1 on" in out
    assert seconds < 120, seconds


def test_mismatched_versions_across_ranks_are_an_error(root, tmp_path):
    fake = tmp_path / "fake-torch"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text("import torch\ntorch.__version__ = torch.__version__ + '.fake'\n")
    codes, out, _ = _two_nodes(root, "versions", {"PYTHONPATH": f"{fake}:{REPO}"})
    assert codes[0] != 0 and codes[1] != 0
    assert "torch versions differ across ranks" in out and f"on ranks 1 ({HOST})" in out, out[-4000:]
    assert "Install the same torch on every node" in out


def test_too_little_disk_for_a_checkpoint_is_an_error(root):
    """A model whose checkpoint (about 20 bytes a parameter, counted on the meta device) cannot fit the disk."""
    result = _doctor(root, "huge", "model.hidden_size=16384", "model.depth=512")
    assert result.returncode == 2
    assert f"rank 0 on {HOST}:" in result.stderr and "GB free under" in result.stderr, result.stderr[-3000:]
    assert "a checkpoint of this run needs about" in result.stderr and "lower train.keep_last" in result.stderr
