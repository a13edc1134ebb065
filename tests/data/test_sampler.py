from chameleon_ft.data.sampler import LengthGroupedBatchSampler


def test_batches_cover_everything_once_and_group_lengths():
    lengths = [(i * 37) % 101 for i in range(200)]
    s = LengthGroupedBatchSampler(lengths, 8, seed=3, group_size=5)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(200))
    # inside a batch lengths are close: spread far below the global spread
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 25


def test_order_is_seeded_and_changes_per_epoch():
    lengths = list(range(64))
    a = LengthGroupedBatchSampler(lengths, 4, seed=1)
    b = LengthGroupedBatchSampler(lengths, 4, seed=1)
    e0a, e0b = list(a), list(b)
    assert e0a == e0b
    assert list(a) != e0a  # epoch 1 differs
    assert list(LengthGroupedBatchSampler(lengths, 4, seed=2)) != e0a


def test_resume_continues_with_next_batch():
    lengths = list(range(50))
    full = LengthGroupedBatchSampler(lengths, 4, seed=0)
    ref = list(full)
    s = LengthGroupedBatchSampler(lengths, 4, seed=0)
    it = iter(s)
    first = [next(it) for _ in range(5)]
    state = s.state_dict()
    resumed = LengthGroupedBatchSampler(lengths, 4, seed=0)
    resumed.load_state_dict(state)
    assert first + list(resumed) == ref


def test_ranks_split_batches_disjointly():
    lengths = list(range(40))
    r0 = list(LengthGroupedBatchSampler(lengths, 4, seed=0, num_replicas=2, rank=0))
    r1 = list(LengthGroupedBatchSampler(lengths, 4, seed=0, num_replicas=2, rank=1))
    assert len(r0) == len(r1) == 5
    assert not set(i for b in r0 for i in b) & set(i for b in r1 for i in b)
