"""Real PyAV encode/decode, real webdataset shards, and the loader's guarantees: buckets, exact resume at any
world size and worker count, every rank in step, bad input skipped and counted."""

import json
import pickle
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from conftest import REPO
from datasets import mixed_samples, png, write_mixed, write_tar
from vidiff.config import DataConfig, VAEConfig, load_config
from vidiff.data.latents import cache_latents, npy_bytes
from vidiff.data.buckets import Bucket, assign_bucket, make_buckets
from vidiff.data.pipeline import ShardLoader, image_steps, stream_of, to_model_input
from vidiff.data.shards import (PICKLE_EXTS, ShardError, folder_samples, manifest_samples, synthetic_samples,
                                webdataset_samples, write_index, write_shards)
from vidiff.data.synthetic import make_clips
from vidiff.data.video import ClipError, decode_clip, decode_image, encode_mp4, probe
from vidiff.models.vae import VideoVAE

# ---------------------------------------------------------------------------------------------- PyAV

def test_mp4_round_trip_keeps_frame_count_and_content(tmp_path):
    (_, video), = make_clips(1, 32, 48, 9, seed=3)
    data = encode_mp4(video, fps=8, path=tmp_path / "clip.mp4")
    info = probe(tmp_path / "clip.mp4")
    assert (info.frames, info.width, info.height) == (9, 48, 32)
    decoded = decode_clip(data, 9, 32, 48)
    assert decoded.shape == (9, 32, 48, 3)
    assert np.abs(decoded.astype(float) - video).mean() < 6          # lossy, but the same picture


def test_seek_lands_on_the_requested_frame_and_stride():
    frames = np.stack([np.full((32, 32, 3), 10 * i, np.uint8) for i in range(24)])   # frame i has value 10 i
    data = encode_mp4(frames, fps=8)
    clip = decode_clip(data, 4, 32, 32, stride=3, start=7)
    assert [round(float(f.mean()) / 10) for f in clip] == [7, 10, 13, 16]


def test_resize_covers_then_center_crops():
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, 16:48] = 200                                              # bright centre half
    clip = decode_clip(encode_mp4(np.stack([wide] * 5), 8), 5, 16, 16)
    assert clip.shape == (5, 16, 16, 3) and clip.mean() > 150        # the crop kept the centre only
    assert decode_image(png(20, 40, 0), 16, 16).shape == (1, 16, 16, 3)


def test_bad_clips_raise_clip_errors_with_a_reason():
    (_, video), = make_clips(1, 32, 32, 5, seed=0)
    data = encode_mp4(video, fps=8)
    with pytest.raises(ClipError) as short:
        decode_clip(data, 9, 32, 32)
    assert short.value.reason == "too_short"
    with pytest.raises(ClipError):
        decode_clip(b"not a video at all", 1, 32, 32)
    with pytest.raises(ClipError) as image:
        decode_image(b"\x89PNG broken", 8, 8)
    assert image.value.reason == "undecodable_image"

# -------------------------------------------------------------------------------------------- shards

def test_shards_are_plain_tars_readable_by_tar_and_webdataset(tmp_path):
    folder = write_shards(synthetic_samples(12, 32, 32, 5, fps=8, seed=0), tmp_path / "s", max_count=4).parent
    tars = sorted(folder.glob("*.tar"))
    assert len(tars) == 3
    listing = subprocess.run(["tar", "tf", str(tars[0])], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:3] == ["00000000.json", "00000000.mp4", "00000000.txt"]
    index = json.loads((folder / "index.json").read_text())
    assert [len(s["samples"]) for s in index["shards"]] == [4, 4, 4]
    assert index["shards"][0]["samples"][0]["meta"] == {"frames": 5, "fps": 8, "width": 32, "height": 32}
    keys = [s["__key__"] for s in wds.WebDataset([str(t) for t in tars], shardshuffle=False)]
    assert keys == [f"{i:08d}" for i in range(12)]
    sample = next(iter(wds.WebDataset(str(tars[0]), shardshuffle=False)))
    assert json.loads(sample["json"])["duration"] == pytest.approx(5 / 8)
    assert decode_clip(sample["mp4"], 5, 32, 32).shape == (5, 32, 32, 3)


def test_shard_size_limit_splits_shards(tmp_path):
    index = write_shards(synthetic_samples(10, 32, 32, 5, fps=8, seed=0), tmp_path / "s", max_bytes=6_000)
    counts = [len(s["samples"]) for s in json.loads(index.read_text())["shards"]]
    assert len(counts) > 1 and sum(counts) == 10


def test_folder_and_manifest_inputs(tmp_path):
    src = tmp_path / "media"
    src.mkdir()
    for i, (clip, video) in enumerate(make_clips(3, 32, 32, 5, seed=1)):
        encode_mp4(video, 8, src / f"clip{i}.mp4")
        (src / f"clip{i}.txt").write_text(clip.caption)
    (src / "photo.png").write_bytes(png(24, 40, 0))
    (src / "photo.txt").write_text("static noise")
    (src / "broken.mp4").write_bytes(b"\x00" * 100)                  # probed, skipped, not fatal
    index = write_shards(folder_samples(src, workers=2), tmp_path / "out")
    samples = json.loads(index.read_text())["shards"][0]["samples"]
    assert len(samples) == 4
    assert {s["meta"]["frames"] for s in samples} == {5, 1}
    assert all({"txt", "json"} <= set(s["members"]) for s in samples)

    (tmp_path / "list.csv").write_text("path,caption\nmedia/clip0.mp4,first\nmedia/photo.png,second\n")
    (tmp_path / "list.jsonl").write_text('{"path": "media/clip1.mp4", "caption": "third"}\n')
    for manifest, captions in (("list.csv", ["first", "second"]), ("list.jsonl", ["third"])):
        out = write_shards(manifest_samples(tmp_path / manifest), tmp_path / manifest.replace(".", "_"))
        tar = sorted(out.parent.glob("*.tar"))[0]
        got = [s["txt"].decode() for s in wds.WebDataset(str(tar), shardshuffle=False)]
        assert got == captions


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(ShardError, match="dot"):
        write_shards([{"__key__": "a.b", "txt": "x"}], tmp_path / "s")


def _v2d_shard(path, n=4):
    """video2dataset layout: KEY.mp4, KEY.txt, KEY.json whose json has no frame count or fps."""
    members = {}
    for i, (clip, video) in enumerate(make_clips(n, 32, 32, 9, seed=4)):
        key = f"{i:09d}"
        members[f"{key}.mp4"] = encode_mp4(video, 8)
        members[f"{key}.txt"] = clip.caption.encode()
        members[f"{key}.json"] = json.dumps({"url": f"http://example/{i}", "key": key, "status": "success"}).encode()
    write_tar(path, members)


def test_video2dataset_shards_are_read_without_conversion(tmp_path):
    (tmp_path / "v2d").mkdir()
    _v2d_shard(tmp_path / "v2d" / "00000.tar")
    loader = ShardLoader(DataConfig(shards=str(tmp_path / "v2d" / "*.tar"), buckets=[(9, 32, 32)],
                                    caption_dropout=0.0), 0, 1, seed=0, batch_size=2)
    batch = next(loader)
    assert batch["video"].shape == (2, 9, 32, 32, 3) and batch["video"].dtype == torch.uint8
    assert all(c.startswith("a ") for c in batch["caption"])
    video = to_model_input(batch["video"])
    assert video.shape == (2, 3, 9, 32, 32) and -1 <= video.min() < video.max() <= 1
    # And re-sharded by us: bytes unchanged, metadata added.
    index = write_shards(webdataset_samples([tmp_path / "v2d" / "00000.tar"]), tmp_path / "ours")
    meta = json.loads(index.read_text())["shards"][0]["samples"][0]["meta"]
    assert meta == {"frames": 9, "fps": 8.0, "width": 32, "height": 32}

# ------------------------------------------------------------------------------------------- buckets

def test_bucket_batch_sizes_match_latent_tokens_and_assignment():
    cfg = DataConfig(buckets=[(9, 32, 32), (1, 32, 32), (9, 32, 64)])
    video, image, wide = make_buckets(cfg, batch_size=2)
    assert video.batch_size == 2 and image.batch_size == 6 and wide.batch_size == 1     # 3:1 latent frames
    buckets = [video, image, wide]
    assert assign_bucket(buckets, False, 64, 30, 20, 1) == wide      # nearest aspect ratio
    assert assign_bucket(buckets, False, 32, 32, 9, 1) == video
    assert assign_bucket(buckets, False, 32, 32, 8, 1) is None       # too short for any video bucket
    assert assign_bucket(buckets, False, 32, 32, 17, 2) == video     # 9 frames at stride 2 need 17
    assert assign_bucket(buckets, True, 500, 300, 1, 1) == image
    assert Bucket(9, 32, 32, 1).latent_tokens == 3 * 4 * 4


def test_image_fraction_schedule():
    assert [stream_of(0.25, s) for s in range(8)] == ["video", "video", "video", "image"] * 2
    assert image_steps(0.3, 0, 1000) == 300 and image_steps(0.0, 0, 10) == 0


def _cfg(folder, workers=0, **kw):
    kw = {"buckets": [(9, 32, 32), (9, 32, 48), (1, 32, 32)], "image_fraction": 0.25,
          "caption_dropout": 0.0, **kw}
    return DataConfig(shards=str(folder), num_workers=workers, **kw)


def test_batches_never_mix_shapes_and_follow_the_mixture(tmp_path):
    folder = write_mixed(tmp_path / "s")
    loader = ShardLoader(_cfg(folder), 0, 1, seed=0, batch_size=2)
    shapes = Counter()
    for step in range(12):
        batch = next(loader)
        assert batch["stream"] == stream_of(0.25, step)
        shapes[tuple(batch["video"].shape[1:4])] += 1
        assert (batch["stream"] == "image") == (batch["video"].shape[1] == 1)
        assert len(batch["key"]) == batch["video"].shape[0] and len(set(batch["key"])) == len(batch["key"])
    assert set(shapes) == {(9, 32, 32), (9, 32, 48), (1, 32, 32)}
    assert loader.excluded == {"too_short": 0} or sum(loader.excluded.values()) == 0

# ------------------------------------------------------------------------------------ exact resume

def _ledger(folder, legs, seed=3, **kw):
    """Run (world_size, workers, steps) legs one after another, each resuming from the previous state;
    return how often each key of epoch 0 was seen, and the number of batches each rank yielded per leg."""
    seen, state, yielded = Counter(), None, []
    for world, workers, steps in legs:
        loaders = [ShardLoader(_cfg(folder, workers, **kw), rank, world, seed, batch_size=2) for rank in range(world)]
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(json.loads(json.dumps(state)))
        counts = [0] * world
        for _ in range(steps):
            for rank, loader in enumerate(loaders):
                batch = next(loader)
                counts[rank] += 1
                if batch["epoch"] == 0:
                    seen.update(f"{batch['stream']}:{k}" for k in batch["key"])
        states = [loader.state_dict() for loader in loaders]
        assert all(s == states[0] for s in states)                    # one data position for all ranks
        state = states[0]
        yielded.append(counts)
    return seen, yielded


def _all_keys():
    return {f"{'image' if s['__key__'].startswith('i') else 'video'}:{s['__key__']}" for s in mixed_samples()}


@pytest.mark.parametrize("legs", [
    [(2, 0, 16)],                                   # straight through
    [(2, 0, 5), (2, 2, 11)],                        # restart, same world size, now with 2 workers
    [(2, 2, 5), (3, 0, 12)],                        # restart on 3 ranks, no workers
    [(3, 1, 3), (1, 2, 30)],                        # restart on 1 rank with 2 workers
])
def test_every_sample_exactly_once_per_epoch_across_restarts(tmp_path, legs):
    folder = write_mixed(tmp_path / "s")
    seen, yielded = _ledger(folder, legs)
    assert set(seen) == _all_keys()
    assert set(seen.values()) == {1}, {k: v for k, v in seen.items() if v != 1}
    for counts, (_, _, steps) in zip(yielded, legs):
        assert counts == [steps] * len(counts)                        # every rank in step


def _same_batch(a: dict, b: dict) -> bool:
    """Keys, captions, pixels and every other field equal."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_resume_gives_exactly_the_batches_of_an_uninterrupted_run(tmp_path):
    folder = write_mixed(tmp_path / "s")
    kw = {"caption_dropout": 0.3, "augment": ["hflip"], "buckets": [(9, 32, 32), (1, 32, 32)]}
    straight = ShardLoader(_cfg(folder, **kw), 1, 2, seed=0, batch_size=2)
    expected = [next(straight) for _ in range(10)]
    first = ShardLoader(_cfg(folder, **kw), 1, 2, seed=0, batch_size=2)
    for _ in range(4):
        next(first)
    resumed = ShardLoader(_cfg(folder, workers=2, **kw), 1, 2, seed=0, batch_size=2)
    resumed.load_state_dict(first.state_dict())
    got = [next(resumed) for _ in range(6)]
    assert all(_same_batch(a, b) for a, b in zip(got, expected[4:]))     # pixels, captions, keys, streams
    assert {b["stream"] for b in got} == {"video", "image"} and any(c == "" for b in got for c in b["caption"])
    assert not _same_batch(got[0], expected[3])                          # the check tells batches apart


def test_the_stream_of_a_step_is_the_same_for_all_its_micro_batches(tmp_path):
    """1 rank x 4 micro-batches, 2 ranks x 2 and 4 ranks x 1 read the same batches at every optimizer step,
    images included, and resume across those layouts exactly."""
    folder = write_mixed(tmp_path / "s")

    def steps(world: int, accumulation: int, n: int, state=None) -> tuple[list[list[tuple]], dict]:
        loaders = [ShardLoader(_cfg(folder), r, world, seed=0, batch_size=2, accumulation=accumulation)
                   for r in range(world)]
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(state)
        out = []
        for _ in range(n):
            batches = [next(loader) for _ in range(accumulation) for loader in loaders]
            out.append(sorted((b["stream"], tuple(b["key"])) for b in batches))
        return out, loaders[0].state_dict()

    reference, _ = steps(1, 4, 8)
    assert {stream for step in reference for stream, _ in step} == {"video", "image"}
    assert all(len({stream for stream, _ in step}) == 1 for step in reference)      # one stream per step
    assert steps(2, 2, 8)[0] == reference and steps(4, 1, 8)[0] == reference
    first, state = steps(2, 2, 3)
    assert first + steps(4, 1, 5, state)[0] == reference


def test_epochs_reshuffle_and_caption_dropout_is_seeded(tmp_path):
    folder = write_mixed(tmp_path / "s")
    loader = ShardLoader(_cfg(folder, image_fraction=0.0, caption_dropout=0.5), 0, 1, seed=0, batch_size=2)
    per_epoch = loader.steps_per_epoch()
    epoch0 = [k for _ in range(per_epoch) for k in next(loader)["key"]]
    epoch1 = [k for _ in range(per_epoch) for k in next(loader)["key"]]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    again = ShardLoader(_cfg(folder, image_fraction=0.0, caption_dropout=0.5), 0, 1, seed=0, batch_size=2)
    captions = [c for _ in range(per_epoch) for c in next(again)["caption"]]
    assert 0.2 < captions.count("") / len(captions) < 0.8
    replay = ShardLoader(_cfg(folder, image_fraction=0.0, caption_dropout=0.5), 0, 1, seed=0, batch_size=2)
    assert [c for _ in range(per_epoch) for c in next(replay)["caption"]] == captions

def test_augmentations_are_seeded_per_sample_and_epoch(tmp_path):
    folder = write_mixed(tmp_path / "s")
    kw = {"image_fraction": 0.0, "buckets": [(9, 32, 32)]}
    plain = ShardLoader(_cfg(folder, **kw), 0, 1, seed=0, batch_size=2)
    steps = 2 * plain.steps_per_epoch()
    augment = ["hflip", "vflip", "rot90", "reverse"]
    batches = [ShardLoader(_cfg(folder, augment=augment, **kw), 0, 1, seed=0, batch_size=2) for _ in range(2)]
    variants = {name: lambda v, axis=axis: v.flip(axis)                # v: (T, H, W, 3)
                for name, axis in (("reverse", 0), ("vflip", 1), ("hflip", 2))}
    variants["rot90"] = lambda v: v.rot90(1, (1, 2))
    applied = Counter()
    for _ in range(steps):
        base, augmented, replay = next(plain), next(batches[0]), next(batches[1])
        assert base["key"] == augmented["key"]                          # the same samples in the same order
        assert torch.equal(augmented["video"], replay["video"])         # seeded: a restart sees the same
        for clip, out in zip(base["video"], augmented["video"]):
            # Which of the 16 combinations was applied: one of them reproduces the output.
            matches = []
            for mask in range(16):
                names = [n for i, n in enumerate(augment) if mask >> i & 1]
                v = clip
                for name in names:
                    v = variants[name](v)
                if torch.equal(v, out):
                    matches.append(names)
            assert matches, "the augmented clip is no flip/rotation/reversal of the plain one"
            applied.update(matches[0])
    assert all(applied[n] > 0 for n in augment) and applied["hflip"] < steps * 2   # a coin flip, not always
    with pytest.raises(ValueError, match="rot90 needs square buckets"):
        DataConfig(buckets=[(9, 32, 48)], augment=["rot90"])

# --------------------------------------------------------------------------------------- bad input

def _epoch(loader: ShardLoader, steps: int) -> tuple[Counter, Counter]:
    """(keys of epoch 0 with how often each came, runtime skips by reason) over `steps` batches."""
    keys, skipped = Counter(), Counter()
    for _ in range(steps):
        batch = next(loader)
        if batch["epoch"] == 0:
            keys.update(batch["key"])
            skipped.update(batch["skipped"])
        assert len(batch["key"]) == len(batch["caption"]) == (0 if batch["padding"] else batch["video"].shape[0])
    return keys, skipped


def test_each_kind_of_bad_input_is_skipped_and_counted(tmp_path):
    """One sample per reason, each counted under its own reason; every good sample still comes exactly once."""
    good = mixed_samples(n_video=6, n_image=2)
    (_, short), = make_clips(1, 32, 32, 5, seed=9)
    full, meta = good[0]["mp4"], good[0]["json"]
    bad = [
        {"__key__": "bad_truncated", "mp4": full[: len(full) // 2], "txt": "cut", "json": meta},     # decoding
        {"__key__": "bad_empty", "mp4": b"", "txt": "nothing", "json": meta},                      # index
        {"__key__": "bad_nocaption", "mp4": full, "json": meta},                                    # index
        {"__key__": "bad_image", "png": b"\x89PNG\r\n not really", "txt": "broken", "json": good[-1]["json"]},
        {"__key__": "bad_short", "mp4": encode_mp4(short, 8), "txt": "short",                     # index
         "json": {"frames": 5, "fps": 8, "width": 32, "height": 32}},
        {"__key__": "bad_lying", "mp4": encode_mp4(short, 8), "txt": "claims 9 frames",           # decoding
         "json": {"frames": 9, "fps": 8, "width": 32, "height": 32}},
        {"__key__": "bad_nomedia", "txt": "a caption and metadata, no clip", "json": meta},       # index
        {"__key__": "bad_unknown", "xyz": b"some bytes", "txt": "unknown member", "json": meta},  # index
    ]
    folder = write_shards(good + bad, tmp_path / "s", max_count=4).parent
    loader = ShardLoader(_cfg(folder, image_fraction=0.25), 0, 1, seed=0, batch_size=2)
    assert {k: v for k, v in loader.excluded.items() if v} == {
        "empty_member": 1, "missing_caption": 1, "too_short": 1, "no_media": 2}
    keys, skipped = _epoch(loader, 12)
    assert set(keys) == {s["__key__"] for s in good} and set(keys.values()) == {1}
    assert dict(skipped) == {"undecodable": 1, "undecodable_image": 1, "too_short": 1}
    # The loader keeps the running count (over every epoch read so far).
    assert set(loader.skipped) == set(skipped) and all(loader.skipped[r] >= n for r, n in skipped.items())


class _WritesFile:
    """A pickle payload: unpickling it writes a file (what a malicious shard member would do)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.write_text, (self.path, "unpickled")


def test_pickle_members_are_never_unpickled(tmp_path):
    """A sample with any pickle extension is skipped without reading it: the loader, the re-sharder and
    cache-latents leave the payload's file unwritten."""
    canary = tmp_path / "canary.txt"
    payload = pickle.dumps(_WritesFile(canary))
    pickle.loads(pickle.dumps(_WritesFile(tmp_path / "control.txt")))       # the payload does what it says
    assert (tmp_path / "control.txt").read_text() == "unpickled"
    good = mixed_samples(n_video=4, n_image=0)
    bad = [{**good[i % 4], "__key__": f"pickled{ext}", ext: payload} for i, ext in enumerate(PICKLE_EXTS)]
    folder = write_shards(good + bad, tmp_path / "s", max_count=3).parent
    cfg = _cfg(folder, image_fraction=0.0, buckets=[(9, 32, 32), (9, 32, 48), (13, 32, 32)])
    loader = ShardLoader(cfg, 0, 1, seed=0, batch_size=2)
    assert loader.excluded["pickle_member"] == len(PICKLE_EXTS) == 5
    keys, _ = _epoch(loader, 2 * loader.steps_per_epoch())
    assert set(keys) == {s["__key__"] for s in good}
    resharded = write_shards(webdataset_samples(sorted(folder.glob("*.tar"))), tmp_path / "again")
    shards = json.loads(resharded.read_text())["shards"]
    members = {m for shard in shards for s in shard["samples"] for m in s["members"]}
    assert not members & set(PICKLE_EXTS)
    run = load_config(REPO / "configs/demo.yaml", [f"data.shards={folder}", "data.buckets=[[9,32,32]]",
                                                    "vae.checkpoint=unused"])
    cache_latents(run, tmp_path / "latents", VideoVAE(VAEConfig(latent_channels=4, base_channels=8)).eval())
    assert not canary.exists()


def _latent_shards(folder: Path, broken: dict[str, dict]) -> Path:
    """Latent samples with cached text (z 4, 9x32x32), keys t0..t5, with some members replaced or removed
    (broken: key -> {member: bytes or None})."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(6):
        sample = {"__key__": f"t{i}", "txt": f"caption {i}",
                  "latent.npy": npy_bytes(rng.standard_normal((4, 3, 4, 4)).astype(np.float16)),
                  "text.npy": npy_bytes(rng.standard_normal((8, 16)).astype(np.float16)),
                  "mask.npy": npy_bytes(np.arange(8) < 5), "json": {"frames": 9, "height": 32, "width": 32, "fps": 8}}
        for member, data in broken.get(sample["__key__"], {}).items():
            if data is None:
                del sample[member]
            else:
                sample[member] = data
        samples.append(sample)
    return write_shards(samples, folder, max_count=3).parent


def test_latent_shards_with_missing_or_corrupt_text_skip_the_sample(tmp_path):
    """A latent sample whose cached text is missing (found in the index) or corrupt, or whose latent is
    corrupt (found reading it), is skipped and counted; each batch keeps one latent, one caption and one
    text embedding per sample (before, a corrupt text.npy left n + 1 latents against n captions)."""
    folder = _latent_shards(tmp_path / "latents", {
        "t1": {"text.npy": None}, "t2": {"mask.npy": None},
        "t3": {"text.npy": b"\x93NUMPY garbage"}, "t4": {"latent.npy": npy_bytes(np.zeros((4, 2, 4, 4), np.float16))}})
    loader = ShardLoader(DataConfig(shards=str(folder), buckets=[(9, 32, 32)], caption_dropout=0.0), 0, 1, seed=0,
                         batch_size=2)
    assert {k: v for k, v in loader.excluded.items() if v} == {"missing_text": 2}
    keys, skipped = Counter(), Counter()
    for _ in range(loader.steps_per_epoch()):
        batch = next(loader)
        keys.update(batch["key"])
        skipped.update(batch["skipped"])
        if not batch["padding"]:
            n = len(batch["key"])
            assert batch["latent"].shape[0] == len(batch["caption"]) == batch["text"].shape[0] == \
                batch["text_mask"].shape[0] == n
    assert set(keys) == {"t0", "t5"} and dict(skipped) == {"undecodable_text": 1, "undecodable_latent": 1}


def test_a_batch_with_no_usable_sample_is_padding(tmp_path):
    good = mixed_samples(n_video=3, n_image=0)
    broken = [{**s, "__key__": f"broken{i}", "mp4": s["mp4"][:300]} for i, s in enumerate(good)]
    folder = write_shards(broken, tmp_path / "s").parent
    loader = ShardLoader(_cfg(folder, image_fraction=0.0, buckets=[(9, 32, 32)]), 0, 1, seed=0, batch_size=4)
    batch = next(loader)
    assert batch["padding"] and batch["key"] == [] and batch["video"].shape[1:4] == (9, 32, 32)


def test_clear_errors_for_unusable_data(tmp_path):
    folder = write_mixed(tmp_path / "s", n_image=0)
    with pytest.raises(ShardError, match="no usable image samples"):
        ShardLoader(_cfg(folder, image_fraction=0.5), 0, 1, seed=0, batch_size=2)
    with pytest.raises(ShardError, match="holds no samples"):
        ShardLoader(_cfg(tmp_path / "nothing-here"), 0, 1, seed=0, batch_size=2)


def test_index_is_rebuilt_from_tars_alone(tmp_path):
    folder = write_mixed(tmp_path / "s")
    (folder / "index.json").unlink()
    assert ShardLoader(_cfg(folder), 0, 1, seed=0, batch_size=2).steps_per_epoch() > 0
    assert write_index(folder).is_file()
