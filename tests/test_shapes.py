"""The moving-shapes ground truth: the generator's splits and bounces, and the checker's validation on real clips
(through mp4, as training data) and on clips corrupted five ways, each of which it must reject."""

import numpy as np
import pytest

from vidiff.data.synthetic import (ALL_COMBOS, BACKGROUND, CORRUPTIONS, SEEN_COMBOS, UNSEEN_COMBOS, corrupt,
                                   heldout_clips, make_clips, radius_for)
from vidiff.data.video import decode_clip, encode_mp4
from vidiff.eval.cascade import repeat_frames
from vidiff.eval.shapes import check_clip, parse_prompt, track_error

SIZE = (9, 48, 48)                                          # (frames, height, width): the benchmark's


@pytest.fixture(scope="module")
def heldout():
    frames, height, width = SIZE
    return heldout_clips(height, width, frames, per_combo=2, seed=11)


def _mp4(video: np.ndarray) -> np.ndarray:
    return decode_clip(encode_mp4(video, 8), *video.shape[:3])


def test_training_never_shows_an_unseen_combination_and_splits_differ():
    train = [c for c, _ in make_clips(300, 48, 48, 9, seed=0, split="train", second_object=0.5)]
    assert all(o.combo in SEEN_COMBOS for c in train for o in c.objects)
    assert {c.objects[0].combo for c in train} == set(SEEN_COMBOS)
    assert len(UNSEEN_COMBOS) == 6 and len(ALL_COMBOS) == 48
    heldout = [c for c, _ in make_clips(20, 48, 48, 9, seed=0, split="heldout")]
    assert [c.objects[0].start for c in heldout] != [c.objects[0].start for c in train[:20]]


def test_captions_parse_back_to_the_truth():
    for clip, _ in make_clips(50, 48, 48, 9, seed=2, second_object=0.5):
        phrases = parse_prompt(clip.caption)
        assert [(p.color, p.shape, p.direction) for p in phrases] == [o.combo for o in clip.objects]
    with pytest.raises(ValueError, match=r"'a purple square moving left'.*red, green, blue, yellow"):
        parse_prompt("a purple square moving left")


def test_shapes_bounce_off_the_borders_and_stay_inside():
    frames, height, width = 33, 48, 48                       # long enough for several bounces
    r = radius_for(height, width)
    for clip, video in make_clips(40, height, width, frames, seed=3, texture=0.5):
        obj = clip.objects[0]
        centres = np.array([obj.centre(t, height, width) for t in range(frames)])
        assert centres.min() >= r and centres[:, 0].max() <= height - 1 - r and centres[:, 1].max() <= width - 1 - r
        axis = 0 if obj.direction in ("up", "down") else 1
        assert np.ptp(centres[:, 1 - axis]) == 0 and np.sign(np.diff(centres[:, axis])).tolist().count(0) == 0
    assert video.shape == (frames, height, width, 3) and video.dtype == np.uint8


def test_the_checker_passes_real_heldout_clips(heldout):
    results = [check_clip(_mp4(video), clip.caption) for clip, video in heldout]
    failures = [(clip.caption, r.reasons) for (clip, _), r in zip(heldout, results) if not r.passed]
    assert len(failures) <= 0.01 * len(heldout), failures


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_the_checker_rejects_a_corrupted_clip(heldout, kind):
    rng = np.random.default_rng(CORRUPTIONS.index(kind))
    passed = [clip.caption for clip, video in heldout
              if check_clip(_mp4(corrupt(clip, video, kind, rng)), clip.caption).passed]
    assert len(passed) <= 0.01 * len(heldout), passed


def test_the_checker_says_what_is_wrong(heldout):
    clip, video = next((c, v) for c, v in heldout if c.objects[0].combo == ("red", "square", "left"))
    wrong = check_clip(video, "a blue square moving left")
    assert not wrong.passed and wrong.scores["count"] == 0
    assert "objects by colour {'red': 1}" in wrong.reasons[0] and "{'blue': 1}" in wrong.reasons[0]
    backwards = check_clip(video, "a red square moving right")
    assert not backwards.passed and backwards.scores["count"] == 1 and backwards.scores["motion"] < 1
    assert check_clip(video, "a red square moving left").passed


def test_the_checker_passes_the_harder_sets():
    """Two objects (each phrase of the caption checked) and textured backgrounds."""
    clips = list(make_clips(60, 48, 48, 9, seed=1, split="heldout", second_object=1.0, texture=0.5))
    assert sum(len(c.objects) == 2 for c, _ in clips) >= 25 and sum(c.texture >= 0 for c, _ in clips) >= 20
    failures = [(c.caption, r.reasons) for c, v in clips if not (r := check_clip(_mp4(v), c.caption)).passed]
    assert not failures, failures


def test_track_error_is_how_far_objects_are_from_where_the_truth_has_them(heldout):
    """Repeated frames pass the motion sub-score (never a step back) but put the object one step behind in every
    repeated frame: 4 of 9 frames off by its speed (less near a bounce). A frame without the object counts as the
    frame's width."""
    ratios = []
    for clip, video in heldout:
        assert track_error(video, video, clip.caption) == 0
        repeated = repeat_frames(video[::2], 2)
        assert check_clip(repeated, clip.caption).scores["motion"] == 1
        ratios.append(track_error(repeated, video, clip.caption) / (4 * clip.objects[0].speed / 9))
    assert 0.9 < np.median(ratios) < 1.1 and 0.5 < min(ratios) and max(ratios) < 1.2
    clip, video = heldout[0]
    blank = video.copy()
    blank[3] = np.array(BACKGROUND, np.uint8)
    assert track_error(blank, video, clip.caption) == pytest.approx(video.shape[2] / len(video))
