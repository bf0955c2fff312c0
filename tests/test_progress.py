"""Progress output: plain lines off a terminal (CI, Slurm files), quiet for short loops."""
import time

from elastictrain.progress import LineBar, Progress, Silent


def test_lines_report_position_rate_postfix_and_eta():
    lines = []
    bar = LineBar(total=4, desc="[s] epoch 1/2", unit="step", log=lines.append, every_s=0.0)
    bar.update(1, loss=0.5)
    bar.update(1, loss=0.25, **{"img/s": 100})
    bar.close()
    assert len(lines) == 3
    assert lines[1].startswith("[s] epoch 1/2: 2/4 (50%) step loss 0.25 img/s 100 ") and " eta " in lines[1]
    assert lines[2].startswith("[s] epoch 1/2: 2/4 (50%)")


def test_a_loop_shorter_than_the_interval_is_quiet():
    lines = []
    bar = LineBar(total=3, desc="eval", unit="batch", log=lines.append, every_s=60.0)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert lines == []


def test_modes():
    lines = []
    assert isinstance(Progress("off")(3), Silent)
    p = Progress("lines", lines.append, every_s=0.0, prefix="[x] ")
    b = p(2, "train", "step")
    b.update(1)
    time.sleep(0.01)
    assert lines and lines[0].startswith("[x] train: 1/2 (50%) step")
    assert isinstance(Progress("auto")(2), LineBar)  # pytest's stderr is not a terminal
