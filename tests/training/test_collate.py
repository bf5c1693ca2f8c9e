import numpy as np
import torch

from ochat.training.collate import collate_pack


def _conv(tokens, weights):
    return np.asarray(tokens, np.int32), np.asarray(weights, np.float32)


def test_collate_worked_example():
    b = collate_pack([_conv([10, 11, 12], [0, 1, 1]), _conv([20, 21], [0, 0.5])])
    assert b["input_ids"].tolist() == [10, 11, 12, 20, 21]
    assert b["position_ids"].tolist() == [0, 1, 2, 0, 1]
    assert b["cu_seqlens"].dtype == torch.int32 and b["cu_seqlens"].tolist() == [0, 3, 5]
    assert b["max_seqlen"] == 3
    assert b["labels"].tolist()[:2] == [11, 12] and b["labels"][3].item() == 21
    assert b["label_weights"].tolist() == [1, 1, 0, 0.5, 0]
    assert b["target_index"].tolist() == [0, 1, 3]


def test_no_target_crosses_a_boundary():
    rng = np.random.default_rng(0)
    items = [_conv(rng.integers(0, 100, n), rng.random(n)) for n in rng.integers(1, 20, 12)]
    b = collate_pack(items)
    cu = b["cu_seqlens"].tolist()
    for end in cu[1:]:
        assert b["label_weights"][end - 1] == 0  # the last token of a conversation predicts nothing
    assert (b["position_ids"][torch.tensor(cu[:-1], dtype=torch.long)] == 0).all()


def test_empty_pack():
    b = collate_pack([])
    assert b["input_ids"].numel() == 0 and b["cu_seqlens"].numel() == 0 and b["max_seqlen"] == 0
    assert b["target_index"].numel() == 0
