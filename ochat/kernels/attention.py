"""Variable-length causal attention over packed conversations (no attention across boundaries).

Backends, by name:
- "flash_attn_4": FlashAttention-4 (`pip install flash-attn-4`: `flash_attn.cute.flash_attn_varlen_func`, CuTe DSL
  kernels compiled at first use of a shape; Hopper (SM90) and newer; sliding windows, softmax scale, soft-capping,
  GQA without repeating k/v; attention sinks through `learnable_sink` where its backward has them too: flash-attn-4
  4.0.0b26 and newer, on SM90 / SM100 / SM110).
- "flash_attn": `flash_attn.flash_attn_varlen_func` (flash-attn 2, when installed; sliding windows, softmax scale,
  and attention-logit soft-capping from flash-attn 2.6).
- "torch_varlen": `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA; FlashAttention kernels
  inside torch; causal is `window_size=(-1, 0)`; sliding windows through window_size=(W-1, 0); no soft-capping).
- "sdpa": per-conversation `scaled_dot_product_attention`, runs anywhere (the CPU reference); a sliding
  window becomes an explicit boolean mask; soft-capping and sinks compute the scores explicitly (eager, per
  conversation: memory quadratic in the conversation's length), except sinks on a GPU: one more key there
  (`sdpa_with_sink_key`, SDPA's memory-efficient kernel).
"auto" picks the first available in that order for the device; the choice is logged once.

Variants a model may need: `scale` (the softmax scale; None = 1/sqrt(head_dim); Gemma's
`query_pre_attn_scalar ** -0.5`), `softcap` (Gemma 2: scores become `softcap * tanh(scores / softcap)` before the
mask and softmax), `window`, `sinks` (gpt-oss: a learned logit per query head [Hq], a tensor with a gradient, added
as one more term to every softmax denominator and attending to nothing: p_j = exp(s_j) / (sum_i exp(s_i) +
exp(sink))). A backend that cannot run a model's variant is skipped for that model, in favour of the next backend in
the order above that can, and the reason is logged once (`resolve_backend(..., softcap=True)`).

Shapes: q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int32 [B+1]; returns [T, Hq, D].
`window` is Hugging Face's `sliding_window`: a token sees itself and the `window - 1` tokens before it.
"""
import inspect
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("flash_attn_4", "flash_attn", "torch_varlen", "sdpa")
_logged: set = set()

try:
    from flash_attn import flash_attn_varlen_func as _fa_varlen
    _FA_PARAMS = set(inspect.signature(_fa_varlen).parameters)
except Exception:  # not installed or broken build
    _fa_varlen = None
    _FA_PARAMS = set()

_LAZY = {}  # kernels imported at their first use (None: not installed or cannot load here)


def _lazy(name: str, load):
    if name not in _LAZY:
        try:
            _LAZY[name] = load()
        except Exception:  # not installed, or cannot load on this machine
            _LAZY[name] = None
    return _LAZY[name]


def _fa4_varlen():
    """FlashAttention-4's varlen function (its CuTe DSL loads at import)."""
    def load():
        from flash_attn.cute import flash_attn_varlen_func
        return flash_attn_varlen_func
    return _lazy("flash_attn_4", load)


def _fa4_sinks() -> bool:
    """Whether this FlashAttention-4 trains attention sinks: its backward takes `learnable_sink` (4.0.0b26+; older
    releases ran sinks forward only and returned no gradient for them) and the GPU is SM90, SM100 or SM110."""
    def load():  # once per process: attention asks at every call
        from flash_attn.cute import interface
        return ("learnable_sink" in inspect.signature(interface._flash_attn_bwd).parameters
                and torch.cuda.get_device_capability()[0] in (9, 10, 11))
    return bool(_lazy("flash_attn_4_sinks", load))


def _torch_varlen():
    """torch's varlen_attn: imported only where it can run (its import pulls in torch._dynamo, seconds)."""
    def load():
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn
    return _lazy("torch_varlen", load)


def _tv_params() -> set[str]:
    fn = _torch_varlen()
    return set(inspect.signature(fn).parameters) if fn is not None else set()


def available(name: str, device) -> bool:
    dev = torch.device(device).type
    if name == "flash_attn_4":
        return dev == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9 and _fa4_varlen() is not None
    if name == "flash_attn":
        return _fa_varlen is not None and dev == "cuda"
    if name == "torch_varlen":
        return dev == "cuda" and _torch_varlen() is not None
    if name == "sdpa":
        return True
    raise ValueError(f"unknown attention backend {name!r} (one of {BACKENDS} or 'auto')")


def unsupported(name: str, *, softcap: bool = False, window: bool = False, scale: bool = False,
                sinks: bool = False) -> str | None:
    """Why backend `name` cannot run attention with soft-capping / a sliding window / a non-default softmax scale /
    attention sinks (None when it can)."""
    if sinks and name in ("flash_attn", "torch_varlen"):
        return f"{name} has no attention sinks"
    if sinks and name == "flash_attn_4" and not _fa4_sinks():
        return "this flash-attn-4 or GPU has no attention-sink backward (flash-attn-4 >= 4.0.0b26, SM90/SM100/SM110)"
    if name == "flash_attn" and softcap and "softcap" not in _FA_PARAMS:
        return "this flash-attn has no softcap (flash-attn >= 2.6 has)"
    if name == "torch_varlen":
        if softcap:
            return "torch's varlen_attn has no attention-logit soft-capping"
        if window and "window_size" not in _tv_params():
            return "this torch's varlen_attn has no window_size: sliding windows unsupported"
        if scale and "scale" not in _tv_params():
            return "this torch's varlen_attn has no scale argument"
    return None


def _log_once(key, msg, *args):
    if key not in _logged:
        _logged.add(key)
        log.info(msg, *args)


def resolve_backend(name: str, device, *, softcap: bool = False, window: bool = False, scale: bool = False,
                    sinks: bool = False) -> str:
    """The backend `name` means on `device` ("auto": the fastest available); errors if unavailable.

    `softcap`, `window`, `scale`, `sinks`: the variants the model needs. A backend that cannot run them is replaced by
    the next one in BACKENDS that can (sdpa always can), logging the reason once.
    """
    dev = torch.device(device)
    if name == "auto":
        candidates = [b for b in BACKENDS if available(b, dev)]
    else:
        if not available(name, dev):
            raise RuntimeError(f"attention backend {name!r} is not available on {dev} (flash_attn_4: "
                               f"{_fa4_varlen() is not None}, flash_attn: {_fa_varlen is not None}, torch varlen_attn: "
                               f"{_torch_varlen() is not None}; flash_attn_4 needs an SM90+ GPU)")
        candidates = [b for b in BACKENDS[BACKENDS.index(name):] if available(b, dev)]
    for chosen in candidates:
        reason = unsupported(chosen, softcap=softcap, window=window, scale=scale, sinks=sinks)
        if reason is None:
            break
        _log_once(("skip", chosen, reason), "attention backend %s cannot run this model (%s): trying the next", chosen,
                  reason)
    _log_once((name, dev.type, chosen), "attention backend %r -> %s on %s", name, chosen, dev.type)
    return chosen


def sdpa_with_sink_key(qi, ki, vi, mask, scale, sinks):
    """Attention with sinks through SDPA's memory-efficient kernels (what the `sdpa` backend runs on a GPU, where
    the explicit scores would hold [H, L, L] floats per conversation): the sink becomes one more key that every
    query sees, with a value of zeros. q gains a feature 1, the real keys a feature 0 and the sink key the feature
    sink / scale (and zeros elsewhere), so the sink's score is the head's sink and every other score is unchanged;
    8 extra features keep the head size a multiple of 8. qi/ki/vi [H, L, D], mask [L, L] (True: attends)."""
    h, n, d = qi.shape
    pad = 8
    zeros = qi.new_zeros(h, n, pad)
    qa = torch.cat([qi, zeros[..., :1] + 1, zeros[..., 1:]], dim=-1)
    sink_key = torch.cat([qi.new_zeros(h, 1, d), (sinks.float() / scale).to(qi.dtype)[:, None, None],
                          qi.new_zeros(h, 1, pad - 1)], dim=-1)
    ka = torch.cat([sink_key, torch.cat([ki, zeros], dim=-1)], dim=1)  # [H, L + 1, D + 8]
    va = torch.cat([vi.new_zeros(h, 1, d + pad), torch.cat([vi, zeros], dim=-1)], dim=1)
    m = torch.cat([mask.new_ones(n, 1), mask], dim=1)
    return F.scaled_dot_product_attention(qa, ka, va, attn_mask=m, scale=scale)[..., :d]


def varlen_attention_sdpa(q, k, v, cu_seqlens, max_seqlen=None, window=None, scale=None, softcap=None, sinks=None):
    """Reference: SDPA per conversation (GQA by repeating k/v).

    With `softcap` or `sinks` the scores are computed explicitly (as transformers' eager attention does),
    soft-capped, masked, given each head's sink as one more column, softmaxed in float32, and the sink's column
    dropped; on a GPU, sinks without soft-capping go through `sdpa_with_sink_key` instead (the same numbers, memory
    linear in the conversation's length)."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    bounds = cu_seqlens.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (x[s:e].transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        mask = None
        if window is not None or softcap is not None or sinks is not None:
            i = torch.arange(e - s, device=q.device)
            diff = i[:, None] - i[None, :]
            mask = (diff >= 0) if window is None else (diff >= 0) & (diff < window)
        if softcap is None and sinks is None:
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=mask is None, scale=scale)
        elif softcap is None and q.is_cuda:
            o = sdpa_with_sink_key(qi, ki, vi, mask, d ** -0.5 if scale is None else scale, sinks)
        else:
            scores = (qi @ ki.transpose(1, 2)) * (d ** -0.5 if scale is None else scale)  # [H, L, L]
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            scores = scores.masked_fill(~mask, float("-inf"))
            if sinks is not None:  # [H, L, L + 1]: the sink's logit last in every row
                scores = torch.cat([scores, sinks.to(scores.dtype)[:, None, None].expand(-1, e - s, 1)], dim=-1)
            probs = scores.softmax(-1, dtype=torch.float32)[..., :e - s].to(q.dtype)
            o = probs @ vi
        outs.append(o.transpose(0, 1))
    if not outs:
        return q.new_empty(q.shape)
    return torch.cat(outs, 0)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, window=None, backend="auto", scale=None, softcap=None,
                     sinks=None):
    """Causal attention within each packed conversation; see the module docstring. `backend` is a name that
    `resolve_backend` returned (the model resolves once per device), or "auto" to resolve here."""
    if sinks is not None and tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(f"attention sinks of shape {list(sinks.shape)} for {q.shape[1]} query heads")
    needs = dict(softcap=softcap is not None, window=window is not None, scale=scale is not None,
                 sinks=sinks is not None)
    name = resolve_backend(backend, q.device, **needs) if backend == "auto" else backend
    reason = unsupported(name, **needs)
    if reason is not None:
        raise NotImplementedError(f"attention backend {name!r}: {reason}")
    if name == "flash_attn_4":
        kw = {} if sinks is None else {"learnable_sink": sinks}
        out = _fa4_varlen()(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                            max_seqlen_k=max_seqlen, softmax_scale=scale, causal=True,
                            window_size=(None, None) if window is None else (window - 1, 0), softcap=softcap or 0.0,
                            **kw)
        return out[0] if isinstance(out, tuple) else out  # (out, lse) in some releases
    if name == "flash_attn":
        ws = (-1, -1) if window is None else (window - 1, 0)
        kw = {} if softcap is None else {"softcap": softcap}
        return _fa_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True, window_size=ws,
                          softmax_scale=scale, **kw)
    if name == "torch_varlen":
        hq, hkv = q.shape[1], k.shape[1]
        if hq != hkv and not _torch_varlen_gqa():
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
        kw = {} if scale is None else {"scale": scale}
        if "window_size" in _tv_params():
            kw["window_size"] = (-1, 0) if window is None else (window - 1, 0)
        else:
            kw["is_causal"] = True
        return _torch_varlen()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)
    return varlen_attention_sdpa(q, k, v, cu_seqlens, max_seqlen, window, scale=scale, softcap=softcap, sinks=sinks)


_GQA_OK = None


def _torch_varlen_gqa() -> bool:
    """Whether torch's varlen_attn accepts fewer k/v heads than q heads (probed once on the GPU)."""
    global _GQA_OK
    if _GQA_OK is None:
        try:
            q = torch.randn(4, 4, 64, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(4, 2, 64, device="cuda", dtype=torch.bfloat16)
            cu = torch.tensor([0, 4], dtype=torch.int32, device="cuda")
            kw = {"window_size": (-1, 0)} if "window_size" in _tv_params() else {"is_causal": True}
            out = _torch_varlen()(q, k, k, cu, cu, 4, 4, **kw)
            ref = varlen_attention_sdpa(q.float(), k.float(), k.float(), cu)
            _GQA_OK = bool((out.float() - ref).abs().max() < 0.05)
        except Exception:
            _GQA_OK = False
        log.info("torch varlen_attn native GQA: %s", _GQA_OK)
    return _GQA_OK
