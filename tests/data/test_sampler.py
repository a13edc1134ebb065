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


def _steps(lengths, batch_size, world, accumulation):
    """The set of samples each optimizer step consumes, over every rank and micro-batch."""
    per_rank = [list(LengthGroupedBatchSampler(lengths, batch_size, seed=5, group_size=3, num_replicas=world,
                                               rank=r, accumulation=accumulation)) for r in range(world)]
    n = len(per_rank[0])
    assert all(len(b) == n for b in per_rank) and n % accumulation == 0
    return [sorted(i for r in range(world) for b in per_rank[r][k * accumulation:(k + 1) * accumulation] for i in b)
            for k in range(n // accumulation)]


def test_steps_see_the_same_samples_whatever_the_split_into_ranks_and_accumulation():
    lengths = [(i * 53) % 97 + 1 for i in range(101)]  # 26 batches of 4 (the last one short)
    reference = _steps(lengths, 4, 1, 4)
    assert len(reference) == 6  # whole steps of 4 batches: the last 2 batches are dropped
    for world, accumulation in ((2, 2), (4, 1)):
        assert _steps(lengths, 4, world, accumulation) == reference
    assert _steps(lengths, 4, 2, 1) == _steps(lengths, 4, 1, 2)
