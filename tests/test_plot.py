"""Training curves: `lm pretrain` leaves RUN/curves.png, `lm plot` overlays runs' loss,
learning rate, grad norm and tokens/s, and without matplotlib says how to install it."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from lm.cli import main
from lm.commands.pretrain import pretrain
from lm.config import Config, OptimConfig, TrainConfig, to_dict
from lm.train.curves import draw, read_curves
from lm.train.optim import learning_rate

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(directory, records, steps=20, lr=1e-3, warmup=5):
    """A run dir with `records` as metrics.jsonl and a config.yaml (no training)."""
    directory.mkdir(parents=True)
    cfg = Config(optim=OptimConfig(lr=lr, warmup_steps=warmup), train=TrainConfig(steps=steps))
    (directory / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


def _train(step, loss):
    return {
        "step": step,
        "train/loss": loss,
        "train/grad_norm": 1.0 + step / 10,
        "train/tokens_per_s": 1000.0 * step,
    }


def test_pretrain_writes_curves_png(tiny_text_config, capsys):
    pretrain(tiny_text_config)
    png = Path(tiny_text_config.train.run_dir) / "curves.png"
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert f"curves: {png}" in capsys.readouterr().out


def test_curves_keep_a_resumed_runs_later_values_and_skip_a_torn_line(tmp_path):
    run = _fake_run(tmp_path / "run", [_train(2, 5.0), _train(4, 4.0), _train(6, 3.5)])
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "train/loss": 3.9}) + "\n")  # the resumed run's step 4
        f.write(json.dumps({"step": 5, "eval/loss": 4.2}) + "\n")
        f.write('{"step": 8, "train/lo')  # cut short by a crash
    curves = read_curves(run)
    assert curves.series["train/loss"] == [(2, 5.0), (4, 3.9), (6, 3.5)]
    assert curves.series["eval/loss"] == [(5, 4.2)]
    # No train/lr logged: the schedule of config.yaml, at the update that ended each step.
    schedule = learning_rate(OptimConfig(lr=1e-3, warmup_steps=5), 20)
    assert curves.lr_from_schedule
    steps, rates = zip(*curves.series["train/lr"], strict=True)  # every step, not just logged
    assert steps == (1, 2, 3, 4, 5, 6)
    assert rates == pytest.approx([float(schedule(s - 1)) for s in steps])


def test_each_panel_overlays_every_run_in_its_own_colour(tmp_path):
    first = _fake_run(tmp_path / "a" / "run", [_train(s, 6.0 - s / 10) for s in (1, 2, 3)])
    second = _fake_run(tmp_path / "b" / "run", [_train(s, 5.0 - s / 10) for s in (1, 2, 3, 4)])
    with (second / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "eval/loss": 4.5}) + "\n")
    figure = draw([read_curves(first, "a"), read_curves(second, "b")])
    loss, lr, grad_norm, throughput = figure.axes
    assert [line.get_label() for line in loss.get_lines()] == ["a train", "b train", "b validation"]
    assert [line.get_label() for line in lr.get_lines()] == ["a (schedule)", "b (schedule)"]
    for ax in (grad_norm, throughput):
        a, b = ax.get_lines()
        assert (a.get_label(), b.get_label()) == ("a", "b") and a.get_color() != b.get_color()
        assert list(b.get_xdata()) == [1, 2, 3, 4]


def test_lm_plot_cli_writes_the_png_and_names_bad_input(tmp_path, capsys):
    first = _fake_run(tmp_path / "a" / "run", [_train(s, 6.0 - s / 10) for s in (1, 2, 3)])
    second = _fake_run(tmp_path / "b" / "run", [_train(s, 5.0 - s / 10) for s in (1, 2, 3)])
    out = tmp_path / "plots" / "both.png"
    assert main(["plot", str(first), str(second), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert capsys.readouterr().out == f"{out}: curves of 2 runs\n"
    assert main(["plot", str(first)]) == 0  # one run: RUN/curves.png
    assert (first / "curves.png").read_bytes().startswith(PNG_MAGIC)
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no metrics.jsonl" in err


def test_without_matplotlib_lm_plot_says_to_install_the_extra(tmp_path, capsys, monkeypatch):
    run = _fake_run(tmp_path / "run", [_train(1, 5.0)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(["plot", str(run)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "pip install 'lm[plot]'" in captured.err
    assert not (run / "curves.png").exists()
