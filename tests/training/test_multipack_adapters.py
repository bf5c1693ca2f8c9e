"""Tests of ochat.training.multipack_adapters: the torch Sampler subclass, and the Hugging Face
Trainer / TRL SFTTrainer hook, with real Trainers on a tiny random Llama (CPU): on one rank in this
process, and on two gloo ranks (torch.distributed.run runs this file as the worker).

What a rank trained is read back from the inputs of each training step (the padding-free row is
split where position_ids restart, each sequence looked up by its token ids), so a pack that the
Trainer never trains, or trains twice, shows up.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/training/test_multipack_adapters.py OUT trainer sft
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ochat.training.multipack_adapters import HFMultipackBatchSampler, MultipackBatchSampler
from ochat.training.multipack_sampler import MultipackDistributedBatchSampler

ROOT = Path(__file__).resolve().parents[2]
HAS_TRL = importlib.util.find_spec("trl") is not None
needs_trl = pytest.mark.skipif(not HAS_TRL, reason="trl is not installed (pip install trl)")
BUDGET, EPOCHS, GRAD_ACCUM, SEED, VOCAB = 96, 2, 2, 7, 64


# ----------------------------------------------------------------------------- the samplers alone


def test_torch_sampler_is_a_torch_sampler_with_the_same_plan():
    L = np.random.default_rng(0).integers(1, 300, 500)
    s = MultipackBatchSampler(1024, L, num_replicas=3, rank=1, seed=2)
    assert isinstance(s, torch.utils.data.Sampler)
    plain = MultipackDistributedBatchSampler(1024, L, num_replicas=3, rank=1, seed=2)
    assert [b.tolist() for b in s] == [b.tolist() for b in plain]
    loader = torch.utils.data.DataLoader([list(range(n)) for n in L], batch_sampler=s, collate_fn=lambda b: b)
    assert [sum(len(x) for x in b) for b in loader] == [int(L[b].sum()) for b in plain.generate_batches()]


def test_hf_sampler_has_the_same_steps_every_epoch_and_no_empty_pack():
    rng = np.random.default_rng(0)
    L = np.clip(np.exp(rng.normal(np.log(8192 / 6), 1.0, 5000)), 1, 8192).astype(np.int64)
    plain = MultipackDistributedBatchSampler(8192, L, num_replicas=2, rank=0)
    counts = []
    for e in range(6):
        plain.set_epoch(e)
        counts.append(plain.num_batches())
    assert len(set(counts)) > 1  # the plain plans differ by a step between epochs: the case being fixed
    samplers = [HFMultipackBatchSampler(8192, L, num_replicas=2, rank=r, epochs=6) for r in range(2)]
    assert samplers[0].steps_per_epoch == max(counts)
    for e in range(6):
        per_rank = []
        for s in samplers:
            s.set_epoch(e)
            assert len(s) == max(counts)
            per_rank.append(list(s))
            assert all(isinstance(b, list) and b and int(L[b].sum()) <= 8192 for b in per_rank[-1])
        assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(len(L)))
    longer = next(e for e in range(6) if counts[e] > counts[0])
    s = HFMultipackBatchSampler(8192, L, num_replicas=2, rank=0, epochs=1)  # sized for epoch 0 only
    s.set_epoch(longer)
    with pytest.raises(ValueError, match=f"pass epochs > {longer}"):
        len(s)


def test_hf_sampler_small_datasets_fill_every_pack_or_say_why():
    rng = np.random.default_rng(1)
    for _ in range(60):
        R = int(rng.integers(1, 6))
        cap = int(rng.integers(4, 40))
        L = rng.integers(1, cap + 1, int(rng.integers(1, 25)))
        samplers = [HFMultipackBatchSampler(cap, L, num_replicas=R, rank=r, epochs=2) for r in range(R)]
        steps = samplers[0].steps_per_epoch
        if len(L) < R * steps:
            with pytest.raises(ValueError, match=f"{len(L)} sequences cannot fill {R * steps} packs"):
                list(samplers[0])
            continue
        per_rank = [list(s) for s in samplers]
        for batches in per_rank:
            assert len(batches) == steps
            assert all(b and int(L[b].sum()) <= cap for b in batches)
        assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(len(L)))


def test_for_trainer_sizes_every_epoch_the_trainer_runs():
    from types import SimpleNamespace

    L = np.clip(np.exp(np.random.default_rng(2).normal(np.log(1400), 1.0, 600)), 1, 8192).astype(np.int64)
    dataset = [{"input_ids": [0] * int(n)} for n in L]
    for max_steps, num_train_epochs, grad_accum in ((-1, 2.5, 1), (37, 3.0, 2)):
        args = SimpleNamespace(data_seed=None, seed=3, max_steps=max_steps, num_train_epochs=num_train_epochs,
                               world_size=2, process_index=1, gradient_accumulation_steps=grad_accum)
        s = HFMultipackBatchSampler.for_trainer(SimpleNamespace(args=args, train_dataset=dataset), 32768)
        assert (s.batch_max_length, s.num_replicas, s.rank, s.seed) == (32768, 2, 1, 3)
        assert s.lengths.tolist() == L.tolist()
        updates = -(-len(s) // grad_accum)  # the Trainer's count of epochs, from len() of epoch 0
        trainer_epochs = -(-max_steps // updates) if max_steps > 0 else 3
        assert trainer_epochs > 1
        for e in range(trainer_epochs):
            s.set_epoch(e)
            assert len(s) == s.steps_per_epoch


# ----------------------------------------------------------------------------- real Trainers


def _dataset():
    """Sequences of 3..40 random token ids, all different (a trained sequence is found by its ids)."""
    import datasets

    rng = np.random.default_rng(SEED)
    ids = [rng.integers(3, VOCAB, int(n)).tolist() for n in rng.integers(3, 41, 48)]
    assert len({tuple(x) for x in ids}) == len(ids)
    return datasets.Dataset.from_dict({"input_ids": ids})


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))


def _recording(trainer_class):
    """trainer_class trained on multipack packs (the documented override), recording each
    training step's sequences as dataset indices."""

    class Recording(trainer_class):
        trained: list

        def _get_train_sampler(self, train_dataset=None):
            return HFMultipackBatchSampler.for_trainer(self, batch_max_length=BUDGET, train_dataset=train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            ids = inputs["input_ids"][0].tolist()
            starts = np.flatnonzero(inputs["position_ids"][0].numpy() == 0).tolist() + [len(ids)]
            self.trained.append([self.index_of[tuple(ids[a:b])] for a, b in zip(starts, starts[1:])])
            return super().training_step(model, inputs, num_items_in_batch)

    return Recording


def train_and_record(kind: str, out_dir: str) -> dict:
    """Train 2 epochs with `kind` ("trainer": transformers.Trainer with DataCollatorWithFlattening;
    "sft": trl.SFTTrainer(padding_free=True)); returns this rank's lengths and trained packs."""
    common = dict(output_dir=out_dir, num_train_epochs=EPOCHS, gradient_accumulation_steps=GRAD_ACCUM, seed=SEED,
                  use_cpu=True, report_to=[], save_strategy="no", logging_steps=1000, disable_tqdm=True)
    if kind == "trainer":
        from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

        trainer = _recording(Trainer)(model=_model(), args=TrainingArguments(**common), train_dataset=_dataset(),
                                      data_collator=DataCollatorWithFlattening())
    else:
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast
        from trl import SFTConfig, SFTTrainer

        vocab = {f"t{i}": i for i in range(VOCAB)}
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                            pad_token="t1", eos_token="t2")
        trainer = _recording(SFTTrainer)(model=_model(), args=SFTConfig(padding_free=True, max_length=None, **common),
                                         train_dataset=_dataset(), processing_class=tokenizer)
    ids = [list(x) for x in trainer.train_dataset["input_ids"]]  # as the Trainer prepared them
    trainer.index_of = {tuple(x): i for i, x in enumerate(ids)}
    trainer.trained = []
    trainer.train()
    return {"lengths": [len(x) for x in ids], "trained": trainer.trained}


def _check_every_pack_trained_once(ranks: list[dict]):
    R = len(ranks)
    lengths = ranks[0]["lengths"]
    n_steps = None
    for r, res in enumerate(ranks):
        assert res["lengths"] == lengths
        s = HFMultipackBatchSampler(BUDGET, lengths, num_replicas=R, rank=r, seed=SEED, epochs=EPOCHS)
        planned = []
        for e in range(EPOCHS):
            s.set_epoch(e)
            planned += list(s)
        assert res["trained"] == planned  # this rank trained its packs, in order, each once
        n_steps = s.steps_per_epoch
    assert n_steps * R >= 8  # several packs per epoch and rank
    for e in range(EPOCHS):  # every sequence once per epoch, over the ranks
        epoch = [i for res in ranks for pack in res["trained"][e * n_steps:(e + 1) * n_steps] for i in pack]
        assert sorted(epoch) == list(range(len(lengths)))


def test_trainer_trains_every_pack_once(tmp_path):
    _check_every_pack_trained_once([train_and_record("trainer", str(tmp_path))])


@needs_trl
def test_sft_trainer_padding_free_trains_every_pack_once(tmp_path):
    _check_every_pack_trained_once([train_and_record("sft", str(tmp_path))])


@pytest.mark.slow
def test_two_gloo_ranks_train_every_pack_once(tmp_path):
    kinds = ["trainer", "sft"] if HAS_TRL else ["trainer"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        __file__, str(tmp_path), *kinds], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for kind in kinds:
        _check_every_pack_trained_once([json.loads((tmp_path / f"{kind}.{rank}.json").read_text())
                                        for rank in range(2)])


if __name__ == "__main__":  # the worker of test_two_gloo_ranks_train_every_pack_once
    out = sys.argv[1]
    for kind in sys.argv[2:]:
        result = train_and_record(kind, os.path.join(out, kind))
        Path(out, f"{kind}.{os.environ['RANK']}.json").write_text(json.dumps(result))
