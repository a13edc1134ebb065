"""The generation benchmark at a tiny shape: the three methods do the same work, and the figures add up."""

import pytest

from benchmarks import generation
from benchmarks.common import FIGURE_KEYS

TINY = {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 2, "vocab": 8832, "num_codes": 16, "seed": 0}
# (a vocabulary that reaches the size tokens <reserved088xx> of the Lumina layout)


def test_methods_draw_the_same_image_layout_and_plain_takes_one_forward_per_token(monkeypatch, tmp_path):
    monkeypatch.setenv("CHAMELEON_FT_BENCH_CACHE", str(tmp_path))
    samples = generation.measure(size=64, rounds=2, device="cpu", spec=TINY)
    assert set(samples) == {"hf", "plain", "sjd"}
    n = 4 * 5 + 1  # 4 rows of (4 codes + row end), end-image
    for name, rounds in samples.items():
        assert [s["tokens"] for s in rounds] == [n, n], name
        assert all(s["wall"] > 0 and s["cpu"] > 0 for s in rounds)
    assert [s["passes"] for s in samples["hf"]] == [n, n] == [s["passes"] for s in samples["plain"]]
    assert all(1 <= s["passes"] < n for s in samples["sjd"])

    figs = generation.figures(samples, 64, "cpu", hidden=TINY["hidden"])
    assert [f["name"] for f in figs] == [
        "generation plain / HF generate, image tokens/s (CPU time)", "generation plain / HF generate, image tokens/s (wall)",
        "generation sjd / HF generate, image tokens/s (CPU time)", "generation sjd / HF generate, image tokens/s (wall)",
        "generation forward passes per image, plain / SJD"]
    assert [f["goal"] for f in figs] == [generation.SPEED_GOAL, None, None, None, generation.PASSES_GOAL]
    for f in figs:
        assert set(FIGURE_KEYS) <= set(f)
    # Medians of per-round ratios (of two rounds: their mean).
    plain, sjd, hf = samples["plain"], samples["sjd"], samples["hf"]
    assert figs[-1]["ratio"] == pytest.approx(sum(p["passes"] / s["passes"] for p, s in zip(plain, sjd)) / 2)
    assert figs[0]["ratio"] == pytest.approx(sum(h["cpu"] / p["cpu"] for p, h in zip(plain, hf)) / 2)
