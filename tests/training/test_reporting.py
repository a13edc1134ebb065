"""The run's own report: best values by each metric's direction, the monitored one by monitor_mode."""

from chameleon_ft.training.reporting import RunReport, better


def test_best_step_follows_each_metrics_direction():
    report = RunReport({"task": "vqa"}, monitor="val/acc", monitor_mode="max")
    report.record(200, {"val/acc": 0.40, "val/loss": 2.0})
    report.record(400, {"val/acc": 0.57, "val/loss": 1.8})
    report.record(600, {"val/acc": 0.55, "val/loss": 1.9})
    text = report.summary({"val/acc": 0.55, "val/loss": 1.9}, {"adapter": "runs/x/adapter"})
    rows = {line.split()[0]: line.split() for line in text.splitlines()[3:5]}
    assert rows["val/acc"] == ["val/acc", "*", "0.55", "0.57", "400"]  # monitored, higher is better
    assert rows["val/loss"] == ["val/loss", "1.9", "1.8", "400"]  # lower is better
    assert "adapter written to runs/x/adapter" in text
    assert better("val/z_loss", "val/acc", "max") == "min" and better("val/bleu4", "val/acc", "max") == "max"
    # A monitored loss-like metric follows monitor_mode, whatever its name says.
    assert better("val/loss", "val/loss", "max") == "max"


def test_graceful_stop_gives_ctrl_c_back_when_the_run_fails():
    import signal
    from types import SimpleNamespace

    from chameleon_ft.training.reporting import GracefulStop

    before = signal.getsignal(signal.SIGINT)
    stop = GracefulStop()
    stop.on_train_start(SimpleNamespace(), None)
    assert signal.getsignal(signal.SIGINT) == stop._handler
    stop.on_exception(SimpleNamespace(), None, RuntimeError("boom"))
    assert signal.getsignal(signal.SIGINT) is before
