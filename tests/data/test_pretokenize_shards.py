"""Pre-tokenization shards close after a time budget (or a record count), so a killed build loses at most one
shard of work and resumes from the shards it finished."""

import json
from types import SimpleNamespace

import pytest

from chameleon_ft.data import pipeline
from chameleon_ft.data.errors import DataConfigError
from chameleon_ft.data.pipeline import tokenized_split
from chameleon_ft.data.tokenize import ConversationEncoder
from tests.data.test_pipeline import cache_dirs, digits_cfg, rows


class SlowEncoder:
    """Wraps ``encode_batch``: each call "takes" ``seconds`` on a fake clock; ``kill_on_call`` (1-based) raises
    there as a kill would. Records the indices each call encoded."""

    def __init__(self, monkeypatch, seconds: float, kill_on_call: int | None = None):
        self.now, self.calls = 1000.0, []
        real = ConversationEncoder.encode_batch

        def encode_batch(encoder, records):
            self.calls.append([r["index"] for r in records])
            if kill_on_call is not None and len(self.calls) == kill_on_call:
                raise KeyboardInterrupt("killed")
            self.now += seconds
            return real(encoder, records)

        monkeypatch.setattr(ConversationEncoder, "encode_batch", encode_batch)
        monkeypatch.setattr(pipeline, "time", SimpleNamespace(monotonic=lambda: self.now))


def shard_ranges(cfg) -> list[tuple[int, int]]:
    (name,) = cache_dirs(cfg)
    stats = [json.loads(p.read_text()) for p in sorted((pipeline.cache_root(cfg) / name / "shards").glob("*.json"))]
    return [(s["start"], s["end"]) for s in stats]


def test_shards_close_after_the_time_budget(tiny_grouped, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "ENCODE_BATCH", 2)
    cfg = digits_cfg(tmp_path, pretokenize_shard_seconds=60.0)
    SlowEncoder(monkeypatch, seconds=25.0)  # a shard holds 3 batches: 25, 50 s go on, 75 s closes it
    ds = tokenized_split(cfg, tiny_grouped, "train", progress=False)
    assert shard_ranges(cfg) == [(0, 6), (6, 10)]
    whole = tokenized_split(digits_cfg(tmp_path / "b"), tiny_grouped, "train", progress=False)
    assert rows(ds) == rows(whole)


def test_a_killed_build_resumes_from_its_finished_shards(tiny_grouped, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "ENCODE_BATCH", 2)
    cfg = digits_cfg(tmp_path, pretokenize_shard_seconds=60.0)
    with monkeypatch.context() as m:
        killed = SlowEncoder(m, seconds=25.0, kill_on_call=5)  # in the second shard
        with pytest.raises(KeyboardInterrupt):
            tokenized_split(cfg, tiny_grouped, "train", progress=False)
    assert not cache_dirs(cfg)  # not published as done
    finished = sum(killed.calls[:3], [])
    resumed_calls = SlowEncoder(monkeypatch, seconds=1.0).calls
    resumed = tokenized_split(cfg, tiny_grouped, "train", progress=False)
    redone = sum(resumed_calls, [])
    # only what the unfinished shard had started is encoded again, nothing of the finished one
    assert not set(redone) & set(finished) and sorted(finished + redone) == sorted(resumed["index"])
    assert shard_ranges(cfg) == [(0, 6), (6, 10)]
    whole = tokenized_split(digits_cfg(tmp_path / "b"), tiny_grouped, "train", progress=False)
    assert rows(resumed) == rows(whole)


def test_record_limit_and_invalid_settings(tiny_grouped, tmp_path):
    cfg = digits_cfg(tmp_path, pretokenize_shard_size=4)
    tokenized_split(cfg, tiny_grouped, "train", progress=False)
    assert shard_ranges(cfg) == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(DataConfigError, match="data.pretokenize_shard_size=0 must be >= 1"):
        tokenized_split(digits_cfg(tmp_path, pretokenize_shard_size=0), tiny_grouped, "train", progress=False)
