"""Real PyAV encode/decode, real webdataset shards, and the loader's guarantees."""

import json
import subprocess
from collections import Counter

import numpy as np
import pytest
import webdataset as wds

from vidiff.config import DataConfig
from vidiff.data.pipeline import ShardLoader
from vidiff.data.shards import ShardError, folder_samples, synthetic_samples, write_index, write_shards
from vidiff.data.synthetic import make_clips
from vidiff.data.video import ClipError, decode_clip, encode_mp4, probe


def _shards(tmp_path, n=12, max_count=4, frames=5):
    return write_shards(synthetic_samples(n, 32, 32, frames, fps=8, seed=0), tmp_path / "shards",
                        max_count=max_count).parent


def test_mp4_round_trip_keeps_frame_count_and_content(tmp_path):
    (_, video), = make_clips(1, 32, 48, 9, seed=3)
    data = encode_mp4(video, fps=8, path=tmp_path / "clip.mp4")
    info = probe(tmp_path / "clip.mp4")
    assert (info.frames, info.width, info.height) == (9, 48, 32)
    decoded = decode_clip(data, 9, 32, 48)
    assert decoded.shape == (9, 32, 48, 3)
    assert np.abs(decoded.astype(float) - video).mean() < 6          # lossy, but the same picture
    assert decode_clip(data, 3, 16, 24, stride=4).shape == (3, 16, 24, 3)


def test_bad_clips_raise_clip_errors_with_a_reason():
    (_, video), = make_clips(1, 32, 32, 5, seed=0)
    data = encode_mp4(video, fps=8)
    with pytest.raises(ClipError) as short:
        decode_clip(data, 9, 32, 32)
    assert short.value.reason == "too_short"
    with pytest.raises(ClipError) as broken:
        decode_clip(data[: len(data) // 3], 5, 32, 32)
    assert broken.value.reason in ("undecodable", "too_short")
    with pytest.raises(ClipError):
        decode_clip(b"not a video at all", 1, 32, 32)


def test_shards_are_plain_tars_readable_by_webdataset(tmp_path):
    folder = _shards(tmp_path)
    tars = sorted(folder.glob("*.tar"))
    assert len(tars) == 3
    listing = subprocess.run(["tar", "tf", str(tars[0])], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:3] == ["00000000.json", "00000000.mp4", "00000000.txt"]
    index = json.loads((folder / "index.json").read_text())
    assert [len(s["samples"]) for s in index["shards"]] == [4, 4, 4]
    keys = [s["__key__"] for s in wds.WebDataset([str(t) for t in tars], shardshuffle=False)]
    assert keys == [f"{i:08d}" for i in range(12)]
    sample = next(iter(wds.WebDataset(str(tars[0]), shardshuffle=False)))
    meta = json.loads(sample["json"])
    assert meta["frames"] == 5 and sample["txt"].decode().startswith("a ")
    assert decode_clip(sample["mp4"], 5, 32, 32).shape == (5, 32, 32, 3)


def test_folder_with_caption_sidecars(tmp_path):
    src = tmp_path / "videos"
    src.mkdir()
    for i, (clip, video) in enumerate(make_clips(3, 32, 32, 5, seed=1)):
        encode_mp4(video, 8, src / f"clip{i}.mp4")
        (src / f"clip{i}.txt").write_text(clip.caption)
    (src / "broken.mp4").write_bytes(b"\x00" * 100)                  # skipped, not fatal
    index = write_shards(folder_samples(src), tmp_path / "out")
    samples = json.loads(index.read_text())["shards"][0]["samples"]
    assert len(samples) == 3 and all(set(s["members"]) == {"mp4", "txt", "json"} for s in samples)


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(ShardError, match="dot"):
        write_shards([{"__key__": "a.b", "txt": "x"}], tmp_path / "s")


def _cfg(folder, **kw):
    return DataConfig(shards=str(folder), frames=5, height=32, width=32, batch_size=2, **kw)


def test_each_epoch_deals_every_sample_once_and_ranks_run_equal_steps(tmp_path):
    folder = _shards(tmp_path, n=13)                                  # 13 = 2 x 6 + 1 dropped
    loaders = [ShardLoader(_cfg(folder), rank, 2, seed=5) for rank in range(2)]
    assert loaders[0].per_rank == loaders[1].per_rank == 6
    seen = Counter(k for loader in loaders for _ in range(3) for k in next(loader)["key"])
    assert len(seen) == 12 and set(seen.values()) == {1}
    batch = next(loaders[0])
    assert batch["video"].shape == (2, 3, 5, 32, 32)
    assert -1.0 <= batch["video"].min() and batch["video"].max() <= 1.0


def test_resume_continues_with_the_same_batches(tmp_path):
    folder = _shards(tmp_path)
    straight = ShardLoader(_cfg(folder), 0, 1, seed=1)
    keys = [next(straight)["key"] for _ in range(9)]                 # crosses an epoch boundary
    first = ShardLoader(_cfg(folder), 0, 1, seed=1)
    for _ in range(4):
        next(first)
    resumed = ShardLoader(_cfg(folder), 0, 1, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [next(resumed)["key"] for _ in range(5)] == keys[4:]


def test_zero_byte_clip_is_skipped_and_counted(tmp_path):
    samples = list(synthetic_samples(4, 32, 32, 5, fps=8, seed=0))
    samples[1]["mp4"] = b""
    samples[2]["mp4"] = samples[2]["mp4"][:200]
    folder = write_shards(samples, tmp_path / "s").parent
    loader = ShardLoader(_cfg(folder), 0, 1, seed=0)
    keys = [k for _ in range(2) for k in next(loader)["key"]]
    assert sorted(set(keys)) == ["00000000", "00000003"]
    assert loader.skipped["empty_member"] >= 1
    assert sum(loader.skipped.values()) >= 2


def test_index_is_rebuilt_from_tars_alone(tmp_path):
    folder = _shards(tmp_path)
    (folder / "index.json").unlink()
    assert ShardLoader(_cfg(folder), 0, 1, seed=0).per_rank == 12
    assert write_index(folder).is_file()
