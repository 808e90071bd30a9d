"""hvd-easgd-plot: the paper-style figure from run directories."""

import json
import math

import pytest

from hvd_easgd.train import plot


def _write_run(path, *, speed=1.0, name=None, steps=400, torn_tail=False, nan_loss=False):
    path.mkdir(parents=True)
    lines = []
    for step in range(0, steps + 1, 10):
        rec = {"step": step, "epoch": step / 100, "wall_time": step * 0.2 / speed,
               "samples": step * 128 * 4,
               "train/loss": 2.3 * math.exp(-step / 150 * speed) + 0.05, "lr": 0.05}
        if step % 50 == 0:  # evaluations are sparser than training logs
            rec["center/test_error"] = 0.8 * math.exp(-step / 200 * speed) + 0.1
            rec["local/test_error"] = rec["center/test_error"] + 0.02
        lines.append(json.dumps(rec))
    if nan_loss:
        lines.append(json.dumps({"step": steps + 10, "epoch": 5.0, "wall_time": steps,
                                 "samples": 1, "train/loss": float("nan")}))
    text = "\n".join(lines) + "\n"
    if torn_tail:
        text += '{"step": 999, "wall_ti'
    (path / "metrics.jsonl").write_text(text)
    if name:
        (path / "config.yaml").write_text(f"name: {name}\noptimizer:\n  lr: 0.05\n")
    return path


def test_two_runs_make_a_png_with_one_line_per_run_in_each_panel(tmp_path, capsys):
    a = _write_run(tmp_path / "a", name="easgd_p4_tau10", torn_tail=True)
    b = _write_run(tmp_path / "run_b", speed=0.5)
    out = tmp_path / "figs" / "cmp.png"
    assert plot.main([str(a), str(b), "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out

    from PIL import Image

    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.size == (1200, 480)
        colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colors) > 50  # not blank

    runs = [plot.load_run(a), plot.load_run(b)]
    assert [r.label for r in runs] == ["easgd_p4_tau10", "run_b"]  # config name, else dir name
    fig = plot.make_figure(runs)
    ax_err, ax_loss = fig.axes
    assert len(ax_err.get_lines()) == 2 and len(ax_loss.get_lines()) == 2
    assert "error" in ax_err.get_ylabel() and "%" in ax_err.get_ylabel()
    assert "loss" in ax_loss.get_ylabel()
    assert ax_err.get_xlabel() == "wall-clock training time (s)"
    assert [t.get_text() for t in ax_err.get_legend().get_texts()] == ["easgd_p4_tau10", "run_b"]
    # Errors are plotted in percent, against wall-clock seconds, only where they were logged.
    xs, ys = ax_err.get_lines()[1].get_data()
    assert list(xs) == pytest.approx([s * 0.2 / 0.5 for s in range(0, 401, 50)])
    assert ys[0] == pytest.approx(90.0)
    assert len(ax_loss.get_lines()[0].get_xdata()) == 41  # the torn last line is skipped


def test_labels_axes_and_divergence(tmp_path):
    a = _write_run(tmp_path / "a", steps=4000, nan_loss=True)
    b = _write_run(tmp_path / "b")
    out = tmp_path / "o.png"
    assert plot.main([str(a), str(b), "-o", str(out), "--labels", "EAMSGD", "DOWNPOUR",
                      "--smooth", "5", "--log-loss", "--title", "CIFAR-10, p=4"]) == 0
    assert out.stat().st_size > 10_000
    runs = [plot.load_run(a, "EAMSGD"), plot.load_run(b, "DOWNPOUR")]
    fig = plot.make_figure(runs, smooth=5)
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend == ["EAMSGD (diverged)", "DOWNPOUR"]
    assert fig.axes[0].get_xlabel() == "wall-clock training time (min)"  # 800 s
    fig = plot.make_figure(runs, x="epoch")
    assert fig.axes[0].get_xlabel() == "epoch"


def test_errors_name_the_run_dir_and_what_is_missing(tmp_path, capsys):
    good = _write_run(tmp_path / "good")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert plot.main([str(good), str(empty), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "missing metrics.jsonl" in err
    assert not (tmp_path / "x.png").exists()
    assert plot.main([str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert plot.main([str(good), "--labels", "a", "b", "-o", str(tmp_path / "y.png")]) == 2
    assert "2 labels for 1 runs" in capsys.readouterr().err
    bad = _write_run(tmp_path / "bad")
    with open(bad / "metrics.jsonl", "r+") as f:
        text = f.read()
        f.seek(0)
        f.write("garbage\n" + text)
    assert plot.main([str(bad)]) == 2
    assert "line 1" in capsys.readouterr().err


def test_runs_with_the_same_name_are_told_apart_by_directory(tmp_path):
    from hvd_easgd.train.plot import plot_runs

    dirs = []
    for d in ("digits", "digits-2"):
        run = tmp_path / d
        run.mkdir()
        (run / "config.yaml").write_text("name: digits\n")
        (run / "metrics.jsonl").write_text(
            '{"step": 1, "wall_time": 1.0, "train/loss": 2.0, "center/test_error": 0.5}\n'
            '{"step": 2, "wall_time": 2.0, "train/loss": 1.0, "center/test_error": 0.2}\n')
        dirs.append(run)
    import matplotlib
    matplotlib.use("Agg")
    from hvd_easgd.train import plot

    runs = []
    original = plot.make_figure

    def spy(r, *a, **k):
        runs.extend(r)
        return original(r, *a, **k)

    plot.make_figure = spy
    try:
        plot_runs(dirs, tmp_path / "out.png")
    finally:
        plot.make_figure = original
    assert [r.label for r in runs] == ["digits (digits)", "digits (digits-2)"]
