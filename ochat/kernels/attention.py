"""Variable-length causal attention over packed conversations (no attention across boundaries).

Backends, by name:
- "flash_attn": `flash_attn.flash_attn_varlen_func` (flash-attn 2, when installed; sliding windows).
- "torch_varlen": `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA; FlashAttention kernels
  inside torch; causal is `window_size=(-1, 0)`; sliding windows through window_size=(W-1, 0)).
- "sdpa": per-conversation `scaled_dot_product_attention`, runs anywhere (the CPU reference); a sliding
  window becomes an explicit boolean mask.
"auto" picks the first available in that order for the device; the choice is logged once.

Shapes: q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int32 [B+1]; returns [T, Hq, D].
`window` is Hugging Face's `sliding_window`: a token sees itself and the `window - 1` tokens before it.
"""
import inspect
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("flash_attn", "torch_varlen", "sdpa")
_logged: set = set()

try:
    from flash_attn import flash_attn_varlen_func as _fa_varlen
except Exception:  # not installed or broken build
    _fa_varlen = None

try:
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen
    _TV_PARAMS = set(inspect.signature(_torch_varlen).parameters)
except Exception:
    _torch_varlen = None
    _TV_PARAMS = set()


def available(name: str, device) -> bool:
    dev = torch.device(device).type
    if name == "flash_attn":
        return _fa_varlen is not None and dev == "cuda"
    if name == "torch_varlen":
        return _torch_varlen is not None and dev == "cuda"
    if name == "sdpa":
        return True
    raise ValueError(f"unknown attention backend {name!r} (one of {BACKENDS} or 'auto')")


def resolve_backend(name: str, device) -> str:
    """The backend `name` means on `device` ("auto": the fastest available); errors if unavailable."""
    if name == "auto":
        chosen = next(b for b in BACKENDS if available(b, device))
    else:
        if not available(name, device):
            raise RuntimeError(f"attention backend {name!r} is not available on {torch.device(device)} "
                               f"(flash_attn installed: {_fa_varlen is not None}, torch varlen_attn: {_torch_varlen is not None})")
        chosen = name
    key = (name, torch.device(device).type, chosen)
    if key not in _logged:
        _logged.add(key)
        log.info("attention backend %r -> %s on %s", name, chosen, torch.device(device).type)
    return chosen


def varlen_attention_sdpa(q, k, v, cu_seqlens, max_seqlen=None, window=None, leak=False):
    """Reference: SDPA per conversation (GQA by repeating k/v). `leak=True` (tests only) ignores boundaries."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    bounds = cu_seqlens.tolist()
    if leak:
        bounds = [0, q.shape[0]]
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (x[s:e].transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        if window is None:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True)
        else:
            i = torch.arange(e - s, device=q.device)
            diff = i[:, None] - i[None, :]
            mask = (diff >= 0) & (diff < window)
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask)
        outs.append(o.transpose(0, 1))
    if not outs:
        return q.new_empty(q.shape)
    return torch.cat(outs, 0)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, window=None, backend="auto"):
    """Causal attention within each packed conversation; see the module docstring. `backend` is a name that
    `resolve_backend` returned (the model resolves once per device), or "auto" to resolve here."""
    name = resolve_backend(backend, q.device) if backend == "auto" else backend
    if name == "flash_attn":
        ws = (-1, -1) if window is None else (window - 1, 0)
        return _fa_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True, window_size=ws)
    if name == "torch_varlen":
        if window is not None and "window_size" not in _TV_PARAMS:
            raise NotImplementedError("this torch's varlen_attn has no window_size: sliding windows unsupported")
        hq, hkv = q.shape[1], k.shape[1]
        if hq != hkv and not _torch_varlen_gqa():
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
        ws = (-1, 0) if window is None else (window - 1, 0)
        if "window_size" in _TV_PARAMS:
            return _torch_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, window_size=ws)
        return _torch_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, is_causal=True)
    return varlen_attention_sdpa(q, k, v, cu_seqlens, max_seqlen, window)


_GQA_OK = None


def _torch_varlen_gqa() -> bool:
    """Whether torch's varlen_attn accepts fewer k/v heads than q heads (probed once on the GPU)."""
    global _GQA_OK
    if _GQA_OK is None:
        try:
            q = torch.randn(4, 4, 64, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(4, 2, 64, device="cuda", dtype=torch.bfloat16)
            cu = torch.tensor([0, 4], dtype=torch.int32, device="cuda")
            kw = {"window_size": (-1, 0)} if "window_size" in _TV_PARAMS else {"is_causal": True}
            out = _torch_varlen(q, k, k, cu, cu, 4, 4, **kw)
            ref = varlen_attention_sdpa(q.float(), k.float(), k.float(), cu)
            _GQA_OK = bool((out.float() - ref).abs().max() < 0.05)
        except Exception:
            _GQA_OK = False
        log.info("torch varlen_attn native GQA: %s", _GQA_OK)
    return _GQA_OK
