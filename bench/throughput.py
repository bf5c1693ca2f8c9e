"""Side-by-side training throughput: ochat vs transformers baselines, one process, one GPU.

    python bench/throughput.py --out $OUT            # full run (1.1B Llama shape, bf16)
    python bench/throughput.py --configs ochat,ochat_fa2,hf_liger,hf_liger_fa4 --long --pack-tokens 32768 \
        --conversations 80 --tag _long --out $OUT    # conversations of 8k-32k tokens
    python bench/throughput.py --tiny --steps 2      # smoke test of the harness (CPU or GPU, tiny model)
    python bench/throughput.py --shape 8b --configs ochat,hf_liger_fa4 --ckpt on,selective,selective-attention \
        --out $OUT                                   # recompute modes: full layers, selective, against the peer's

Same conversations for every configuration: heavy-tailed synthetic lengths (log-normal, capped at
4,096, about half of each conversation a weight-1 target) plus the bundled ShareGPT sample tokenized by
ochat.data; packed into 16k-token packs by the multipack sampler; one optimizer step per pack.
Configurations (activation checkpointing on and off for each; --ckpt adds ochat's selective modes and auto, which
are compared with the peers' every-layer checkpointing):
  ochat          PackedCausalLM, defaults: FlashAttention-4 where installed, else torch varlen_attn (FA2);
                 with `ablations`, each fused kernel switched off (checkpointing off)
  ochat_fa2      PackedCausalLM on torch varlen_attn (FA2), when FlashAttention-4 is what `ochat` runs
  ochat_compile  `ochat` with each decoder layer compiled (torch.compile, the trainer's --compile)
  ochat_fp8      `ochat` with the decoder layers' linear layers in float8 (torchao, tensorwise, each compiled)
  ochat_fp8_compile  `ochat_fp8` with each decoder layer compiled whole instead
  hf_padded      LlamaForCausalLM, SDPA, the pack's conversations padded to the longest, split into
                 micro-batches of <= pack tokens (gradient accumulation, same optimizer step)
  hf_flex        packed row, restarting position_ids, flex_attention with a document BlockMask
                 (isolation checked on the spot, with and without the explicit mask)
  hf_varlen      packed row, torch varlen_attn registered through AttentionInterface, cu_seq_lens_q/k
                 and max_length_q/k passed to the model forward (TRL padding-free style)
  hf_liger       hf_varlen + Liger kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy): the strongest peer
  hf_liger_fa4   hf_liger with FlashAttention-4 through the attention interface (when installed)
ochat's best configuration is compared with the best peer at each checkpointing setting.
All: bf16 parameters, fused torch AdamW (lr 1e-5), real (non-padding) tokens counted. MFU = model FLOPs
(ModelConfig.flops_per_token: 6 x matmul params per token + causal attention) / the GPU's peak
(ochat.training.metrics.PEAK_FLOPS: 790 TFLOP/s on H100/H200, measured), and against the 989 TFLOP/s datasheet
figure that peers quote.
Writes throughput.json and throughput.md into --out.
"""
import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shapes import SHAPES  # noqa: E402

from ochat.assets import LLAMA2_TOKENIZER, SHAREGPT_SAMPLE  # noqa: E402
from ochat.model.config import ModelConfig  # noqa: E402
from ochat.model.fp8 import FP8_TOKEN_MULTIPLE  # noqa: E402
from ochat.training.metrics import PEAK_FLOPS, step_flops  # noqa: E402

PEAK = PEAK_FLOPS["H100"]  # the H100 and H200 share it
DATASHEET_PEAK = 989e12  # H100/H200 bf16 dense, the figure peers quote MFU against


# ----------------------------------------------------------------------------- data
def make_conversations(n_synth, vocab, cap, seed=0):
    """List of (tokens int32, weights float32): heavy-tailed synthetic + the bundled sample."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=6.3, sigma=1.0, size=n_synth), 16, cap).astype(np.int64)
    convs = []
    for n in lengths:
        toks = rng.integers(3, vocab, size=n, dtype=np.int32)
        w = np.zeros(n, np.float32)
        w[int(n * rng.uniform(0.3, 0.7)):] = 1.0  # answer: the second part
        convs.append((toks, w))
    sample = 0
    try:
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([sys.executable, "-m", "ochat.data.generate_dataset", "--model-type", "openchat_v3.2",
                            "--tokenizer", str(LLAMA2_TOKENIZER), "--in-files", str(SHAREGPT_SAMPLE), "--out-dir", d],
                           check=True, capture_output=True, cwd=ROOT)
            from ochat.data import open_dataset

            ds = open_dataset(d)
            for i in range(len(ds)):
                t, w = ds[i]
                convs.append((np.minimum(np.array(t), vocab - 1).astype(np.int32), np.array(w, np.float32)))
                sample += 1
    except Exception as e:  # noqa: BLE001
        print(f"[data] bundled sample not tokenized ({type(e).__name__}: {e}); synthetic only")
    return convs, sample


def make_long_conversations(n, vocab, low=8192, high=32768, seed=0):
    """Long conversations (uniform lengths in [low, high]), where attention dominates; half of each a target."""
    rng = np.random.default_rng(seed)
    convs = []
    for length in rng.integers(low, high + 1, n):
        w = np.zeros(length, np.float32)
        w[length // 2:] = 1.0
        convs.append((rng.integers(3, vocab, size=length, dtype=np.int32), w))
    return convs, 0


def make_packs(convs, pack_tokens, steps, seed=0):
    lengths = np.array([len(t) for t, _ in convs])
    try:
        from ochat.training.multipack_sampler import MultipackDistributedBatchSampler

        sampler = MultipackDistributedBatchSampler(lengths=lengths, batch_max_length=pack_tokens, num_replicas=1,
                                                   rank=0, seed=seed)
        sampler.set_epoch(0)
        packs = [b for b in sampler if len(b)]
    except Exception as e:  # noqa: BLE001
        print(f"[data] multipack sampler unavailable ({e}); greedy packing")
        packs, cur, tot = [], [], 0
        for i in np.random.default_rng(seed).permutation(len(convs)):
            if tot + lengths[i] > pack_tokens and cur:
                packs.append(cur)
                cur, tot = [], 0
            cur.append(int(i))
            tot += lengths[i]
    return [[convs[i] for i in p] for p in packs[:steps]]


def collate(items, token_multiple=1):
    """A pack collated as the trainer does (padded with weight-0 filler to a multiple of `token_multiple` tokens)."""
    from ochat.training.collate import collate_for_rank

    return collate_for_rank(items, 0, token_multiple=token_multiple)


def model_flops(config: ModelConfig, packs) -> float:
    """Training FLOPs of the packs (lists of (tokens, weights) conversations)."""
    return step_flops(config, sum(len(t) for p in packs for t, _ in p), sum(len(t) ** 2 for p in packs for t, _ in p))


# ----------------------------------------------------------------------------- transformers baselines
def _hf_attention(backend):
    """A transformers attention-interface function running `backend` (ochat.kernels.attention's dispatch of the
    FlashAttention kernels) over the packed row's cu_seq_lens; query [1, Hq, T, D]."""
    from ochat.kernels.attention import varlen_attention

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
        out = varlen_attention(q, k, v, kwargs["cu_seq_lens_q"].int(), kwargs["max_length_q"], backend=backend,
                               scale=scaling)
        return out.unsqueeze(0), None
    return attention


HF_ATTENTION = {"ochat_varlen": "torch_varlen", "ochat_fa4": "flash_attn_4", "ochat_sdpa": "sdpa"}  # name -> kernel


def _register_varlen():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    for name, backend in HF_ATTENTION.items():
        AttentionInterface.register(name, _hf_attention(backend))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, flash_attention_mask)


def _apply_liger():
    """Liger kernels on transformers' Llama (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy), what axolotl and
    LLaMA-Factory users switch on. It patches the Llama classes for the whole process: run it after the plain
    transformers configurations."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True)


def build_hf(config: ModelConfig, attn, device, ckpt):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**config.to_hf_config(), attn_implementation=attn)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.config.use_cache = False
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _doc_block_mask(cu, total, device):
    from torch.nn.attention.flex_attention import create_block_mask

    doc = torch.zeros(total, dtype=torch.int32, device=device)
    doc[cu[1:-1].long()] = 1
    doc = doc.cumsum(0)

    def mask_mod(b, h, q, kv):
        return (doc[q] == doc[kv]) & (q >= kv)

    return create_block_mask(mask_mod, None, None, total, total, device=device)


def hf_labels(b):
    """ochat's shifted labels/weights of a collated pack -> transformers' unshifted labels (-100 = ignore)."""
    lab = torch.where(b["label_weights"] > 0, b["labels"], torch.full_like(b["labels"], -100))
    out = torch.full_like(lab, -100)  # transformers shifts labels itself: label at t is the token at t
    out[1:] = lab[:-1]
    return out


def hf_varlen_loss(model, b, device):
    """Mean CE of transformers on one collated pack as a packed row, varlen attention (TRL padding-free style)."""
    cu = b["cu_seqlens"].to(device, non_blocking=True)
    out = model(input_ids=b["input_ids"][None].to(device), position_ids=b["position_ids"][None].to(device),
                labels=hf_labels(b)[None].to(device), cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                max_length_q=b["max_seqlen"], max_length_k=b["max_seqlen"])
    return out.loss


def hf_step_fn(kind, model, device, pack_tokens):
    """Returns step(items) -> runs forward+backward of one pack (may be several micro-batches)."""

    if kind == "padded":
        def step(items):
            items = sorted(items, key=lambda x: -len(x[0]))
            n_targets = sum(int((w[1:] > 0).sum()) for _, w in items)
            groups, cur = [], []
            for it in items:  # longest first: padded size = len(cur[0]) * count
                if cur and len(cur[0][0]) * (len(cur) + 1) > pack_tokens:
                    groups.append(cur)
                    cur = []
                cur.append(it)
            groups.append(cur)
            for g in groups:
                lmax = len(g[0][0])
                ids = torch.zeros(len(g), lmax, dtype=torch.long)
                mask = torch.zeros(len(g), lmax, dtype=torch.long)
                lab = torch.full((len(g), lmax), -100, dtype=torch.long)
                for r, (t, w) in enumerate(g):
                    t = torch.from_numpy(np.asarray(t, np.int64))
                    ids[r, :len(t)] = t
                    mask[r, :len(t)] = 1
                    lab[r, :len(t)] = torch.where(torch.from_numpy(np.asarray(w)) > 0, t, torch.full_like(t, -100))
                nt = int((lab[:, 1:] != -100).sum())
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=lab.to(device))
                (out.loss * (nt / max(n_targets, 1))).backward()
        return step

    if kind == "varlen":
        return lambda items: hf_varlen_loss(model, collate(items), device).backward()

    def step(items):  # flex: a fixed-length row (no recompiles), padded with a separate dummy document
        b = collate(items)
        ids, pos, lab = b["input_ids"], b["position_ids"], hf_labels(b)
        pad = pack_tokens - len(ids)
        cu = b["cu_seqlens"].long()
        if pad > 0:
            ids = torch.cat([ids, torch.zeros(pad, dtype=torch.long)])
            pos = torch.cat([pos, torch.arange(pad)])
            lab = torch.cat([lab, torch.full((pad,), -100, dtype=torch.long)])
            cu = torch.cat([cu, torch.tensor([pack_tokens])])
        mask = _doc_block_mask(cu.to(device), len(ids), device)
        out = model(input_ids=ids[None].to(device), position_ids=pos[None].to(device), labels=lab[None].to(device),
                    attention_mask=mask)
        out.loss.backward()
    return step


def check_isolation(kind, model, device, config: ModelConfig):
    """Max abs change of the second packed conversation's logits when the first conversation changes.

    Isolated attention gives 0 (same shapes, same kernels, deterministic forward); a leak gives
    differences of the order of the logits. Flex rows are padded to 256 tokens with a dummy document.
    """
    g = torch.Generator().manual_seed(1)
    v = config.vocab_size
    a1, a2 = torch.randint(3, v, (100,), generator=g), torch.randint(3, v, (100,), generator=g)
    b = torch.randint(3, v, (80,), generator=g)
    total = 256 if kind == "flex" else 180
    pos = torch.cat([torch.arange(100), torch.arange(80), torch.arange(total - 180)])[None].to(device)
    cu = torch.tensor([0, 100, 180] + ([total] if total > 180 else []), dtype=torch.int32, device=device)
    pad = torch.zeros(total - 180, dtype=torch.long)

    def logits_b(a, mode):
        ids = torch.cat([a, b, pad])[None].to(device)
        kw = {}
        if mode == "block_mask":
            kw["attention_mask"] = _doc_block_mask(cu.long(), total, device)
        elif mode == "varlen":
            kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=100, max_length_k=100)
        return model(input_ids=ids, position_ids=pos, **kw).logits[0, 100:180].float()

    res = {}
    modes = ["position_ids_only", "block_mask"] if kind == "flex" else ["varlen"]
    with torch.no_grad():
        for mode in modes:
            try:
                x1, x2 = logits_b(a1, mode), logits_b(a2, mode)
                res[mode] = (x1 - x2).abs().max().item()
                res["logit_scale"] = x1.abs().max().item()
            except Exception as e:  # noqa: BLE001
                res[mode] = f"check failed: {type(e).__name__}: {str(e)[:120]}"
    return res


# ----------------------------------------------------------------------------- ochat
def ochat_variants(attn: str, kernel: str, fa4: bool) -> dict[str, tuple]:
    """The ochat configurations: name -> (attention backend, its label, fp8 recipe or None, layers compiled)."""
    variants = {"ochat": (attn, kernel, None, False), "ochat_compile": (attn, kernel, None, True),
                "ochat_fp8": (attn, kernel, "tensorwise", False), "ochat_fp8_compile": (attn, kernel, "tensorwise", True)}
    if fa4:  # `ochat` runs FlashAttention-4: FA2 is a configuration of its own
        variants["ochat_fa2"] = ("torch_varlen", "fa2", None, False)
    return variants


def build_ochat(config: ModelConfig, device, ckpt, attn_impl="auto", fp8=None, compile_layers=False):
    from ochat.model import ModelTransforms, PackedCausalLM, apply_transforms

    torch.manual_seed(0)
    with torch.device(device):
        model = PackedCausalLM(config, attn_impl=attn_impl).to(torch.bfloat16)
    # True = every layer; a float = that fraction; "selective", "selective-attention" ("auto": ochat_step_fn decides)
    recompute = ckpt if isinstance(ckpt, str) else float(ckpt or 0.0)
    apply_transforms(model, ModelTransforms(fp8=fp8, compile=compile_layers, recompute=recompute),
                     emulate_fp8=device != "cuda")
    model.train()
    return model


def ochat_loss_sums(model, b, device):
    """ochat's LossSums on one collated pack (loss only on target rows)."""
    d = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}
    return model(d["input_ids"], d["position_ids"], d["cu_seqlens"], d["max_seqlen"], labels=d["labels"],
                 label_weights=d["label_weights"], target_index=d["target_index"])


def ochat_step_fn(model, device, token_multiple=1, auto_recompute_tokens=None):
    """step(items): forward and backward of one pack; with `auto_recompute_tokens` (the pack size) the trainer's
    `--gradient-checkpointing auto` picks the layers to recompute after the second step."""
    from ochat.model.recompute import AutoRecompute

    auto = AutoRecompute(model, auto_recompute_tokens, torch.device(device)) if auto_recompute_tokens else None

    def step(items):
        sums = ochat_loss_sums(model, collate(items, token_multiple), device)
        (sums.weighted_loss / sums.weight.clamp_min(1.0)).backward()
        if auto:
            auto.after_step()
    return step


# ----------------------------------------------------------------------------- harness
def run_config(name, build, make_step, packs, warmup, device, config: ModelConfig, flops=None):
    """Build, warm up and time one configuration: AdamW over its trainable parameters, one step per pack; peak
    memory from after the build (a transient float32 copy while building is not training's). `flops(config,
    packs, model)`: the FLOPs MFU counts (default: model_flops, full fine-tuning's)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    model = build()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=(device == "cuda"))
    step = make_step(model)

    def one(items):
        step(items)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for items in packs[:warmup]:
        one(items)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for items in packs[warmup:]:
        one(items)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    timed = packs[warmup:]
    tokens = sum(len(t) for p in timed for t, _ in p)
    res = dict(name=name, steps=len(timed), tokens=tokens, seconds=dt, tokens_per_s=tokens / dt,
               mfu=(flops(config, timed, model) if flops else model_flops(config, timed)) / dt / PEAK,
               peak_gb=(torch.cuda.max_memory_allocated() / 2**30) if device == "cuda" else None)
    print(f"[run] {name:28s} {res['tokens_per_s']:9.0f} tok/s  MFU {100 * res['mfu']:5.1f}%  "
          f"peak {res['peak_gb'] or 0:6.1f} GB  ({dt:.1f} s)", flush=True)
    return res, model, opt, one


def free(*objs):
    for o in objs:
        del o
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def loss_memory(device, n=32768, h=2048, v=32002):
    """Peak extra memory of loss forward+backward: reference (full logits) vs fused, bf16."""
    from ochat.kernels import linear_cross_entropy as lce

    out = {}
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    weight = (torch.randn(v, h, device=device, dtype=torch.bfloat16, generator=g) / h**0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    w = (torch.rand(n, device=device, generator=g) > 0.5).float()
    for name, fn in (("reference", lce.weighted_linear_cross_entropy_reference),
                     ("fused", lce.weighted_linear_cross_entropy_fused)):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        s = fn(hidden, weight, labels, w)
        s.weighted_loss.backward()
        torch.cuda.synchronize()
        out[name] = dict(peak_extra_gb=(torch.cuda.max_memory_allocated() - base) / 2**30,
                         seconds=time.perf_counter() - t0, loss=s.weighted_loss.item())
        del s
    out["ratio"] = out["fused"]["peak_extra_gb"] / out["reference"]["peak_extra_gb"]
    print(f"[loss-mem] 32k x 32k bf16: reference {out['reference']['peak_extra_gb']:.2f} GB, fused "
          f"{out['fused']['peak_extra_gb']:.2f} GB (ratio {out['ratio']:.3f})", flush=True)
    return out


def results_table(first_column, rows, tokens_key):
    """Markdown table lines: tokens/s, MFU, peak memory and ochat's speed ratio per configuration.

    rows: (name, result, ochat_result) triples; a result holds `tokens_key`, "mfu" and "peak_gb", or
    "error"; ochat_result is the ochat run this row is compared against (None: no ratio)."""
    lines = [f"| {first_column} | tokens/s/GPU | MFU (790) | MFU (989) | peak GB | ochat / this |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r, mine in rows:
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} | | | | |")
            continue
        ratio = f"{mine[tokens_key] / r[tokens_key]:.2f}x" if mine else "-"
        lines.append(f"| {name} | {r[tokens_key]:.0f} | {100 * r['mfu']:.1f}% | {100 * r['mfu'] * PEAK / DATASHEET_PEAK:.1f}% | "
                     f"{r['peak_gb'] or 0:.1f} | {ratio} |")
    return lines


CKPT = {"off": False, "on": True, "selective": "selective", "selective-attention": "selective-attention",
        "auto": "auto"}  # --ckpt's settings
CKPT_TAG = {False: "no-ckpt", True: "ckpt", "selective": "ckpt selective",
            "selective-attention": "ckpt selective-attention", "auto": "ckpt auto"}
CONFIGS = ("ochat", "ochat_fa2", "ochat_compile", "ochat_fp8", "ochat_fp8_compile", "hf_varlen", "hf_flex", "hf_padded", "hf_liger", "hf_liger_fa4", "ablations")
PEERS = ("hf_varlen", "hf_flex", "hf_padded", "hf_liger", "hf_liger_fa4")
_HF = {"hf_varlen": ("ochat_varlen", "varlen"), "hf_flex": ("flex_attention", "flex"), "hf_padded": ("sdpa", "padded"),
       "hf_liger": ("ochat_varlen", "varlen"), "hf_liger_fa4": ("ochat_fa4", "varlen")}

# kernel name patterns of the profile's categories, tried in this order (the rest is "other")
PROFILE_CATEGORIES = (("attention", r"flash|fmha|attn|varlen"), ("loss", r"cross_entropy|_ce_|lce|logsumexp"),
                      ("compiled elementwise (norms, RoPE, GLU, adds)", r"^triton_(poi|red|per)_"),
                      ("optimizer", r"adam|multi_tensor|foreach|_fused_"),
                      ("norms/rope/activations", r"rms|norm|rope|rotary|swiglu|glu|silu|gelu"),
                      ("GEMMs", r"gemm|xmma|cutlass|nvjet|matmul|sm90|wgmma|ampere_bf16|cublas"))


def profile_categories(prof, wall_seconds: float) -> dict[str, float]:
    """GPU time by category (seconds) of a torch.profiler run's kernels, and the idle rest of `wall_seconds`.
    Only kernel events count: an operator's device time is its kernels' again."""
    out = {name: 0.0 for name, _ in PROFILE_CATEGORIES} | {"other": 0.0}
    for event in prof.key_averages():
        seconds = event.self_device_time_total / 1e6
        if event.device_type != torch.autograd.DeviceType.CUDA or seconds <= 0:
            continue
        name = event.key.lower()
        category = next((c for c, pattern in PROFILE_CATEGORIES if re.search(pattern, name)), "other")
        out[category] += seconds
    out["idle"] = max(wall_seconds - sum(out.values()), 0.0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per configuration")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--pack-tokens", type=int, default=16384)
    ap.add_argument("--conversations", type=int, default=1500)
    ap.add_argument("--configs", default="ochat,hf_varlen,hf_flex,hf_padded,ablations",
                    help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--ckpt", default="off,on", help="activation checkpointing settings to run, of off, on (every "
                    "layer), selective, selective-attention and auto (ochat only: the trainer's "
                    "--gradient-checkpointing of that name; compared with the peers' on)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--long", action="store_true", help="conversations of 8k-32k tokens (attention dominates)")
    ap.add_argument("--tiny", action="store_true", help="tiny model (harness smoke test): --shape tiny")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table and GPU time by category, one ochat step")
    ap.add_argument("--loss-memory", action="store_true", help="measure the fused loss's peak memory")
    ap.add_argument("--tag", default="", help="suffix of the output files (throughput{tag}.md/json)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = ap.parse_args()
    cfgs = args.configs.split(",")
    if set(args.ckpt.split(",")) - set(CKPT):
        ap.error(f"--ckpt takes {', '.join(CKPT)}")
    if set(cfgs) - set(CONFIGS):
        ap.error(f"unknown configs {set(cfgs) - set(CONFIGS)}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = SHAPES["tiny" if args.tiny else args.shape]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import transformers

    from ochat.kernels.attention import available

    info = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                transformers=transformers.__version__,
                device=torch.cuda.get_device_name() if device == "cuda" else "cpu", config=config.to_hf_config(),
                pack_tokens=args.pack_tokens, steps=args.steps, warmup=args.warmup, long=args.long,
                flash_attn_4=available("flash_attn_4", device))
    print(json.dumps(info), flush=True)
    if args.long:
        convs, n_sample = make_long_conversations(args.conversations, config.vocab_size)
    else:
        convs, n_sample = make_conversations(args.conversations, config.vocab_size, 4096)
    packs = make_packs(convs, args.pack_tokens, args.steps + args.warmup)
    timed = packs[args.warmup:]
    lens = [len(t) for p in timed for t, _ in p]
    info.update(conversations=len(convs), sample_conversations=n_sample, timed_tokens=sum(lens),
                timed_conversations=len(lens), mean_len=float(np.mean(lens)), max_len=int(max(lens)),
                tokens_per_pack=float(sum(lens) / len(timed)))
    print(f"[data] {len(convs)} conversations ({n_sample} from the sample), timed: {len(timed)} packs, "
          f"{sum(lens)} tokens, mean len {np.mean(lens):.0f}, max {max(lens)}", flush=True)

    if any(c.startswith("hf_") for c in cfgs):
        _register_varlen()
    from ochat.kernels.fused import set_fused

    ochat_attn = "flash_attn_4" if info["flash_attn_4"] else "auto"  # auto: torch varlen_attn (FA2) on a GPU
    ochat_kernel = "fa4" if info["flash_attn_4"] else "fa2" if device == "cuda" else "sdpa"
    runs = []  # (name, ckpt, build, make_step, kernel switched off or None, isolation kind or None)
    for ckpt in [CKPT[c] for c in args.ckpt.split(",")]:
        tag = CKPT_TAG[ckpt]
        for key, (attn, kernel, fp8, compiled) in ochat_variants(ochat_attn, ochat_kernel, info["flash_attn_4"]).items():
            if key in cfgs:
                label = ", ".join([kernel] + (["compiled"] if compiled else []) + ([f"fp8 {fp8}"] if fp8 else []))
                runs.append((f"ochat ({label}) {tag}", ckpt,
                             lambda c=ckpt, a=attn, f=fp8, cl=compiled: build_ochat(config, device, c, a, f, cl),
                             lambda m, f=fp8, c=ckpt: ochat_step_fn(m, device, FP8_TOKEN_MULTIPLE if f else 1,
                                                                    args.pack_tokens if c == "auto" else None),
                             None, None))
        if "ablations" in cfgs and not ckpt:
            for k in ("linear_ce", "rms_norm", "rope", "swiglu"):
                runs.append((f"ochat -{k} {tag}", ckpt, lambda c=ckpt: build_ochat(config, device, c, ochat_attn),
                             lambda m: ochat_step_fn(m, device), k, None))
        for key in PEERS:
            if key in cfgs and not isinstance(ckpt, str) and not (key == "hf_liger_fa4" and not info["flash_attn_4"]):
                attn, kind = _HF[key]
                runs.append((f"{key} {tag}", ckpt, lambda a=attn, c=ckpt: build_hf(config, a, device, c),
                             lambda m, k=kind: hf_step_fn(k, m, device, args.pack_tokens), None, kind))
    runs.sort(key=lambda r: r[0].startswith("hf_liger"))  # Liger patches transformers for the rest of the process

    results, extra, liger = [], {}, False
    for name, ckpt, build, make_step, off, kind in runs:
        if off:
            set_fused(off, False)
        try:
            if name.startswith("hf_liger") and not liger:
                _apply_liger()
                liger = True
            res, model, opt, one = run_config(name, build, make_step, packs, args.warmup, device, config)
            res["ckpt"] = ckpt
            if kind in ("varlen", "flex") and not ckpt:
                res["isolation"] = check_isolation(kind, model, device, config)
                print(f"[isolation] {name}: {res['isolation']}", flush=True)
            if args.profile and name.startswith("ochat (") and not ckpt and device == "cuda":
                slug = re.sub(r"[^a-z0-9]+", "_", name.removesuffix(" no-ckpt")).strip("_")
                extra.setdefault("profiles", {})[name] = profile_step(one, packs[-1], out_dir, f"{args.tag}_{slug}")
            results.append(res)
            free(model, opt, one)
            del model, opt, one
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            print(f"[run] {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            results.append(dict(name=name, ckpt=ckpt, error=f"{type(e).__name__}: {str(e)[:300]}"))
        finally:
            if off:
                set_fused(off, True)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()

    if args.loss_memory and device == "cuda":
        try:
            extra["loss_memory"] = loss_memory(device)
        except Exception as e:  # noqa: BLE001
            extra["loss_memory"] = dict(error=str(e)[:300])
            print(f"[loss-mem] FAILED {e}", flush=True)

    md = "\n".join(report_lines(info, results, extra, len(timed), args))
    print(md, flush=True)
    (out_dir / f"throughput{args.tag}.md").write_text(md + "\n")
    (out_dir / f"throughput{args.tag}.json").write_text(json.dumps(dict(info=info, results=results, **extra), indent=1))


def profile_step(one, items, out_dir: Path, tag: str) -> dict:
    """torch.profiler over one step: the top kernels (written to profile{tag}.txt) and GPU time by category."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        one(items)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
    (out_dir / f"profile{tag}.txt").write_text(table)
    categories = profile_categories(prof, wall)
    print("[profile] " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in categories.items()), flush=True)
    return dict(wall_seconds=wall, seconds_by_category=categories)


def report_lines(info: dict, results: list, extra: dict, steps: int, args) -> list[str]:
    """The markdown report: one table per run, ochat's ratio to each configuration and to the best peer."""
    ok = [r for r in results if "tokens_per_s" in r]

    def best(prefix, ckpt):  # bf16 runs only: fp8 has its own comparison with ochat's bf16
        rows = [r for r in ok if r["name"].startswith(prefix) and r["ckpt"] == ckpt and "fp8" not in r["name"]]
        return max(rows, key=lambda r: r["tokens_per_s"], default=None)

    lines = [f"# Throughput ({info['device']}, {info['date']}, torch {info['torch']}, transformers {info['transformers']})",
             "", f"{info['timed_conversations']} conversations in {steps} packs of <= {args.pack_tokens} tokens "
             f"({info['timed_tokens']} real tokens, mean length {info['mean_len']:.0f}, max {info['max_len']}); "
             f"{args.warmup} warm-up steps; FlashAttention-4 {'available' if info['flash_attn_4'] else 'absent'}.", "",
             *results_table("configuration", [(r["name"], r, best("ochat (", r.get("ckpt"))) for r in results],
                            tokens_key="tokens_per_s")]
    for ckpt in [c for c in CKPT.values() if c in {r["ckpt"] for r in ok}]:
        peer_ckpt = True if isinstance(ckpt, str) else ckpt  # the peers have no auto or selective: every layer
        mine, peer = best("ochat (", ckpt), max((r for r in ok if r["ckpt"] == peer_ckpt and r["name"].startswith("hf_")),
                                               key=lambda r: r["tokens_per_s"], default=None)
        if mine and peer:
            lines.append(f"\nActivation checkpointing {CKPT_TAG[ckpt]}: {mine['name']} "
                         f"{mine['tokens_per_s']:.0f} tokens/s vs the best peer, {peer['name']} {peer['tokens_per_s']:.0f}: "
                         f"{mine['tokens_per_s'] / peer['tokens_per_s']:.2f}x")
    for name, profile in extra.get("profiles", {}).items():
        cats, total = profile["seconds_by_category"], profile["wall_seconds"]
        lines += ["", f"GPU time of one step of {name} by category: " + ", ".join(
            f"{k} {100 * v / total:.0f}%" for k, v in sorted(cats.items(), key=lambda kv: -kv[1]))]
    if "loss_memory" in extra and "ratio" in extra["loss_memory"]:
        lm = extra["loss_memory"]
        lines += ["", f"Loss of 32k tokens x 32k vocab (bf16, fwd+bwd): reference {lm['reference']['peak_extra_gb']:.2f} GB "
                  f"({lm['reference']['seconds']:.2f} s), fused {lm['fused']['peak_extra_gb']:.2f} GB "
                  f"({lm['fused']['seconds']:.2f} s): ratio {lm['ratio']:.3f}"]
    return lines


if __name__ == "__main__":
    main()
