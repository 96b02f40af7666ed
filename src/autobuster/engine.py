"""The generation and log-prob engine shared by rollouts and evaluation.

Hugging Face `generate` runs the vision tower and the prompt prefill once per sample and decodes step by step in
Python. Here each video goes through the vision tower once (its windows batched), each prompt is prefilled once,
and the decode step (all layers, sampling included) is one CUDA graph on the GPU, replayed until every row has
ended. The G rows of a prompt share its KV cache (cascade attention); a Qwen3.5's linear-attention states are
copied to its rows. The update's log-probs pack each prompt once with its completions, without a mask tensor. The
model's own modules do the maths, so greedy outputs equal `generate` token for token and log-probs equal a plain
forward (tests/test_engine.py)."""
import importlib.util
import sys
from collections import Counter
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from unittest.mock import patch

import torch
import torch.nn.functional as F
from peft.helpers import disable_input_dtype_casting
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.activations import SiLUActivation

from .families import family_of_model
from .model import unwrap

EXIT_CHECK_EVERY = 16  # decode steps between checks that every row has ended (each check syncs with the GPU)


@dataclass
class Completions:
    """Rows are prompt-major: row i * num_samples + j is sample j of prompt i."""
    ids: torch.Tensor  # [rows, L] generated tokens, padded after the first end token
    mask: torch.Tensor  # [rows, L] 1 up to and including the first end token
    lengths: torch.Tensor  # [rows] valid tokens (the end token included)
    truncated: torch.Tensor  # [rows] bool: no end token within max_new_tokens
    texts: list[str]  # decoded completions, special tokens removed
    tracked: torch.Tensor | None = None  # [rows, L, len(track_ids)] raw logits of the tracked tokens
    features: dict[int, torch.Tensor] | None = None  # the vision tower's output per prompt (`video_features`): a
    # frozen tower's serve the update too, which then runs no video through it again


def end_ids(tokenizer) -> list[int]:
    """Both Qwen end tokens: <|im_end|> and <|endoftext|>."""
    return sorted({tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")})


def linear_attention_kernels(model) -> str:
    """What Gated DeltaNet layers run with: transformers' choice (each package when installed, else its slow torch
    code) for the chunked delta rule (fla) and the short convolution (causal_conv1d), and the decode step's delta
    rule (`_decode_delta_rule`). "" without such layers."""
    if "linear_attention" not in (unwrap(model).config.get_text_config().layer_types or ()):
        return ""
    step = ("triton" if _decode_delta_rule(next(unwrap(model).parameters()).device)
            else "fla" if _installed("fla") else "torch")
    return ", ".join(f"{what} {pkg if _installed(pkg) else 'torch'}"
                     for what, pkg in (("delta rule", "fla"), ("conv", "causal_conv1d"))) + f", decode step {step}"


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def banned_ids(tokenizer) -> list[int]:
    """Special tokens other than the end tokens: a sampled <|video_pad|> would break the next forward."""
    ends = set(end_ids(tokenizer))
    return sorted(set(tokenizer.all_special_ids) - ends | {i for t, i in tokenizer.get_added_vocab().items()
                                                            if i not in ends})


def completion_mask(ids: torch.Tensor, ends: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask up to and including the first end token, truncated flag)."""
    is_end = torch.isin(ids, torch.tensor(ends, device=ids.device))
    seen_before = (is_end.cumsum(1) - is_end.long()) > 0  # an end token strictly earlier in the row
    return (~seen_before).long(), ~is_end.any(1)


# ---------------------------------------------------------------- inputs


def _window_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                      cu_seq_lens_q=None, **kwargs):
    """The vision tower's attention within each window (or frame, in its full-attention blocks) as one SDPA call per
    distinct window length, where Hugging Face's sdpa path makes one call per window (1,024 windows x 28 layers for
    8 videos at 448²). q/k/v are [1, heads, tokens, dim]; cu_seq_lens_q holds the window bounds."""
    heads, tokens, dim = query.shape[1:]
    starts, lengths = cu_seq_lens_q[:-1], cu_seq_lens_q.diff()
    sizes = lengths.unique().tolist()
    if len(sizes) == 1:  # windows of one size (frame sides multiples of the window, as at 448²) tile the tokens in
        # order: views, no gather and no scatter (a tenth of a 7B tower's time, BENCHMARKS.md)
        q, k, v = (x[0].unflatten(1, (len(lengths), -1)).transpose(0, 1) for x in (query, key, value))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)  # [windows, heads, length, dim]
        return o.transpose(1, 2).reshape(1, tokens, heads, dim), None
    out = query.new_zeros(heads, tokens, dim)
    for length in sizes:
        first = starts[lengths == length]
        at = (first[:, None] + torch.arange(length, device=query.device)).flatten()
        q, k, v = (x[0, :, at].unflatten(1, (len(first), length)).transpose(0, 1) for x in (query, key, value))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)  # [windows, heads, length, dim]
        out = out.index_copy(1, at, o.transpose(0, 1).flatten(1, 2))  # out of place: the tiny tower trains
    return out.transpose(0, 1)[None], None  # [1, tokens, heads, dim], as the sdpa and flash interfaces return


WINDOWS = "autobuster_flash_windows"  # "flash" in the name: the tower then passes all window bounds in one call
AttentionInterface.register(WINDOWS, _window_attention)


@contextmanager
def attention_as(config, name: str):
    """The model parts built from `config` with their attention as `name` for a while, their own setting restored
    after (an export must not save the name)."""
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def video_features(model, batch, prompts: list[int] | None = None) -> dict[int, torch.Tensor]:
    """The vision tower's output for the videos of `prompts` (all by default): prompt index -> [tokens, hidden]."""
    prompts = list(range(len(batch["input_ids"]))) if prompts is None else prompts
    core = unwrap(model).model
    device = next(core.visual.parameters()).device
    grid = batch["video_grid_thw"].to(device)
    pixels = batch["pixel_values_videos"].to(device).split(grid.prod(-1).tolist())
    with (attention_as(core.visual.config, WINDOWS),
          _vision_kernels(core.visual, type(core.language_model.norm), family_of_model(model).norm_offset)):
        out = core.get_video_features(torch.cat([pixels[i] for i in prompts]), grid[prompts], return_dict=True)
    return dict(zip(prompts, out.pooler_output))


@contextmanager
def _forwards(patches: dict):
    """Each module of `patches` runs the function given for it for a while (an instance attribute, as peft and
    accelerate set theirs); whatever the instance had before is put back after."""
    with ExitStack() as stack:
        for m, forward in patches.items():
            stack.enter_context(patch.object(m, "forward", forward))
        yield


@contextmanager
def _vision_kernels(module, norm_kind: type | None = None, offset: float = 0.0):
    """The same sums on faster kernels for the vision tower `module`:
    - Its patch embedding, a Conv3d whose kernel is the whole of each input patch, runs as the matmul it is. On a
      CPU a tiny model's update pass (8 videos, 64 rows, forward and backward) took 152 ms with the conv, 142 ms
      with the matmul (BENCHMARKS.md).
    - Its linear layers with a width that is not a multiple of 8 (16 bytes in bf16) run with that width zero-padded
      to a multiple of 64 (weights and input; the output cut back), on cuBLAS's aligned kernels. Qwen2.5-VL's
      vision MLP is 3,420 wide: its matmuls ran on sm80 fallback kernels at 2.2-2.6 ms each, a fifth of a 7B
      rollout's prefill (BENCHMARKS.md).
    - Its RMSNorms of type `norm_kind` (Qwen2.5-VL's; Qwen3.5's tower has LayerNorms) as `_fused_rms_norms`: seven
      kernels each over 65k patches for 8 videos at 448².
    - Its SwiGLU MLPs (Qwen2.5-VL's) as `_fused_mlps`, and on a GPU its rotary embedding (both families) compiled
      into one kernel for q and k, where Hugging Face's casts both to fp32 and back around a dozen kernels: a
      quarter of a 7B tower's time (BENCHMARKS.md).
    The last four only without gradients (the frozen tower): a block checkpointed in backward would be recomputed
    after this context, as it was not run."""
    frozen = not torch.is_grad_enabled()
    odd = [m for m in module.modules() if type(m) is torch.nn.Linear and m.weight.is_floating_point()
           and (m.in_features % 8 or m.out_features % 8)] if frozen else []
    patches = [m for m in module.modules() if type(m) is torch.nn.Conv3d]
    norms = _fused_rms_norms(module, norm_kind, offset) if frozen and norm_kind else {}
    mlps = _fused_mlps(module) if frozen else {}
    code = sys.modules[type(module).__module__]
    rotary = (patch.object(code, "apply_rotary_pos_emb_vision", _compiled(code.apply_rotary_pos_emb_vision))
              if frozen and hasattr(code, "apply_rotary_pos_emb_vision") and next(module.parameters()).is_cuda
              else nullcontext())
    with (_forwards({m: partial(_padded_linear, m) for m in odd} | {m: partial(_patch_linear, m) for m in patches}
                    | norms | mlps), rotary):
        yield


def _padded_linear(m, x):
    wide, tall = (-n % 64 if n % 8 else 0 for n in (m.in_features, m.out_features))
    bias = None if m.bias is None else F.pad(m.bias, (0, tall))
    return F.linear(F.pad(x, (0, wide)), F.pad(m.weight, (0, wide, 0, tall)), bias)[..., :m.out_features]


def _patch_linear(m, x):
    if x.shape[2:] != m.kernel_size or m.padding != (0, 0, 0) or m.dilation != (1, 1, 1) or m.groups != 1:
        return type(m).forward(m, x)
    return F.linear(x.flatten(1), m.weight.flatten(1), m.bias)[..., None, None, None]


def _inputs(core, batch, features, rows=None, ids=None):
    """(embeddings, 3-D rope positions, attention mask) for `rows` of the prompt batch (all by default), with the
    video features scattered into the video tokens and optional completion `ids` appended."""
    rows = torch.arange(len(batch["input_ids"])) if rows is None else rows
    input_ids, attention, mm = (batch[k][rows] for k in ("input_ids", "attention_mask", "mm_token_type_ids"))
    if ids is not None:
        input_ids = torch.cat([input_ids, ids], 1)
        attention = torch.cat([attention, torch.ones_like(ids)], 1)
        mm = torch.cat([mm, torch.zeros_like(ids)], 1)
    embeds = core.model.get_input_embeddings()(input_ids)
    video = torch.cat([features[i] for i in rows.tolist()]).to(embeds.dtype)
    embeds = embeds.masked_scatter((input_ids == core.config.video_token_id).unsqueeze(-1), video)
    timing = {"second_per_grid_ts": batch["second_per_grid_ts"][rows]} if "second_per_grid_ts" in batch else {}
    positions, _ = core.model.get_rope_index(input_ids, mm, video_grid_thw=batch["video_grid_thw"][rows],
                                             attention_mask=attention, **timing)  # Qwen3.5: timestamps are text
    return embeds, positions, attention


# ---------------------------------------------------------------- generation


class _StaticCache:
    """Preallocated keys and values of every attention layer, [rows, kv heads, prompt + new tokens, head dim], each
    prompt's copied to its G rows; a linear-attention layer's (Qwen3.5) convolution and recurrent states likewise,
    [rows, ...]. The layers call `update` (which writes the new token at `pos`) or `update_recurrent_state` and
    update the convolution state in place: no shape changes, so one CUDA graph serves every decode step."""

    def __init__(self, prefill, attention, num_samples: int, room: int):
        self.prompt_len = attention.shape[1]
        self.pos = torch.zeros(1, dtype=torch.long, device=attention.device)
        self.keys, self.values = [], []
        self.states, self.restart = _linear_states(prefill, num_samples)
        for i, layer in enumerate(prefill.layers):
            if i in self.states:
                self.keys.append(None)
                self.values.append(None)
                continue
            for src, dst in ((layer.keys, self.keys), (layer.values, self.values)):
                b, h, p, d = src.shape
                buf = src.new_zeros(b, num_samples, h, p + room, d)
                buf[:, :, :, :p] = src[:, None]
                dst.append(buf.view(b * num_samples, h, p + room, d))
        self.mask = torch.zeros(len(attention) * num_samples, 1, 1, self.prompt_len + room, dtype=torch.bool,
                                device=attention.device)
        self.mask[:, 0, 0, :self.prompt_len] = attention.bool().repeat_interleave(num_samples, 0)
        self.state = [self.pos, self.mask]  # what a step changes but the keys, values and `states`

    def advance(self, step):
        """Before the layers of a step: the token chosen at `step` is written, and seen, at its place."""
        self.pos.copy_(step + self.prompt_len)
        self.mask.index_fill_(3, self.pos, True)

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.pos, key)
        self.values[layer_idx].index_copy_(2, self.pos, value)
        return self.keys[layer_idx], self.values[layer_idx]

    # what a Gated DeltaNet layer asks of its cache when it decodes one token
    def get_conv_state(self, layer_idx, state_idx=0):
        return self.states[layer_idx][0]

    def get_recurrent_state(self, layer_idx, state_idx=0):
        return self.states[layer_idx][1]

    def update_recurrent_state(self, state, layer_idx, state_idx=0, **kwargs):
        return self.states[layer_idx][1].copy_(state)

    def is_recording_past(self, layer_idx):
        return False


def _linear_states(prefill, num_samples: int):
    """({layer: [convolution state, recurrent state]} of the linear-attention layers (Qwen3.5's Gated DeltaNet),
    each prompt's copied to its G rows, as a recurrent state is all such a layer keeps and each row changes its own;
    a function that copies the prompts' states to the rows again, for `_graphed`: they are G times smaller to keep
    than a copy of the rows' (3.3 GB at 8 x 8 rows at 4B))."""
    prompts = {i: [x[0] for x in (layer.conv_states, layer.recurrent_states)]
               for i, layer in enumerate(prefill.layers) if hasattr(layer, "recurrent_states")}
    rows = {i: [x.repeat_interleave(num_samples, 0) for x in pair] for i, pair in prompts.items()}

    def restart():
        for i, pair in prompts.items():
            for row, prompt in zip(rows[i], pair):
                row.view(len(prompt), num_samples, *prompt.shape[1:]).copy_(prompt[:, None])
    return rows, restart


class _CascadeCache(_StaticCache):
    """The shared-prompt cache: each prompt's keys and values once and each row's own completion, [rows, kv heads,
    new tokens, head dim]. The G rows of a group share their prompt exactly, so its part of the attention is
    computed once per group (`_cascade_attention`): 8 x 8 rows at 7B read 1 GB of prompt keys and values per decode
    step instead of 8 GB. A prompt is stored in `chunks` pieces along its tokens, [prompts x chunks, kv heads,
    piece, head dim], so that the kernel has enough independent blocks to keep every SM reading (flash-decoding's
    split; 8 prompts x 4 kv heads alone would be 32 blocks on 132 SMs). The cache is its own attention mask: the
    layers hand it to the attention function, which finds the biases on it. Linear-attention layers keep their
    states per row, as in `_StaticCache`."""

    def __init__(self, prefill, attention, num_samples: int, room: int, attend, chunks: int | None = None):
        self.attend, self.pos = attend, torch.zeros(1, dtype=torch.long, device=attention.device)
        self.merge = _compiled(_merge) if attention.device.type == "cuda" else _merge  # one kernel, not ten
        self.kernels, self.parts = None, None  # `cascade_kernels`, where they apply
        self.states, self.restart = _linear_states(prefill, num_samples)
        prompts, plen = attention.shape
        first = next(x for i, x in enumerate(prefill.layers) if i not in self.states)  # an attention layer's cache
        kv, dtype = first.keys.shape[1], first.keys.dtype
        chunks, piece, room = cascade_layout(prompts, plen, kv, room, attention.device, chunks)
        self.prompts, self.chunks = prompts, chunks

        def pieces(x):  # [prompts, kv heads, plen, dim] -> [prompts x chunks, kv heads, piece, dim]
            x = F.pad(x, (0, 0, 0, chunks * piece - plen))
            return x.unflatten(2, (chunks, piece)).transpose(1, 2).flatten(0, 1).contiguous()

        self.prompt_keys, self.prompt_values, self.keys, self.values = [], [], [], []
        for i, layer in enumerate(prefill.layers):
            if i in self.states:
                for x in (self.prompt_keys, self.prompt_values, self.keys, self.values):
                    x.append(None)
                continue
            self.prompt_keys.append(pieces(layer.keys))
            self.prompt_values.append(pieces(layer.values))
            self.keys.append(layer.keys.new_zeros(prompts * num_samples, kv, room, layer.keys.shape[3]))
            self.values.append(torch.zeros_like(self.keys[-1]))
        low = torch.finfo(dtype).min  # additive biases: finite, so a piece of padding alone gives no NaN
        bias = torch.zeros(prompts, 1, plen, dtype=dtype, device=attention.device)
        padded = F.pad(bias.masked_fill(attention[:, None] == 0, low), (0, chunks * piece - plen), value=low)
        self.prompt_bias = padded.view(prompts * chunks, 1, 1, piece)
        self.bias = torch.full((1, 1, 1, room), low, dtype=bias.dtype, device=attention.device)
        self.state = [self.pos, self.bias]
        self.kernels = cascade_kernels(attention.device, dtype)

    @property
    def mask(self):  # not an attribute: a reference to itself would keep the cache (3 GB at 7B) alive after the
        return self  # rollout, until Python's cycle collector happened to run (a 7B update's peak 28.8 or 31.8 GB)

    def advance(self, step):
        self.pos.copy_(step)
        self.bias.index_fill_(3, self.pos, 0)

    def update(self, key, value, layer_idx, *args, **kwargs):
        if self.kernels is not None:  # which write this step's key and value itself
            return key, value
        keys, values = super().update(key, value, layer_idx)
        return (self.prompt_keys[layer_idx], keys), (self.prompt_values[layer_idx], values)


ALIGN = 16  # the memory-efficient kernel wants the bias rows 16-aligned


def cascade_layout(prompts: int, plen: int, kv: int, room: int, device, chunks: int | None = None):
    """(chunks, piece, room) of a `_CascadeCache`: each prompt in `chunks` pieces of `piece` tokens, each row's own
    buffer `room` tokens, both 16-aligned; chunks enough for two blocks per SM on a GPU."""
    def aligned(n):
        return -(-n // ALIGN) * ALIGN

    if chunks is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        chunks = max(1, min(plen // 256, -(-2 * sms // (prompts * kv))))
    return chunks, aligned(-(-plen // chunks)), aligned(room)


def _cascade_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """One decode step's attention over a `_CascadeCache`: the G rows' queries of a group stacked against each piece
    of their prompt's keys once (as Hydragen and FlashInfer's cascade do), each row against its own completion,
    all parts merged exactly by their log-sum-exps. query [rows, heads, 1, dim]; key and value as `update` returns."""
    cache = attention_mask
    if cache.kernels is not None:
        i, (rows, heads, _, dim) = module.layer_idx, query.shape
        if cache.parts is None:  # allocated by the first (warm-up) step, outside the CUDA graph
            cache.parts = cache.kernels.cascade_parts(rows, heads, cache.chunks + 1, dim, query.device)
        return cache.kernels.cascade_decode(query, key, value, cache.prompt_keys[i], cache.prompt_values[i],
                                            cache.prompt_bias, cache.keys[i], cache.values[i], cache.pos, cache.parts,
                                            cache.chunks, scaling), None
    (prompt_k, own_k), (prompt_v, own_v) = key, value
    rows, heads, _, dim = query.shape
    prompts, chunks, kv = cache.prompts, cache.chunks, prompt_k.shape[1]
    group, per = rows // prompts, heads // kv  # q head h reads kv head h // per, as repeat_kv arranges
    q = query.reshape(prompts, 1, group, kv, per, dim).transpose(2, 3).expand(-1, chunks, -1, -1, -1, -1)
    out_p, lse_p = cache.attend(q.reshape(prompts * chunks, kv, group * per, dim), prompt_k, prompt_v,
                                cache.prompt_bias, scaling)
    out_c, lse_c = cache.attend(query.reshape(rows, kv, per, dim), own_k, own_v, cache.bias, scaling)
    return cache.merge(out_p, lse_p, out_c, lse_c).reshape(rows, 1, heads, dim), None


def cascade_kernels(device, dtype):
    """The module `kernels`, whose `cascade_decode` does a decode step's whole shared-prompt attention in two
    Triton kernels (the torch path here takes six, and reads each row's whole buffer), on a GPU with Triton and
    bf16 or fp16 tensor cores; None elsewhere."""
    if (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and _installed("triton")
            and torch.cuda.get_device_capability(device) >= (8, 0)):
        from . import kernels
        return kernels
    return None


def _merge(out_p, lse_p, out_c, lse_c):
    """Attention over the union of key sets from each set's output and log-sum-exp: softmax over all the parts =
    sum_i e^lse_i out_i / sum_i e^lse_i. out_c [rows, kv heads, per, dim] and lse_c [rows, kv heads, per] of each
    row's own part; out_p [prompts x chunks, kv heads, group x per, dim] and lse_p of the prompt pieces, as the
    kernel returns them: put in the rows' order here, where compiling folds the reordering into the merge."""
    rows, kv, per, dim = out_c.shape
    group = out_p.shape[2] // per
    prompts = rows // group
    chunks = len(out_p) // prompts
    out_p = out_p.reshape(prompts, chunks, kv, group, per, dim).permute(1, 0, 3, 2, 4, 5).reshape(chunks, rows, kv,
                                                                                                  per, dim)
    lse_p = lse_p.reshape(prompts, chunks, kv, group, per).permute(1, 0, 3, 2, 4).reshape(chunks, rows, kv, per)
    share = torch.cat([lse_p, lse_c[None]]).softmax(0).unsqueeze(-1)
    return (share * torch.cat([out_p.float(), out_c.float()[None]])).sum(0).to(out_c.dtype)


CASCADE = "autobuster_cascade"
AttentionInterface.register(CASCADE, _cascade_attention)


def _attend_math(q, k, v, bias, scale):
    """(attention output, natural-log log-sum-exp of the scores, fp32) for q [b, h, n, d] against k, v [b, h, m, d]
    with an additive bias broadcast to [b, h, n, m]: the reference every kernel is checked against."""
    s = (q.float() @ k.float().mT) * scale + bias.float()
    lse = s.logsumexp(-1)
    return ((s - lse[..., None]).exp() @ v.float()).to(q.dtype), lse


def _attend_efficient(q, k, v, bias, scale):
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias.expand(len(q), q.shape[1], q.shape[2], k.shape[2]), True, scale=scale)[:2]
    return out, lse[..., :q.shape[2]]  # the log-sum-exp may be padded along the queries


def _attend_cudnn(q, k, v, bias, scale):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, bias.expand(len(q), q.shape[1], q.shape[2], k.shape[2]), True, scale=scale)[:2]
    return out, lse.reshape(q.shape[:3])


_ATTEND = {}


def attend_with_lse(device: torch.device, dtype: torch.dtype):
    """The fastest kernel here that returns the log-sum-exp, checked once against `_attend_math` on a small case
    shaped like a decode step's; None if no fused kernel passes on a GPU (the cascade is then off)."""
    key = (device.type, dtype)
    if key not in _ATTEND:
        _ATTEND[key] = _attend_math if device.type != "cuda" else None
        gen = torch.Generator(device).manual_seed(0)
        q, k, v = (torch.randn(3, 2, n, 64, generator=gen, device=device).to(dtype) for n in (24, 48, 48))
        bias = torch.zeros(3, 1, 1, 48, dtype=dtype, device=device)
        bias[0, ..., :5] = torch.finfo(dtype).min
        want, want_lse = _attend_math(q, k, v, bias, 0.125)
        for fn in (_attend_efficient, _attend_cudnn) if device.type == "cuda" else ():
            try:
                out, lse = fn(q, k, v, bias, 0.125)
                if (out - want).abs().max() < 0.02 and (lse.float() - want_lse).abs().max() < 0.02:
                    _ATTEND[key] = fn
                    break
            except RuntimeError:
                continue
    return _ATTEND[key]


def uses_cascade(model, num_samples: int) -> bool:
    """Whether `decode` shares each prompt's cache among its rows: with several samples per prompt, full-attention
    layers without a sliding window (and linear-attention ones, which keep their states per row), and a kernel for
    `_cascade_attention` on this device."""
    lm = unwrap(model).model.language_model
    types = set(getattr(lm.config, "layer_types", None) or ["full_attention"])
    p = next(lm.parameters())
    return (num_samples > 1 and "full_attention" in types and types <= {"full_attention", "linear_attention"}
            and not getattr(lm.config, "use_sliding_window", False) and attend_with_lse(p.device, p.dtype) is not None)


# Projections of one input, in the order the layers call them (Qwen2.5-VL's and Qwen3.5's attention, MLPs and Gated
# DeltaNet mixers): merged, each group is one matmul while decoding.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("in_proj_qkv", "in_proj_z"))


@contextmanager
def merged_lora(model):
    """LoRA folded into fresh copies of the base weights while decoding: one matmul per projection instead of
    three (base, A, B). Where every projection of a group in FUSED has an adapter, the group's merged weights are
    written side by side into one tensor and computed in one matmul (`_fuse`): fewer, larger kernels for the same
    memory. The original tensors are put back afterwards (merging and unmerging in place would drift in bf16).
    4-bit weights and switched-off adapters stay unmerged."""
    from peft.tuners.lora import LoraLayer
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and not m.merged and not m.disable_adapters
              and isinstance(m.base_layer, torch.nn.Linear) and m.base_layer.weight.is_floating_point()
              and m.active_adapters]
    saved = {m: m.base_layer.weight.data for m in layers}
    groups = [[getattr(parent, n) for n in names] for parent in model.modules() for names in FUSED
              if all(getattr(parent, n, None) in saved for n in names)]
    fused, members = [], {m for group in groups for m in group}
    try:
        for group in groups:  # the group's weight first, its members' merged weights written into their rows
            bases = [m.base_layer for m in group]
            weight = bases[0].weight.new_empty(sum(b.out_features for b in bases), bases[0].in_features)
            for b, rows in zip(bases, weight.split([b.out_features for b in bases])):
                b.weight.data = rows
            fused.append(weight)
        for m, w in saved.items():
            with torch.no_grad():
                delta = sum(m.get_delta_weight(a) for a in m.active_adapters).to(w.dtype)
                if m in members:
                    torch.add(w, delta, out=m.base_layer.weight.data)
                else:
                    m.base_layer.weight.data = w + delta
            m.merged_adapters = list(m.active_adapters)
        with _forwards({m: f for group, weight in zip(groups, fused) for m, f in _fuse(group, weight).items()}):
            yield
    finally:
        for m, w in saved.items():
            m.base_layer.weight.data = w
            m.merged_adapters = []


def _fuse(group, weight) -> dict:
    """Forwards for the group's projections: the first computes all of them in one matmul with `weight` (theirs
    side by side) and returns its part; each later one returns its part of that result when called on the same
    input (the layer calls them in FUSED's order), and runs its own forward otherwise. The result is dropped once
    every part is taken, so no layer's outlives the layer (a prefill's would hold 9 GB at 7B)."""
    bases = [m.base_layer for m in group]
    bias = (torch.cat([b.bias if b.bias is not None else b.weight.new_zeros(b.out_features) for b in bases])
            if any(b.bias is not None for b in bases) else None)
    last = {}  # the first projection's last input and the parts not yet taken

    def first(x, *args, **kwargs):
        if args or kwargs:  # e.g. peft's adapter_names: its own path
            return own[0](x, *args, **kwargs)
        parts = F.linear(x, weight, bias).split([b.out_features for b in bases], -1)
        last.update(x=x, parts=list(parts))
        return parts[0]

    def later(i):
        def forward(x, *args, **kwargs):
            if args or kwargs or last.get("x") is not x or last["parts"][i] is None:
                return own[i](x, *args, **kwargs)
            part, last["parts"][i] = last["parts"][i], None
            if all(p is None for p in last["parts"][1:]):
                last.clear()
            return part
        return forward

    own = [m.forward for m in group]
    return {m: first if i == 0 else later(i) for i, m in enumerate(group)}


@contextmanager
def _fused_rotary(lm):
    """On a GPU, the attention layers' rotary embedding compiled into one kernel for q and k while decoding, where
    Hugging Face's makes a dozen small ones per layer (the cascade's merge likewise: `_CascadeCache`). Same maths;
    compiled once per process, for any shape."""
    module = sys.modules[type(next(x.self_attn for x in lm.layers if hasattr(x, "self_attn"))).__module__]
    with (patch.object(module, "apply_rotary_pos_emb", _compiled(module.apply_rotary_pos_emb))
          if next(lm.parameters()).device.type == "cuda" else nullcontext()):
        yield


_COMPILED = {}


def _compiled(fn):
    """`fn` compiled once per process, for any shape; where compiling fails (no Triton, no C compiler), `fn` itself
    from then on, said once."""
    if fn not in _COMPILED:
        use = [torch.compile(fn, dynamic=True)]

        def run(*args, **kwargs):
            try:
                return use[0](*args, **kwargs)
            except Exception as e:
                if use[0] is fn:
                    raise
                print(f"engine: torch.compile of {fn.__name__} failed ({str(e).strip().splitlines()[0][:160]}); "
                      "it runs uncompiled", file=sys.stderr)
                use[0] = fn
                return fn(*args, **kwargs)
        _COMPILED[fn] = run
    return _COMPILED[fn]


def _fused_rms_norms(root, kind, offset: float = 0.0) -> dict:
    """Forwards for `_forwards`: each RMSNorm of type `kind` under `root` as torch's fused kernel, one kernel
    instead of seven (forward and backward), which saves 8% of a 7B decode step (BENCHMARKS.md). Same maths (the
    family's norm scales by weight + `offset`); the output is rounded to bf16 once, not twice."""
    return {m: partial(F.rms_norm, normalized_shape=m.weight.shape, weight=m.weight + offset if offset else m.weight,
                       eps=getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6)))
            for m in root.modules() if isinstance(m, kind)}


def _fused_mlps(root) -> dict:
    """Forwards for `_forwards`: each SwiGLU MLP under `root` (the language model's, both families) with its SiLU
    and product in one kernel on a GPU (`_compiled`), where eager runs two, over the [tokens, 18,944] intermediate
    at 7B: 56 of a 7B decode step's 483 kernels (BENCHMARKS.md). Same maths; a CPU runs the same calls eagerly."""
    return {m: partial(_swiglu, m) for m in root.modules()
            if isinstance(getattr(m, "act_fn", None), (torch.nn.SiLU, SiLUActivation))
            and all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj"))}


def _silu_mul(gate, up):
    return F.silu(gate) * up


def _swiglu(m, x):  # gate before up, as the layer calls them (`_fuse` computes both at the first)
    return m.down_proj((_compiled(_silu_mul) if x.is_cuda else _silu_mul)(m.gate_proj(x), m.up_proj(x)))


def _decode_delta_rule(device):
    """What the Gated DeltaNet layers decode one token with in place of transformers' step (fla's fused kernel,
    which returns a new state for the cache to copy back, or its torch code with four state-sized temporaries): on
    a GPU with Triton, the kernel of `kernels` (the state read and written once, in place); elsewhere None, and
    transformers' own step runs (on a CPU the states are small)."""
    if device.type == "cuda" and _installed("triton"):
        from .kernels import delta_rule_step
        return delta_rule_step
    return None


@contextmanager
def _fused_delta_rule(lm):
    """The Gated DeltaNet layers decode with `_decode_delta_rule`'s step where it gives one. No-op for a model
    without them."""
    mixer = next((x.linear_attn for x in lm.layers if hasattr(x, "linear_attn")), None)
    step = _decode_delta_rule(next(lm.parameters()).device)
    with (patch.object(sys.modules[type(mixer).__module__], "torch_recurrent_gated_delta_rule", step)
          if mixer is not None and step is not None else nullcontext()):
        yield


@torch.no_grad()
def decode(model, batch, num_samples: int, max_new_tokens: int, ends: list[int], banned: list[int], pad: int,
           greedy: bool = False, temperature: float = 1.0, track_ids: list[int] | None = None,
           cuda_graph: bool | None = None, cascade: bool | None = None,
           features: dict[int, torch.Tensor] | None = None):
    """(ids [rows, steps], tracked logits or None). Rows are prompt-major; a row that ended gets `pad`. With no
    `ends` every row runs to max_new_tokens (the benchmark's setting). `cascade`: share each prompt's cache among
    its rows (`_CascadeCache`); by default wherever `uses_cascade` says it applies. `features`: the videos'
    `video_features`, when the caller has them."""
    core = unwrap(model)
    lm = core.model.language_model
    device = core.lm_head.weight.device
    # given features, the pixels stay where they are (at 7B, 0.3 GB for 8 videos)
    batch = {k: v.to(device) for k, v in batch.items() if not (features and k == "pixel_values_videos")}
    embeds, positions, attention = _inputs(core, batch, features or video_features(model, batch))
    kernels = _fused_rms_norms(lm, type(lm.norm), family_of_model(model).norm_offset) | _fused_mlps(lm)
    with _forwards(kernels):
        out = lm(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, use_cache=True,
                 **_delta_rule_chunks(device))
    first = core.lm_head(out.last_hidden_state[:, -1]).float().repeat_interleave(num_samples, 0)

    rows = len(first)
    room = max_new_tokens + 2  # CUDA-graph capture runs the step twice first: room for those writes
    cascade = uses_cascade(model, num_samples) if cascade is None else cascade
    cache = (_CascadeCache(out.past_key_values, attention, num_samples, room, attend_with_lse(device, embeds.dtype))
             if cascade else _StaticCache(out.past_key_values, attention, num_samples, room))
    del out
    next_pos = (positions.amax((0, 2)) + 1).repeat_interleave(num_samples, 0)  # text continues after the video
    ends_t = torch.tensor(ends, dtype=torch.long, device=device)
    banned_t = torch.tensor(banned, dtype=torch.long, device=device)
    track_t = torch.tensor(track_ids or [], dtype=torch.long, device=device)
    ids = torch.full((rows, room), pad, dtype=torch.long, device=device)
    tracked = torch.zeros(rows, room, len(track_t), device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    step = torch.zeros(1, dtype=torch.long, device=device)  # index of the token chosen last

    def choose(logits):  # fresh fp32 logits [rows, vocab] of position `step`, changed in place; writes the token
        if track_ids:
            tracked.index_copy_(1, step, logits[:, track_t].unsqueeze(1))
        logits.index_fill_(1, banned_t, float("-inf"))
        if not greedy:  # Gumbel-max, drawn on the device without a sync: a sample from softmax(logits / T) is
            # argmax(logits / T - log E) = argmax(logits - T log E) with E ~ Exp(1), one pass fewer over the vocab
            logits.add_(_log_exp1(logits), alpha=-temperature)
        token = torch.where(done, pad, logits.argmax(-1))
        ids.index_copy_(1, step, token.unsqueeze(1))
        done.logical_or_(torch.isin(token, ends_t))
        return token

    def step_fn():  # feed the token at `step`, choose the one after it
        token = ids.index_select(1, step).squeeze(1)
        cache.advance(step)
        h = lm.embed_tokens(token).unsqueeze(1)
        pos = (next_pos + step).view(1, rows, 1).expand(3, rows, 1)
        h = _decode_layers(lm, h, kernels, cache, lm.rotary_emb(h, pos))
        logits = core.lm_head(h[:, -1]).float()
        step.add_(1)
        choose(logits)

    choose(first)
    with (_forwards(kernels), _fused_rotary(lm), _fused_delta_rule(lm),
          attention_as(lm.config, CASCADE) if cascade else nullcontext()):
        run = step_fn
        if max_new_tokens > 1 and ((device.type == "cuda") if cuda_graph is None else cuda_graph):
            run = _graphed(step_fn, [ids, tracked, done, step, *cache.state], cache.restart)
            cache.restart = None  # and with it the prompts' linear-attention states, needed no more (0.4 GB at 4B)
        every = EXIT_CHECK_EVERY if device.type == "cuda" else 1
        for t in range(1, max_new_tokens):
            if t % every == 0 and len(ends) and bool(done.all()):
                break
            run()
    n = int(step.item()) + 1
    return ids[:, :n], (tracked[:, :n].cpu() if track_ids else None)


def _decode_layers(lm, h, norms: dict, cache, rope) -> torch.Tensor:
    """The decoder layers and the final norm over one decode step's tokens `h`, as each layer computes them, but
    with every residual add done in one call with the RMSNorm after it (`_add_rms_norm`, compiled on a GPU): 56 of
    a 7B step's 483 kernels (BENCHMARKS.md). The layers' attention, linear attention and MLP modules run as they
    are, and `norms` (`_fused_rms_norms`) gives each RMSNorm's weight and epsilon."""
    add_norm = _compiled(_add_rms_norm) if h.is_cuda else _add_rms_norm
    residual, delta = h, None

    def norm(m):  # the next sublayer's input, and the residual stream with everything added so far
        if delta is None:
            return norms[m](residual), residual
        return add_norm(delta, residual, norms[m].keywords["weight"], norms[m].keywords["eps"])

    for layer in lm.layers:
        x, residual = norm(layer.input_layernorm)
        if hasattr(layer, "linear_attn"):  # Qwen3.5's Gated DeltaNet layers take no mask when decoding
            delta = layer.linear_attn(hidden_states=x, cache_params=cache, attention_mask=None)
        else:
            delta = layer.self_attn(hidden_states=x, attention_mask=cache.mask, position_embeddings=rope,
                                    past_key_values=cache, use_cache=True)[0]
        x, residual = norm(layer.post_attention_layernorm)
        delta = layer.mlp(x)
    return norm(lm.norm)[0]


def _add_rms_norm(x, residual, weight, eps: float):
    """(RMSNorm of x + residual, x + residual): a decoder layer's residual add and the norm that reads its sum."""
    h = x + residual
    return F.rms_norm(h, weight.shape, weight, eps), h


def _log_exp1(like: torch.Tensor) -> torch.Tensor:
    """log E, E ~ Exp(1), shaped like `like`. A GPU draws E in one kernel; a CPU's exponential_ draws element by
    element, where E = -log U from a uniform draw is 3.6x faster (0.24 against 0.86 ms for 64 x 509)."""
    if like.device.type == "cuda":
        return torch.empty_like(like).exponential_().log_()
    return torch.rand_like(like).log_().neg_().log_()


def _graphed(fn, state: list[torch.Tensor], restart):
    """`fn` captured as a CUDA graph. Capture needs warm-up runs, which change the state tensors: they are
    saved first and restored after, and `restart()` restores the linear-attention states (a recurrent state,
    unlike a key, cannot be hidden from the next step by the mask). The KV cache is left out (a copy of it would
    double the rollout's peak memory): the warm-up runs write keys and values at positions that the restored mask
    hides and that the decode steps overwrite before they read them."""
    saved = [t.clone() for t in state]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for t, s in zip(state, saved):
        t.copy_(s)
    restart()
    return graph.replay


def generate(model, processor, batch, num_samples: int = 1, max_new_tokens: int = 64, greedy: bool = False,
             temperature: float = 1.0, track_ids: list[int] | None = None) -> Completions:
    """Sample `num_samples` completions per prompt (or one greedy completion). Sampling is plain softmax sampling
    at `temperature`: no top-k (Qwen2.5-VL ships top_k = 1), top-p or repetition penalty, whatever the model's
    generation config says; special tokens other than the end tokens are never chosen."""
    tok = processor.tokenizer
    ends = end_ids(tok)
    with merged_lora(model), torch.no_grad():
        features = video_features(model, batch)
        ids, tracked = decode(model, batch, 1 if greedy else num_samples, max_new_tokens, ends, banned_ids(tok),
                              tok.pad_token_id, greedy=greedy, temperature=temperature, track_ids=track_ids,
                              features=features)
    mask, truncated = completion_mask(ids, ends)
    ids = ids.masked_fill(mask == 0, tok.pad_token_id).cpu()
    mask, truncated = mask.cpu(), truncated.cpu()
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    return Completions(ids, mask, mask.sum(1), truncated, texts, tracked, features)


def reply_ids(tokenizer, replies: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Target replies as completion ids for token_logprobs: each with the end token, right-padded, and its mask."""
    t = tokenizer([r + tokenizer.eos_token for r in replies], add_special_tokens=False, padding=True,
                  padding_side="right", return_tensors="pt")
    return t.input_ids, t.attention_mask.float()


# ---------------------------------------------------------------- log-probs


def token_logprobs(model, batch, ids: torch.Tensor, temperature: float = 1.0, chunk_rows: int = 8,
                   prompt_of_row: torch.Tensor | None = None, features: dict[int, torch.Tensor] | None = None,
                   checkpointing: bool | int | str | None = None) -> torch.Tensor:
    """log p(ids | prompt) per completion token, [rows, L], with gradients if enabled.

    Row r of `ids` continues prompt `prompt_of_row[r]` of `batch` (by default prompt r). Each video goes through
    the vision tower once whatever its number of rows (or not at all when its `features` are given), and each
    prompt through the language model once: its completions follow it in one packed sequence, each attending to
    the prompt and to itself at the positions it would have alone (the G rows of a group share a prompt that is
    most of their tokens), with no mask tensor (`_packed_attention`). Only completion positions reach lm_head,
    chunk by chunk under checkpointing, so no [rows, seq, vocab] fp32 tensor ever exists. `checkpointing`: which
    decoder layers are recomputed in backward (`_packed_layers`)."""
    core = unwrap(model)
    ids = ids.to(core.lm_head.weight.device)
    batch = {k: v.to(ids.device) for k, v in batch.items()}
    rows = torch.arange(len(ids)) if prompt_of_row is None else prompt_of_row.cpu()
    prompts, seq_of_row = rows.unique(return_inverse=True)
    slot = torch.zeros_like(rows)  # the row's place among its prompt's completions
    for s in range(len(prompts)):
        at = seq_of_row == s
        slot[at] = torch.arange(int(at.sum()))
    features = features or video_features(model, batch, prompts.tolist())
    plen, width = batch["input_ids"].shape[1], ids.shape[1]
    k = int(slot.max()) + 1
    # one placeholder completion per prompt gives the prompt's embeddings and the positions that follow it
    embeds, positions, attention = _inputs(core, batch, features, prompts, ids.new_zeros(len(prompts), width))
    # [prompt][completion 0]...[completion k-1]: the completion's text positions repeat in every block
    blocks = embeds[:, plen:].repeat(1, k, 1)
    where = (seq_of_row.to(ids.device), slot.to(ids.device))
    blocks.view(len(prompts), k, width, -1)[where] = core.model.get_input_embeddings()(ids)
    embeds = torch.cat([embeds[:, :plen], blocks], 1)
    positions = torch.cat([positions[..., :plen], positions[..., plen:].repeat(1, 1, k)], -1)
    lm = core.model.language_model
    norms = _fused_rms_norms(lm, type(lm.norm), family_of_model(model).norm_offset)
    hidden = _packed_layers(lm, embeds, positions, _Packed(attention[:, :plen], k, width), checkpointing, norms)
    # completion token t of block j is predicted at position plen + j * width + t - 1 (t = 0: the prompt's last)
    at = plen + slot.to(ids.device)[:, None] * width + torch.arange(width, device=ids.device) - 1
    at[:, 0] = plen - 1
    hidden = norms[lm.norm](hidden[seq_of_row.to(ids.device)[:, None], at])  # the final norm where lm_head reads

    def rows_logprobs(h, target):
        logits = core.lm_head(h).float() / temperature
        return logits.log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)

    parts = []
    for h, t in zip(hidden.split(chunk_rows), ids.split(chunk_rows)):
        parts.append(checkpoint(rows_logprobs, h, t, use_reentrant=False) if torch.is_grad_enabled()
                     else rows_logprobs(h, t))
    return torch.cat(parts)


def micro_batches(rows: torch.Tensor, prompt_of_row: torch.Tensor, prompt_len: int, completion_len: int,
                  budget: int) -> list[torch.Tensor]:
    """`rows` cut in order into micro-batches whose packed sequences (token_logprobs: each prompt once, then its
    completions) hold at most `budget` tokens together; a row alone always makes one."""
    out, part, counts = [], [], Counter()  # counts: rows per prompt in `part` with the new row
    for r in rows.tolist():
        p = int(prompt_of_row[r])
        counts[p] += 1
        if part and len(counts) * (prompt_len + max(counts.values()) * completion_len) > budget:
            out.append(torch.tensor(part))
            part, counts = [], Counter({p: 1})
        part.append(r)
    return out + [torch.tensor(part)] * bool(part)


@dataclass
class _Packed:
    """The attention mask of packed sequences, as `_packed_attention` reads it: a left-padded prompt, then `blocks`
    completions of `width` tokens, each seeing the prompt and itself causally and no other completion."""
    prompt: torch.Tensor  # [seqs, prompt length] the prompts' attention mask
    blocks: int
    width: int

    def __post_init__(self):
        self.pads = (self.prompt == 0).sum(1).tolist()  # once per pass, not once per layer


def _packed_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention over `_Packed` sequences as two mask-free calls per sequence, so the flash kernel runs forward and
    backward: the prompt's valid tokens causally, then its completions as a batch against the prompt's keys and
    their own (causal from the lower right). Exactly the needed scores, where a dense mask costs 3x at 7B. query
    [seqs, heads, S, dim], key and value [seqs, kv heads, S, dim]; padding queries get zeros (no one reads them)."""
    packed = attention_mask
    seqs, heads, total, dim = query.shape
    plen, blocks, width = total - packed.blocks * packed.width, packed.blocks, packed.width
    out = []
    for s, pad in enumerate(packed.pads):
        k, v = key[s:s + 1, :, pad:plen], value[s:s + 1, :, pad:plen]
        with sdpa_kernel(NO_CUDNN):  # cuDNN plans a graph per new shape: every prompt length would pay it
            prompt = F.scaled_dot_product_attention(query[s:s + 1, :, pad:plen], k, v, is_causal=True,
                                                    scale=scaling, enable_gqa=True)
        q_b, k_b, v_b = (x[s, :, plen:].unflatten(1, (blocks, width)).transpose(0, 1) for x in (query, key, value))
        k_b = torch.cat([k.expand(blocks, -1, -1, -1), k_b], 2)
        v_b = torch.cat([v.expand(blocks, -1, -1, -1), v_b], 2)
        own = F.scaled_dot_product_attention(q_b, k_b, v_b, attn_mask=causal_lower_right(width, k_b.shape[2]),
                                             scale=scaling, enable_gqa=True)  # [blocks, heads, width, dim]
        out.append(torch.cat([query.new_zeros(heads, pad, dim), prompt[0], own.transpose(0, 1).flatten(1, 2)], 1))
    return torch.stack(out).transpose(1, 2), None  # [seqs, S, heads, dim]


NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
PACKED = "autobuster_packed"
AttentionInterface.register(PACKED, _packed_attention)


class _LinearStates:
    """What a Gated DeltaNet layer carries from one call to the next (the last convolution inputs, the recurrent
    state), held as plain tensors so that autograd follows them from a prompt into its completions."""

    def __init__(self, conv=None, recurrent=None):
        self.conv, self.recurrent = conv, recurrent

    def get_conv_state(self, layer_idx, state_idx=0):
        return self.conv

    def get_recurrent_state(self, layer_idx, state_idx=0):
        return self.recurrent

    def update_conv_state(self, inputs, layer_idx, state_idx=0, conv_kernel_size=4, **kwargs):
        full = inputs if self.conv is None else torch.cat([self.conv, inputs], -1)
        self.conv = F.pad(full, (max(0, conv_kernel_size - full.shape[-1]), 0))[..., -conv_kernel_size:]
        return full

    def update_recurrent_state(self, state, layer_idx, state_idx=0, **kwargs):
        self.recurrent = state
        return state

    def is_recording_past(self, layer_idx):
        return False


def _packed_linear(forward, packed, hidden_states, attention_mask=None, cache_params=None, **kwargs):
    """A Gated DeltaNet layer (Qwen3.5's linear attention, `forward`) over `_Packed` sequences: run straight through,
    each completion would start from the state the completion before it left. So the prompts run first, as one
    left-padded batch (exact: a zeroed input adds nothing to the zero initial state, as no projection and not the
    convolution has a bias), then every completion as one batch, each starting from its prompt's final
    convolution and recurrent states."""
    seqs, total, _ = hidden_states.shape
    plen = total - packed.blocks * packed.width
    states, chunks = _LinearStates(), _delta_rule_chunks(hidden_states.device)
    module = sys.modules[type(forward.__self__).__module__]
    rule = _update_delta_rule(module.torch_chunk_gated_delta_rule, hidden_states)
    rule = torch.autocast(hidden_states.device.type, enabled=False)(rule)  # fp32 as ever (its state accumulates)
    with patch.object(module, "torch_chunk_gated_delta_rule", rule):
        prompt = forward(hidden_states[:, :plen] * packed.prompt[..., None].to(hidden_states.dtype),
                         cache_params=states, **chunks)
        states = _LinearStates(states.conv.repeat_interleave(packed.blocks, 0),
                               states.recurrent.repeat_interleave(packed.blocks, 0))
        own = forward(hidden_states[:, plen:].reshape(seqs * packed.blocks, packed.width, -1), cache_params=states,
                      **chunks)
    return torch.cat([prompt, own.reshape(seqs, packed.blocks * packed.width, -1)], 1)


_UPDATE_RULE = {}


def _update_delta_rule(picked, like: torch.Tensor):
    """The chunked delta rule the update runs: the one transformers picked (fla's kernel, when installed), unless
    its backward refuses this GPU, then transformers' torch code (`__wrapped__`), said once. fla 0.6 refuses its
    gated backward on Hopper with Triton < 3.7.1, where it would be wrong; its forward, which the rollouts use, is
    fine. Asked once per process and device, on a small case."""
    key = (picked, like.device, like.dtype)
    if key not in _UPDATE_RULE:
        _UPDATE_RULE[key] = picked
        if _installed("fla"):
            gen = torch.Generator(like.device).manual_seed(0)
            q, k, v = (torch.randn(1, 64, 2, 64, generator=gen, device=like.device).to(like.dtype).requires_grad_()
                       for _ in range(3))
            g, beta = -torch.rand(1, 64, 2, device=like.device), torch.rand(1, 64, 2, device=like.device)
            try:
                with torch.enable_grad():
                    picked(q, k, v, g=g.requires_grad_(), beta=beta.to(like.dtype), use_qk_l2norm_in_kernel=True
                           )[0].float().sum().backward()
            except RuntimeError as e:
                _UPDATE_RULE[key] = picked.__wrapped__
                print(f"engine: the update runs the torch delta rule: fla's backward refuses this device "
                      f"({str(e).strip().splitlines()[0][:200]})", file=sys.stderr)
    return _UPDATE_RULE[key]


def _delta_rule_chunks(device) -> dict:
    """On a CPU, Hugging Face's torch delta rule in chunks of 16 tokens, not 64: its 64 x 64 triangular solves are
    most of the delta rule's time at a tiny Qwen3.5's widths (forward and backward 2-6x faster, same maths;
    BENCHMARKS.md). fla's kernels take no chunk size: the layers' kernel wrappers drop it."""
    return {"chunk_size": 16} if device.type == "cpu" else {}


def _packed_layer(layer, hidden, rope, packed, norms):
    """One decoder layer over packed sequences: its attention as `_packed_attention`, or its linear attention as
    `_packed_linear`, its adapters as `_adapters_in` says, its RMSNorms as `norms` (`_forwards`). The switches live
    in here, not around the loop: a checkpointed layer runs again in backward, after token_logprobs has returned."""
    own_checkpointing, layer.gradient_checkpointing = layer.gradient_checkpointing, False
    attention, mixer = getattr(layer, "self_attn", None), getattr(layer, "linear_attn", None)
    if mixer is not None:
        mixer.forward = partial(_packed_linear, type(mixer).forward.__get__(mixer), packed)
    try:
        with (attention_as(attention.config, PACKED) if attention is not None else nullcontext(),
              _adapters_in(layer, hidden), _forwards(norms)):
            return layer(hidden, attention_mask=packed, position_embeddings=rope)
    finally:
        layer.gradient_checkpointing = own_checkpointing
        if mixer is not None:
            del mixer.forward


@contextmanager
def _adapters_in(layer, hidden: torch.Tensor):
    """LoRA in the dtype of the hidden states (bf16) from its fp32 weights, as the Hugging Face Trainer runs it
    with bf16 on: autocast, with peft's own input cast turned off. peft alone casts each adapter's input to fp32 and
    its output back, a full copy of the micro-batch's activations per adapter: the 7B update with every layer
    checkpointed took 7.70 s, 7.08 s this way (BENCHMARKS.md). The gradients still reach the fp32 weights. An fp32
    model runs as it is."""
    if hidden.dtype == torch.float32:
        yield
        return
    with torch.autocast(hidden.device.type, dtype=hidden.dtype), disable_input_dtype_casting(layer):
        yield


MEMORY_RESERVE = 0.25  # share of the GPU's memory that checkpointing "by memory" leaves free for the backward pass
# (a checkpointed layer's recomputation, activation gradients, the head's fp32 logits)


def _memory(device) -> tuple[int, int] | None:
    """(free bytes, counting what torch holds but does not use; total bytes) of a GPU, None elsewhere."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device), total


def _packed_layers(lm, embeds, positions, packed, checkpointing, norms: dict):
    """The decoder layers over packed sequences (the final norm is the caller's), their RMSNorms as `norms`
    (`_fused_rms_norms`, built once per pass). With gradients, `checkpointing` says which decoder layers are
    recomputed in backward instead of keeping their activations: True every one, False none, an int the first that
    many, "memory" each one only once keeping its activations (as much as the last kept layer's) would leave less
    than MEMORY_RESERVE of the GPU free (none off a GPU); None follows the model's gradient-checkpointing setting
    (all or none)."""
    if checkpointing is None:
        checkpointing = lm.training and any(x.gradient_checkpointing for x in lm.layers)
    h, rope = embeds, lm.rotary_emb(embeds, positions)
    kept = 0  # bytes the last layer run without checkpointing kept
    for i, layer in enumerate(lm.layers):
        if not torch.is_grad_enabled():
            recompute = False
        elif checkpointing == "memory":
            memory = _memory(h.device)
            recompute = memory is not None and memory[0] - kept < MEMORY_RESERVE * memory[1]
        else:
            recompute = i < int(checkpointing) if not isinstance(checkpointing, bool) else checkpointing
        own = {m: norms[m] for m in layer.modules() if m in norms}
        if recompute:
            h = checkpoint(_packed_layer, layer, h, rope, packed, own, use_reentrant=False)
        else:
            before = torch.cuda.memory_allocated(h.device) if h.device.type == "cuda" else 0
            h = _packed_layer(layer, h, rope, packed, own)
            kept = (torch.cuda.memory_allocated(h.device) if h.device.type == "cuda" else 0) - before
    return h
