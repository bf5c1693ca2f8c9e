"""Packs per step: the split of a step's slots into ranks and micro-steps never changes which packs it trains."""
import pytest
import torch

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


def test_a_sequence_parallel_group_shares_the_packs_of_one_slot(dataset):
    """4 ranks in 2 groups of 2 (1024 tokens per rank) train the packs of 2 ranks without sequence parallelism
    (2048 per rank): each group's ranks hold the halves of the same pack."""
    plans = [PackPlan(dataset, 1024, world_size=4, rank=r, grad_accum=1, seed=3, filler_token=0, sequence_parallel=2)
             for r in range(4)]
    plain = [PackPlan(dataset, 2048, world_size=2, rank=r, grad_accum=1, seed=3, filler_token=0) for r in range(2)]
    assert plans[0].slots == plain[0].slots == 2 and plans[0].steps_in_epoch(1) == plain[0].steps_in_epoch(1)
    for s in (0, 3):
        shards = [next(iter(p.steps(1, s)))[0] for p in plans]
        for group in range(2):
            whole = next(iter(plain[group].steps(1, s)))[0]
            first, second = shards[2 * group], shards[2 * group + 1]
            ids = torch.cat([first["input_ids"], second["input_ids"]])
            assert torch.equal(ids[:len(whole["input_ids"])], whole["input_ids"])
            assert len(first["input_ids"]) == len(second["input_ids"]) <= 1024
            assert torch.equal(first["cu_seqlens"][:len(whole["cu_seqlens"])], whole["cu_seqlens"])
