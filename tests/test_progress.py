"""Progress output: a bar on a terminal, plain lines with the same figures elsewhere (CI, SLURM logs)."""

import io

from vidiff.progress import PlainProgress, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_the_output_is_not_a_terminal():
    out = io.StringIO()
    items = list(progress(range(5), desc="shards", unit="sample", file=out))
    assert items == list(range(5))
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("shards: 1/5 sample (20%)")                # the first update, then the end
    assert lines[-1].startswith("shards: 5/5 sample (100%)") and "sample/s" in lines[-1] and "elapsed" in lines[-1]


def test_plain_progress_prints_every_interval_and_its_postfix():
    out = io.StringIO()
    bar = PlainProgress(total=100, desc="train", unit="step", initial=40, file=out, every=0.0)
    bar.set_postfix(loss="0.1234")
    bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("train: 41/100 step (41%)") and "loss=0.1234" in lines[0]
    assert "ETA" in lines[0]


def test_a_terminal_gets_a_tqdm_bar():
    out = Terminal()
    list(progress(range(3), desc="sample", unit="clip", file=out))
    assert "\r" in out.getvalue() and "3/3" in out.getvalue()
