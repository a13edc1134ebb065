"""The GPU tier's fixtures: the device parametrisation and the figure recorder.

Every check runs on ``cpu`` (tiny sizes, the normal suite) and on ``cuda`` (marked ``gpu``: selected by
``pytest -m gpu``, skipped with the reason where no CUDA device is present).

With ``GPU_CHECK_RECORD=<file>`` (set by ``benchmarks/gpu_check.sh``) each check's figures and each
test's outcome are appended to that file as JSON lines as soon as they are known, so a run killed by
its time box still reports everything that finished.
"""

import json
import os

import pytest
import torch

RECORD_ENV = "GPU_CHECK_RECORD"
NO_CUDA = "needs a CUDA GPU (the GPU tier: pytest -m gpu, or benchmarks/gpu_check.sh on a lent GPU)"
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)])
DEVICES = ["cpu", CUDA]


def _append(entry: dict) -> None:
    path = os.environ.get(RECORD_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread_without_cuda():
    """Without CUDA (a CPU machine whose cores other jobs share) the tiny CPU twins run on one thread:
    with more, spin-waiting threads made them up to 50x slower under load. A lent GPU machine is ours alone."""
    if torch.cuda.is_available():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def record():
    """``record(result)``: keep a :class:`~tests.gpu.checks.CheckResult`'s figures, then assert it."""

    def keep(result) -> None:
        _append({"kind": "check", **result.as_record()})
        result.assert_ok()

    return keep


def pytest_runtest_logreport(report):
    # One line per test: its call outcome, or the setup outcome when it never got that far (skips, errors).
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        message = ""
        if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            message = report.longrepr[2]
        elif report.failed:
            message = str(report.longrepr)[-2000:]
        _append({"kind": "outcome", "nodeid": report.nodeid, "outcome": report.outcome if report.when == "call"
                 or report.outcome == "skipped" else "error", "seconds": round(report.duration, 2), "message": message})


@pytest.fixture(scope="session")
def fp32_cpu_reference(tmp_path_factory):
    """``get(steps, extra=())``: the fp32 CPU run of the check configuration plus ``extra`` overrides
    (each built once per session)."""
    from tests.gpu.checks import train_run

    runs = {}

    def get(steps: int, extra=()):
        key = (steps, tuple(extra))
        if key not in runs:
            runs[key] = train_run(tmp_path_factory.mktemp("fp32_cpu"), "cpu", "fp32", steps=steps, extra=extra)
        return runs[key]

    return get
