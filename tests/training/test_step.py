"""train_step's loss of an expert model: weighted CE over the step's weight sum plus coef x the token-weighted mean of
the packs' load-balancing losses, over micro-steps (one process, a stand-in for DeepSpeed's engine)."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ochat.training.collate import collate_for_rank
from ochat.training.step import expert_load, train_step
from tests.helpers.models import assert_close, make_pair
from tests.model.test_moe import MOE


class Engine:
    """What train_step uses of DeepSpeed's engine, on one rank: backward divides by the micro-steps, as DeepSpeed's."""

    def __init__(self, model, micro_steps):
        self.module, self.micro_steps = model, micro_steps
        self.device, self.skipped_steps = torch.device("cpu"), 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss):
        (loss / self.micro_steps).backward()

    def step(self):
        pass

    def get_lr(self):
        return [0.0]

    def get_global_grad_norm(self):
        return None


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_expert_models_step_loss_is_weighted_ce_plus_token_weighted_aux(one_rank):
    cfg, model, _ = make_pair("qwen3_moe", variants=MOE)
    g = torch.Generator().manual_seed(5)
    packs = [[(torch.randint(0, cfg.vocab_size, (n,), generator=g).int().numpy(),
               torch.rand(n, generator=g).numpy()) for n in lengths] for lengths in ([9, 30], [17], [])]
    batches = [collate_for_rank(p, filler_token=0) for p in packs]  # the empty pack: one filler token, no real one
    assert [b["real_tokens"] for b in batches] == [39, 17, 0]
    stats = train_step(Engine(model, len(batches)), batches, average_ranks=1)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    ce, aux, w = 0.0, 0.0, sum(b["label_weights"].sum() for b in batches)
    for b in batches:
        out = model(b["input_ids"], b["position_ids"], b["cu_seqlens"], b["max_seqlen"], labels=b["labels"],
                    label_weights=b["label_weights"], real_tokens=b["real_tokens"])
        logits = model(b["input_ids"], b["position_ids"], b["cu_seqlens"], b["max_seqlen"])
        ce = ce + (b["label_weights"] * F.cross_entropy(logits, b["labels"], reduction="none")).sum()
        aux = aux + out.aux_loss  # coef x n_p x aux_p
    (ce / w + aux / 56).backward()
    for n, p in model.named_parameters():
        assert_close(got[n], p.grad, what=n)  # within 1e-5 of the largest element
    assert stats.loss == pytest.approx((ce / w).item(), rel=1e-5)
    assert stats.aux_loss == pytest.approx(aux.item() / 56, rel=1e-5) and stats.aux_loss > 0
    assert 1.0 <= stats.expert_load <= cfg.num_experts / cfg.num_experts_per_tok
    assert expert_load(torch.tensor([[2.0, 2.0], [4.0, 0.0]])) == 2.0
