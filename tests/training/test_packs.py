"""Packs per step: the split of a step's slots into ranks and micro-steps never changes which packs it trains."""
import pytest

from ochat.data import open_dataset
from ochat.training.packs import PackPlan
from tests.helpers.train import make_sample_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return open_dataset(make_sample_dataset(str(tmp_path_factory.mktemp("ds") / "data")))


def packs_per_step(dataset, world, accum, epoch=1):
    """[step] -> the step's packs over all ranks, each as the sorted token tuples of its conversations."""
    plans = [PackPlan(dataset, 2048, world_size=world, rank=r, grad_accum=accum, seed=3, filler_token=0)
             for r in range(world)]
    steps = plans[0].steps_in_epoch(epoch)
    assert all(p.steps_in_epoch(epoch) == steps for p in plans)
    out = []
    for s in range(steps):
        step = []
        for p in plans:
            for micro in next(iter(p.steps(epoch, s))):
                cu, ids = micro["cu_seqlens"].tolist(), micro["input_ids"].tolist()
                step.append(tuple(sorted(tuple(ids[a:b]) for a, b in zip(cu[:-1], cu[1:]))))
        out.append(sorted(step))
    return out


def test_same_slots_same_packs_whatever_the_split(dataset):
    a = packs_per_step(dataset, world=2, accum=2)
    assert a == packs_per_step(dataset, world=4, accum=1) == packs_per_step(dataset, world=1, accum=4)


def test_every_conversation_once_per_epoch_and_packs_fit(dataset):
    plan = PackPlan(dataset, 2048, world_size=2, rank=1, grad_accum=3, seed=3, filler_token=0)
    seen = []
    for rank in range(2):
        p = PackPlan(dataset, 2048, world_size=2, rank=rank, grad_accum=3, seed=3, filler_token=0)
        for step in p.steps(0):
            assert len(step) == 3
            for micro in step:
                assert micro["input_ids"].numel() <= 2048
                seen.append(micro)
    total = sum(int((m["label_weights"] >= 0).sum()) for m in seen)
    fillers = sum(1 for m in seen if m["input_ids"].numel() == 1 and m["label_weights"].sum() == 0)
    assert total - fillers == int(dataset.lengths.sum())
    assert 0.5 < plan.packing_efficiency(0) <= 1.0
