"""A bad config exits 2 with one message naming the key, the file and what is valid, before any process starts."""

import subprocess

import pytest

from conftest import REPO, run_vidiff
from vidiff.cli import build_parser, parse_args
from vidiff.config import ConfigError, load_config, parse_override


def test_unknown_key_exits_2_naming_the_key():
    result = run_vidiff("train", "configs/demo.yaml", "model.no_such_key=1")
    assert result.returncode == 2
    assert "no_such_key" in result.stderr and "configs/demo.yaml" in result.stderr
    assert "hidden_size" in result.stderr                          # names what is valid there


def test_launcher_refuses_bad_config_before_starting_ranks():
    result = subprocess.run([str(REPO / "launchers/local.sh"), "configs/demo.yaml", "train.stepz=3"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "train.stepz" in result.stderr
    assert "deepspeed" not in (result.stdout + result.stderr).lower()   # no launcher ever ran


@pytest.mark.parametrize("override, needle", [
    ("model.depth=abc", "model.depth"),                            # wrong type
    ("data.buckets=[[8,32,32]]", "1 + 4k"),                        # impossible for the causal VAE
    ("data.buckets=[[9,60,64]]", "multiples of 8"),
    ("data.buckets=[[1,32,32]]", "only images"),
    ("data.image_fraction=0.3", "1-frame (image) bucket"),
    ("model.num_heads=5", "not divisible by num_heads"),
    ("task=unet", "task"),
    ("train.steps.x=1", "train.steps is a value"),
    ("parallel.zero_stage=4", "parallel.zero_stage"),
])
def test_each_mistake_is_named(override, needle):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(REPO / "configs/demo.yaml", [override])
    assert needle in str(info.value)
    assert "configs/demo.yaml" in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_typed_yaml():
    assert parse_override("model.depth=4") == (["model", "depth"], 4)
    assert parse_override("sample.prompts=[a, b]") == (["sample", "prompts"], ["a", "b"])
    cfg = load_config(REPO / "configs/demo.yaml", ["model.depth=2", "train.lr=3e-4", "model.patch_size=[1,1,1]"])
    assert cfg.model.depth == 2 and cfg.train.lr == 3e-4 and cfg.model.patch_size == (1, 1, 1)


@pytest.mark.parametrize("argv", [
    ["check", "configs/demo.yaml", "train.steps=5", "--no-resume", "model.depth=2"],
    ["check", "--world-size", "2", "configs/demo.yaml", "--no-resume", "train.steps=5", "model.depth=2"],
    ["cache-latents", "configs/demo/dit.yaml", "--text", "train.steps=5", "--out", "x", "model.depth=2"],
])
def test_overrides_may_follow_the_flags(argv):
    """`CONFIG --no-resume k=v` means what `CONFIG k=v --no-resume` means (argparse alone refused it, exit 2)."""
    args = parse_args(build_parser(), argv)
    assert sorted(args.overrides) == ["model.depth=2", "train.steps=5"]


def test_a_stray_argument_is_still_refused():
    result = run_vidiff("check", "configs/demo.yaml", "--no-resume", "stray", "train.steps=5")
    assert result.returncode == 2 and "unrecognized arguments: stray" in result.stderr
    assert "train.steps" not in result.stderr                       # the override was taken, not refused


def test_dit_run_needs_a_vae(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: dit\n")
    with pytest.raises(ConfigError, match="vae.checkpoint"):
        load_config(path)


@pytest.mark.parametrize("name", ["configs/demo.yaml", "configs/vae/demo.yaml", "configs/demo/vae.yaml",
                                  "configs/demo/dit.yaml", "configs/bench/shapes_vae.yaml",
                                  "configs/bench/shapes_cpu.yaml", "configs/vae/cpu_small.yaml"])
def test_shipped_configs_are_valid(name):
    load_config(REPO / name)


def test_bad_shard_input_is_one_clear_message(tmp_path):
    (tmp_path / "list.csv").write_text("file,caption\nx.mp4,hello\n")
    result = run_vidiff("shards", "--manifest", str(tmp_path / "list.csv"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "has no 'path'" in result.stderr and "Traceback" not in result.stderr
