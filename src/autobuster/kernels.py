"""Triton kernels for the decode-step operations no installed library does in one pass.

A Qwen3.5 Gated DeltaNet layer's recurrent-state update (`delta_rule_step`). The fp32 states are most of the bytes a
4B decode step moves (6.6 GB of its ~16 GB at 8 x 8 rows), and a torch step needs five passes over them: 0.4-0.7 ms
per layer at 4B shapes on an H200, where reading and writing a state once takes 0.06 ms; this kernel takes 0.09 ms
(BENCHMARKS.md). fla's fused kernel returns a new state, which the cache then copies back. Here each program holds a
[key dim, BV] tile of one row's state and head in registers: read once, updated, written in place once.

Shared-prompt (cascade) attention (`cascade_decode`): each prompt's keys read once for its G rows, each row's own
completion only as far as it has come (a CUDA graph's static shapes would otherwise read the whole buffer), this
step's key and value written on the way, the parts merged exactly; two kernels per layer where torch takes six.
"""
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


@triton.jit
def _softmax_block(sc, vt, m_i, l_i, acc):
    """Online softmax: fold one block of base-2 scores [M, BN] and its values [BN, BD] into (max, sum, output)."""
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    w = tl.exp2(sc - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    return m_new, l_i * alpha + tl.sum(w, 1), acc * alpha[:, None] + tl.dot(w.to(vt.dtype), vt)


@triton.jit
def _store_part(part_o, part_ml, rh, live, s, splits, m_i, l_i, acc, BD: tl.constexpr):
    """Slot s of rows x heads `rh`, of `splits` each."""
    d = tl.arange(0, BD)
    tl.store(part_o + (rh[:, None] * splits + s) * BD + d[None, :], acc, mask=live[:, None])
    tl.store(part_ml + (rh * splits + s) * 2, m_i, mask=live)
    tl.store(part_ml + (rh * splits + s) * 2 + 1, l_i, mask=live)


@triton.jit
def _prompt_part(q, prompt_k, prompt_v, prompt_bias, part_o, part_ml, scale, sq_row, sq_head, p, h, s, kv_heads,
                 chunks, piece, GROUP: tl.constexpr, PER: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                 M: tl.constexpr, BN: tl.constexpr):
    """Piece s of prompt p against the G x PER queries of its rows for kv head h: slot s."""
    d, i = tl.arange(0, BD), tl.arange(0, M)
    row, head, live = p * GROUP + i // PER, h * PER + i % PER, i < GROUP * PER
    qt = tl.load(q + row[:, None] * sq_row + head[:, None] * sq_head + d[None, :],
                 mask=live[:, None] & (d[None, :] < D), other=0.0)
    m_i, l_i, acc = tl.full([M], float("-inf"), tl.float32), tl.zeros([M], tl.float32), tl.zeros([M, BD], tl.float32)
    first = (p * chunks + s) * kv_heads + h  # [prompts x chunks, kv heads, piece, D]
    for start in range(0, piece, BN):
        n = start + tl.arange(0, BN)
        at, inside = (first * piece + n[:, None]) * D + d[None, :], (n < piece)[:, None] & (d[None, :] < D)
        kt = tl.load(prompt_k + at, mask=inside, other=0.0)
        vt = tl.load(prompt_v + at, mask=inside, other=0.0)
        bias = tl.load(prompt_bias + (p * chunks + s) * piece + n, mask=n < piece, other=0.0).to(tl.float32)
        sc = tl.dot(qt, tl.trans(kt)) * scale + tl.maximum(bias, -1e30)[None, :] * 1.4426950408889634
        m_i, l_i, acc = _softmax_block(tl.where((n < piece)[None, :], sc, float("-inf")), vt, m_i, l_i, acc)
    _store_part(part_o, part_ml, row * (kv_heads * PER) + head, live, s, chunks + 1, m_i, l_i, acc, BD)


@triton.jit
def _own_part(q, new_k, new_v, own_k, own_v, pos, part_o, part_ml, scale, sq_row, sq_head, sk_row, sk_head, sv_row,
              sv_head, row, h, kv_heads, chunks, room, PER: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
              M: tl.constexpr, BN: tl.constexpr):
    """Row `row`'s PER queries of kv head h against its own completion up to `pos`, this step's key and value
    written to the cache here: slot `chunks`."""
    d, i = tl.arange(0, BD), tl.arange(0, M)
    head, live = h * PER + i, i < PER
    qt = tl.load(q + row * sq_row + head[:, None] * sq_head + d[None, :],
                 mask=live[:, None] & (d[None, :] < D), other=0.0)
    t = tl.load(pos).to(tl.int32)
    kn = tl.load(new_k + row * sk_row + h * sk_head + d, mask=d < D, other=0.0)
    vn = tl.load(new_v + row * sv_row + h * sv_head + d, mask=d < D, other=0.0)
    first = (row * kv_heads + h) * room  # [rows, kv heads, room, D]
    tl.store(own_k + (first + t) * D + d, kn, mask=d < D)
    tl.store(own_v + (first + t) * D + d, vn, mask=d < D)
    m_i, l_i, acc = tl.full([M], float("-inf"), tl.float32), tl.zeros([M], tl.float32), tl.zeros([M, BD], tl.float32)
    for start in range(0, t + 1, BN):  # keys before t from the cache, the one at t as this step gives it
        n = start + tl.arange(0, BN)
        at, inside = (first + n[:, None]) * D + d[None, :], (n < t)[:, None] & (d[None, :] < D)
        kt = tl.where((n == t)[:, None], kn[None, :], tl.load(own_k + at, mask=inside, other=0.0))
        vt = tl.where((n == t)[:, None], vn[None, :], tl.load(own_v + at, mask=inside, other=0.0))
        sc = tl.where((n <= t)[None, :], tl.dot(qt, tl.trans(kt)) * scale, float("-inf"))
        m_i, l_i, acc = _softmax_block(sc, vt, m_i, l_i, acc)
    _store_part(part_o, part_ml, row * (kv_heads * PER) + head, live, chunks, chunks + 1, m_i, l_i, acc, BD)


@triton.jit
def _cascade_parts_kernel(q, new_k, new_v, prompt_k, prompt_v, prompt_bias, own_k, own_v, pos, part_o, part_ml,
                          scale, sq_row, sq_head, sk_row, sk_head, sv_row, sv_head, kv_heads, chunks, piece, room,
                          GROUP: tl.constexpr, PER: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                          MP: tl.constexpr, MC: tl.constexpr, BN: tl.constexpr):
    """One program per (prompt, kv head) and split: splits 0..chunks-1 are the pieces of the prompt, each read
    once for the whole group; split chunks + j is the group's row j's own completion. Each stores its unnormalised
    output and (max, sum) in base 2 in its (row, head)'s slot of the parts."""
    p, h, s = tl.program_id(0) // kv_heads, tl.program_id(0) % kv_heads, tl.program_id(1)
    scale = scale * 1.4426950408889634  # scores in base 2
    if s < chunks:
        _prompt_part(q, prompt_k, prompt_v, prompt_bias, part_o, part_ml, scale, sq_row, sq_head, p, h, s, kv_heads,
                     chunks, piece, GROUP, PER, D, BD, MP, BN)
    else:
        _own_part(q, new_k, new_v, own_k, own_v, pos, part_o, part_ml, scale, sq_row, sq_head, sk_row, sk_head,
                  sv_row, sv_head, p * GROUP + s - chunks, h, kv_heads, chunks, room, PER, D, BD, MC, BN)


@triton.jit
def _cascade_merge_kernel(part_o, part_ml, out, splits, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr):
    """A (row, head)'s attention over all its splits: sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s."""
    rh = tl.program_id(0)
    s, d = tl.arange(0, BS), tl.arange(0, BD)
    m = tl.load(part_ml + (rh * splits + s) * 2, mask=s < splits, other=float("-inf"))
    total = tl.load(part_ml + (rh * splits + s) * 2 + 1, mask=s < splits, other=0.0)
    w = tl.exp2(m - tl.max(m, 0))
    acc = tl.load(part_o + (rh * splits + s[:, None]) * BD + d[None, :], mask=(s < splits)[:, None], other=0.0)
    o = tl.sum(w[:, None] * acc, 0) / tl.sum(w * total, 0)
    tl.store(out + rh * D + d, o.to(out.dtype.element_ty), mask=d < D)


def cascade_parts(rows: int, heads: int, splits: int, dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The scratch `cascade_decode` keeps its partial results in: allocated once, outside the CUDA graph."""
    bd = triton.next_power_of_2(dim)
    return (torch.empty(rows * heads * splits * bd, dtype=torch.float32, device=device),
            torch.empty(rows * heads * splits * 2, dtype=torch.float32, device=device))


def cascade_decode(query, key, value, prompt_keys, prompt_values, prompt_bias, own_keys, own_values, pos, parts,
                   chunks, scale):
    """A decode step's shared-prompt attention in two kernels (`engine._cascade_attention` does the same in torch):
    this step's key and value written at `pos` of the rows' own buffers, each row's queries against its prompt's
    pieces (once per group) and against its completion so far, the parts merged exactly. query [rows, heads, 1, D],
    key and value [rows, kv heads, 1, D] (last dim contiguous); prompt pieces [prompts x chunks, kv heads, piece,
    D] and their additive bias [prompts x chunks, piece]; own buffers [rows, kv heads, room, D]; `parts` from
    `cascade_parts(rows, heads, chunks + 1, D)`. Returns [rows, 1, heads, D]."""
    rows, heads, _, dim = query.shape
    pieces, kv, piece, _ = prompt_keys.shape
    prompts = pieces // chunks
    group, per, bd = rows // prompts, heads // kv, triton.next_power_of_2(dim)
    assert query.stride(3) == key.stride(3) == value.stride(3) == 1
    part_o, part_ml = parts
    _cascade_parts_kernel[(prompts * kv, chunks + group)](
        query, key, value, prompt_keys, prompt_values, prompt_bias, own_keys, own_values, pos, part_o, part_ml,
        scale, query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1), kv,
        chunks, piece, own_keys.shape[2], GROUP=group, PER=per, D=dim, BD=bd,
        MP=max(16, triton.next_power_of_2(group * per)), MC=max(16, triton.next_power_of_2(per)),
        BN=32 if bd > 128 else 64)  # tl.dot wants 16 rows at least; the block sizes measured best on an H200
    out = query.new_empty(rows, 1, heads, dim)
    _cascade_merge_kernel[(rows * heads,)](part_o, part_ml, out, chunks + 1, D=dim, BD=bd,
                                           BS=triton.next_power_of_2(chunks + 1))
    return out
