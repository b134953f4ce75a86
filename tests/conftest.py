import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# tests/browser/ needs Chromium and selenium: `make test-browser` installs them and sets VIDIFF_BROWSER_TESTS.
collect_ignore_glob = [] if os.environ.get("VIDIFF_BROWSER_TESTS") else ["browser/*"]
sys.path.insert(0, str(Path(__file__).parent))      # test helpers (gmm.py)
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def run_vidiff(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m vidiff ARGS` in a subprocess, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "vidiff", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


def vidiff_processes(**environment: str) -> dict[int, dict[str, str]]:
    """{pid: environment} of the running vidiff processes whose environment holds every given KEY=value (/proc)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
            if all(env.get(key) == value for key, value in environment.items()) and \
                    "vidiff" in (proc / "cmdline").read_text():
                found[int(proc.name)] = env
        except OSError:                             # gone, or not ours to read
            continue
    return found


# launchers/local.sh picks MASTER_PORT in [29500, 30500): test runs stay out of that range, so a test never takes a
# port that a user's run (or the launcher-picked port of another test) might be using.
LAUNCHER_PORTS = range(29500, 30500)


def free_port() -> int:
    """A free TCP port from the kernel's ephemeral range (32768 and up on Linux), outside LAUNCHER_PORTS."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in LAUNCHER_PORTS:
            return port


def shm_workspaces(port: int) -> set[str]:
    """DeepSpeed's CPU shared-memory workspaces of the run on `port` (named ..._<addr>_<port>_<rank>): a test
    checks its own run's only, not other workspaces on the machine."""
    return {p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")}


def launcher(config: str | Path, overrides: list[str], ranks: int = 2, script: str = "local.sh"
             ) -> tuple[list[str], dict]:
    """The command and environment of `launchers/<script> CONFIG OVERRIDES` on `ranks` ranks, with a master port
    of its own."""
    env = {**os.environ, "VIDIFF_PYTHON": sys.executable, "NPROC": str(ranks), "PYTHONPATH": str(REPO),
           "MASTER_PORT": str(free_port())}
    return [str(REPO / "launchers" / script), str(REPO / config), *overrides], env


def launch(config: str | Path, overrides: list[str], ranks: int = 2, cwd: Path | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """Run `launchers/local.sh CONFIG OVERRIDES` on `ranks` ranks to the end; with check, it must succeed."""
    command, env = launcher(config, overrides, ranks)
    result = subprocess.run(command, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def latent_root(tmp_path_factory, name: str, samples: int, per_shard: int) -> Path:
    """A folder with a VAE run (vae/) and latent shards of `samples` clips (latents/), for short DiT runs."""
    from datasets import latent_samples, vae_run_folder
    from vidiff.data.shards import write_shards

    root = tmp_path_factory.mktemp(name)
    vae_run_folder(root / "vae")
    write_shards(latent_samples(samples), root / "latents", max_count=per_shard)
    return root


def two_node_root(tmp_path_factory, name: str, samples: int, per_shard: int) -> Path:
    """latent_root and a hostfile of two nodes of one rank each (multinode.sh tests)."""
    root = latent_root(tmp_path_factory, name, samples, per_shard)
    (root / "hostfile").write_text("# two nodes of one rank each\nnode-a slots=1\nnode-b slots=1\n")
    return root


def multinode(root: Path, config: str | Path, overrides: list[str], node_rank: int, port: int,
              **env: str) -> subprocess.Popen:
    """`launchers/multinode.sh CONFIG OVERRIDES` as node `node_rank` of root/hostfile, master 127.0.0.1:port, one
    launcher per node (NODE_RANK); env adds to or replaces this node's environment."""
    env = {**os.environ, "VIDIFF_PYTHON": sys.executable, "PYTHONPATH": str(REPO), "HOSTFILE": str(root / "hostfile"),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node_rank), **env}
    return subprocess.Popen([str(REPO / "launchers/multinode.sh"), str(REPO / config), *overrides], cwd=root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_after_checkpoint(command: list[str], env: dict, cwd: Path, run: Path, tag: str) -> None:
    """Start a run and SIGKILL every process of it as soon as `checkpoints/latest` names `tag` (a crash right
    after a checkpoint; the run's next checkpoint must be steps away)."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    latest, deadline = run / "checkpoints/latest", time.monotonic() + 600
    while not (latest.is_file() and latest.read_text() == tag):
        assert process.poll() is None, f"the run ended before checkpoint {tag}: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no checkpoint {tag} after 10 minutes"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert latest.read_text() == tag, "the run reached its next checkpoint before it was killed"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
