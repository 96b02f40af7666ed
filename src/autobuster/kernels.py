"""A Triton kernel for the one decode-step operation no installed library does in one pass: a Qwen3.5 Gated
DeltaNet layer's recurrent-state update. The fp32 states are most of the bytes a 4B decode step moves (6.6 GB of
its ~16 GB at 8 x 8 rows), and a torch step needs five passes over them: 0.4-0.7 ms per layer at 4B shapes on an H200,
where reading and writing a state once takes 0.06 ms; this kernel takes 0.09 ms (BENCHMARKS.md). fla's fused kernel
returns a new state, which the cache then copies back. Here each program holds a [key dim, BV] tile of one row's
state and head in registers: read once, updated, written in place once."""
import torch
import triton
import triton.language as tl


@triton.jit
def _delta_rule_step_kernel(state, q, k, v, g, beta, out, heads, group, scale,
                            KD: tl.constexpr, VD: tl.constexpr, BV: tl.constexpr):
    rh = tl.program_id(0)  # row * heads + value head
    qk_at = (rh // heads * (heads // group) + rh % heads // group) * KD + tl.arange(0, KD)  # its key head
    qv = tl.load(q + qk_at).to(tl.float32)
    kv = tl.load(k + qk_at).to(tl.float32)
    qv = qv * tl.rsqrt(tl.sum(qv * qv, 0) + 1e-6) * scale  # l2-normed, as Qwen3.5's layers ask
    kv = kv * tl.rsqrt(tl.sum(kv * kv, 0) + 1e-6)
    cols = tl.program_id(1) * BV + tl.arange(0, BV)
    at = rh * KD * VD + tl.arange(0, KD)[:, None] * VD + cols[None, :]
    s = tl.exp(tl.load(g + rh)) * tl.load(state + at)  # the decayed state
    delta = (tl.load(v + rh * VD + cols).to(tl.float32) - tl.sum(s * kv[:, None], 0)) * tl.load(beta + rh).to(
        tl.float32)
    s += kv[:, None] * delta[None, :]
    tl.store(state + at, s)
    tl.store(out + rh * VD + cols, tl.sum(s * qv[:, None], 0).to(out.dtype.element_ty))


def delta_rule_step(query, key, value, g, beta, initial_state, **kwargs):
    """One decode token of the gated delta rule, the state [rows, value heads, key dim, value dim] (fp32,
    contiguous, dims powers of two) updated in place: the arguments and results of transformers'
    `torch_recurrent_gated_delta_rule` for one token with use_qk_l2norm_in_kernel. q and k [rows, 1, key heads,
    key dim], v [rows, 1, value heads, value dim], g and beta [rows, 1, value heads]."""
    state = initial_state
    rows, heads, kd, vd = state.shape
    out = torch.empty_like(value)
    bv = min(vd, 32)
    _delta_rule_step_kernel[(rows * heads, vd // bv)](
        state, query.contiguous(), key.contiguous(), value.contiguous(), g.float().contiguous(), beta.contiguous(),
        out, heads, heads // query.shape[2], kd ** -0.5, KD=kd, VD=vd, BV=bv)
    return out, state
