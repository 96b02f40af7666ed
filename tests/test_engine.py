"""The engine against Hugging Face: greedy generation token for token, log-probs against a full forward,
and the model loading paths (4-bit on CPU, 4 fps temporal positions)."""
import copy
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

from autobuster import dataset, engine, model, tiny
from autobuster.profiles import active
from autobuster.prompt import ANSWER, BOXED


@pytest.fixture(scope="module")
def policy(tiny_home):
    m, p = model.load(active().model)
    return m, p


def clips(n, seed=0):
    setup = active()
    rows = dataset.eval_clips(setup, "val")[0].sample(n, random_state=seed).to_dict("records")
    return [dataset.load_frames(setup, r) for r in rows]


def test_greedy_matches_hf_generate(policy):
    m, p = policy
    for n, new in ((1, 8), (3, 24), (5, 40)):
        batch = model.encode(p, clips(n, seed=n), 56 * 56, model.chat_text(p, ANSWER))
        ours = engine.generate(m, p, batch, greedy=True, max_new_tokens=new)
        ref = m.generate(**batch, do_sample=False, max_new_tokens=new, eos_token_id=engine.end_ids(p.tokenizer),
                         pad_token_id=p.tokenizer.pad_token_id, suppress_tokens=engine.banned_ids(p.tokenizer))
        ref = ref[:, batch["input_ids"].shape[1]:]
        for i in range(n):
            k = int(ours.lengths[i])
            assert ours.ids[i, :k].tolist() == ref[i, :k].tolist()


def warm_up_then_eager(fn, state, restart):
    """`_graphed` on a CPU: the two warm-up steps a CUDA-graph capture runs, the state restored, then plain steps.
    A tensor a decode step changes that neither `state` nor `restart` restores shows as wrong tokens."""
    saved = [t.clone() for t in state]
    fn(), fn()
    for t, s in zip(state, saved):
        t.copy_(s)
    restart()
    return fn


def ending_apart(plain, ends):
    """End tokens under which prompt 0's rows end at another step than prompt 1's, whatever the model learnt
    (`plain`: their greedy replies, which must differ): `ends` where the replies already end apart, else with the
    latest token of prompt 0's reply that ends its rows apart added (late, so that they decode for long)."""
    def end(row, extra=()):  # the length of the completion, its end token included
        return next((k + 1 for k, t in enumerate(row.tolist()) if t in ends or t in extra), len(row))
    if end(plain[0]) != end(plain[1]):
        return ends
    return ends + [[t for t in plain[0, :end(plain[0])].tolist() if end(plain[0], [t]) != end(plain[1], [t])][-1]]


def test_cascade_greedy_matches_hf_generate(policy, monkeypatch):
    """Shared-prompt decode, G rows per prompt, against Hugging Face generate on each prompt alone: prompts of
    different lengths (left padding), groups that end at different steps."""
    m, p = policy
    tok = p.tokenizer
    # the second prompt has the warm start's reply begun (four tokens of it), so that the two greedy replies differ
    # in length even where the warm start answers every clip alike: the groups end at their own end tokens
    begun = tok.decode(tok(ANSWER.write(tiny.THOUGHT, "A")).input_ids[:4])
    pool, texts = clips(2, seed=4), [model.chat_text(p, ANSWER, "no_think"), model.chat_text(p, ANSWER) + begun]
    batch = model.encode(p, [pool[0], pool[1], pool[0]], 56 * 56, texts + texts[:1])
    assert batch["attention_mask"].min() == 0 and engine.uses_cascade(m, 2) and not engine.uses_cascade(m, 1)
    kw = dict(do_sample=False, max_new_tokens=40, pad_token_id=tok.pad_token_id,
              suppress_tokens=engine.banned_ids(tok))
    ends = engine.end_ids(tok)
    ends = ending_apart(m.generate(**batch, eos_token_id=ends, **kw)[:, batch["input_ids"].shape[1]:], ends)
    monkeypatch.setattr(engine, "_graphed", warm_up_then_eager)  # the capture's warm-up steps, on a CPU
    ids, _ = engine.decode(m, batch, 2, 40, ends, engine.banned_ids(tok), tok.pad_token_id, greedy=True,
                           cascade=True, cuda_graph=True)
    ref = m.generate(**batch, eos_token_id=ends, **kw)[:, batch["input_ids"].shape[1]:]
    lengths = engine.completion_mask(ids, ends)[0].sum(1).tolist()
    assert len(set(lengths)) > 1
    for row, k in enumerate(lengths):
        assert ids[row, :k].tolist() == ref[row // 2, :k].tolist()


@pytest.mark.parametrize("cascade", [True, False], ids=["shared-prompt", "expanded"])
def test_qwen3_5_greedy_matches_hf_generate(policy, monkeypatch, cascade):
    """The tiny Qwen3.5 (Gated DeltaNet layers with convolution and recurrent states, then full attention): each
    prompt's states copied to its G rows, its keys and values shared by them or copied, greedy decode token for
    token against Hugging Face generate, prompts of different lengths, rows ending at different steps, through the
    capture's warm-up steps."""
    tok = policy[1].tokenizer
    m = tiny.build_qwen3_5(tok).eval()
    p = tiny.build_qwen3_5_processor(tok, 64 * 64)
    batch = model.encode(p, clips(3, seed=4), 64 * 64,
                         [model.chat_text(p, BOXED, "no_think"), model.chat_text(p, BOXED),
                          model.chat_text(p, BOXED, "no_think")])
    assert batch["attention_mask"].min() == 0 and engine.uses_cascade(m, 2) and not engine.uses_cascade(m, 1)
    ends = engine.end_ids(tok)
    kw = dict(do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id,
              suppress_tokens=engine.banned_ids(tok))
    plain = m.generate(**batch, eos_token_id=ends, **kw)[:, batch["input_ids"].shape[1]:]
    ends = ending_apart(plain, ends)
    ref = m.generate(**batch, eos_token_id=ends, output_logits=True, return_dict_in_generate=True, **kw)
    ref_logits = torch.stack(ref.logits, 1)[..., :64]  # the tokens' logits at every step, before any processing
    ref = ref.sequences[:, batch["input_ids"].shape[1]:]
    monkeypatch.setattr(engine, "_graphed", warm_up_then_eager)
    ids, tracked = engine.decode(m, batch, 2, 12, ends, engine.banned_ids(tok), tok.pad_token_id, greedy=True,
                                 track_ids=list(range(64)), cuda_graph=True, cascade=cascade)
    lengths = engine.completion_mask(ids, ends)[0].sum(1).tolist()
    assert len(set(lengths)) > 1
    for row, k in enumerate(lengths):
        assert ids[row, :k].tolist() == ref[row // 2, :k].tolist()
        # the logits too: a row decoding from another prompt's states could still pick the same tokens
        torch.testing.assert_close(tracked[row, :k], ref_logits[row // 2, :k], rtol=1e-4, atol=1e-5)


TRITON_STEP = """
import torch
import transformers.models.qwen3_5.modeling_qwen3_5 as qwen3_5
from autobuster import kernels
torch.manual_seed(0)
for rows, key_heads, heads, kd, vd in ((3, 2, 4, 16, 16), (2, 1, 2, 32, 64)):
    state = torch.randn(rows, heads, kd, vd) * 0.3
    want = state.clone()
    for step in range(3):
        q, k = (torch.randn(rows, 1, key_heads, kd) for _ in range(2))
        v = torch.randn(rows, 1, heads, vd)
        g, beta = -torch.rand(rows, 1, heads), torch.rand(rows, 1, heads)
        out, want = qwen3_5.torch_recurrent_gated_delta_rule.__wrapped__(
            q, k, v, g=g, beta=beta, initial_state=want, output_final_state=True, use_qk_l2norm_in_kernel=True)
        got, same = kernels.delta_rule_step(q, k, v, g, beta, state)
        assert same is state
        torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state, want, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_triton_decode_step_matches_transformers_recurrent_rule():
    """The GPU decode step's Triton kernel, run by Triton's interpreter on the CPU, against transformers' torch
    recurrent delta rule, token after token: grouped value heads, two widths, the state updated in place."""
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-c", TRITON_STEP], env=os.environ | {"TRITON_INTERPRET": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_update_falls_back_to_torch_where_the_delta_rule_kernel_refuses_backward(policy, monkeypatch, capsys):
    """fla 0.6 refuses its gated backward on Hopper with Triton < 3.7.1 (it would be wrong there): the update then
    runs transformers' torch delta rule, says so once, and gets the gradients the torch code gives."""
    import transformers.models.qwen3_5.modeling_qwen3_5 as qwen3_5

    class Refused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results for gated "
                               "chunk_bwd_dqkwg (see #640).")

    torch_code = qwen3_5.torch_chunk_gated_delta_rule.__wrapped__

    def kernel(*args, **kwargs):  # a kernel whose forward works and whose backward refuses
        out, state = torch_code(*args, **kwargs)
        return Refused.apply(out), state

    kernel.__wrapped__ = torch_code
    tok = policy[1].tokenizer
    m = tiny.build_qwen3_5(tok)
    p = tiny.build_qwen3_5_processor(tok, 64 * 64)
    batch = model.encode(p, clips(2, seed=3), 64 * 64, model.chat_text(p, BOXED))
    ids, _ = engine.reply_ids(tok, ["a short reply", "another reply, longer"] * 2)
    rows = torch.tensor([0, 0, 1, 1])

    def grads():
        m.zero_grad()
        engine.token_logprobs(m, batch, ids, prompt_of_row=rows).sum().backward()
        return [w.grad.clone() for w in m.model.language_model.parameters() if w.grad is not None]

    want = grads()
    monkeypatch.setattr(qwen3_5, "torch_chunk_gated_delta_rule", kernel)
    monkeypatch.setattr(engine, "_installed", lambda package: True)
    monkeypatch.setattr(engine, "_UPDATE_RULE", {})
    with pytest.raises(RuntimeError, match="#640"):  # the kernel as the update would otherwise meet it
        kernel(*(torch.randn(1, 4, 2, 16, requires_grad=True) for _ in range(3)), g=-torch.rand(1, 4, 2),
               beta=torch.rand(1, 4, 2))[0].sum().backward()
    capsys.readouterr()
    for _ in range(2):
        got = grads()
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert capsys.readouterr().err.count("engine: the update runs the torch delta rule: fla's backward refuses") == 1


def test_cascade_sampling_equals_the_expanded_cache(policy):
    """Same seed, same draws: the shared-prompt cache and the per-row copy give the same tokens and the same
    logits of the tracked tokens at every step."""
    m, p = policy
    batch = model.encode(p, clips(2, seed=5), 56 * 56,
                         [model.chat_text(p, ANSWER, "no_think"), model.chat_text(p, ANSWER)])
    tok = p.tokenizer
    out = []
    for cascade in (True, False):
        torch.manual_seed(3)
        out.append(engine.decode(m, batch, 4, 24, engine.end_ids(tok), engine.banned_ids(tok), tok.pad_token_id,
                                 temperature=3.0, track_ids=list(range(40)), cascade=cascade))
    (ids_c, tracked_c), (ids_e, tracked_e) = out
    assert ids_c.tolist() == ids_e.tolist()
    assert len({tuple(r) for r in ids_c.tolist()}) == 8  # rows of a group differ
    assert len(set(engine.completion_mask(ids_c, engine.end_ids(tok))[0].sum(1).tolist())) > 1  # and end apart
    torch.testing.assert_close(tracked_c, tracked_e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cascade", [True, False])
def test_a_rollouts_cache_is_freed_when_it_returns(policy, monkeypatch, cascade):
    """Freed by reference counting alone, with the cycle collector off: a cache that stayed until the collector ran
    would hold 3 GB at 7B through the update that follows the rollout."""
    import gc
    import weakref
    m, p = policy
    made, kind = [], engine._CascadeCache if cascade else engine._StaticCache

    class Watched(kind):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))
    monkeypatch.setattr(engine, kind.__name__, Watched)
    batch = model.encode(p, clips(2, seed=5), 56 * 56, [model.chat_text(p, ANSWER)] * 2)
    tok = p.tokenizer
    gc.collect()
    gc.disable()
    try:
        engine.decode(m, batch, 4, 8, engine.end_ids(tok), engine.banned_ids(tok), tok.pad_token_id, cascade=cascade)
        assert len(made) == 1 and made[0]() is None
    finally:
        gc.enable()


def test_a_failed_compile_falls_back_to_the_function_once(monkeypatch, capsys):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no working C compiler\nmore")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(engine, "_COMPILED", {})
    square = engine._compiled(torch.square)
    x = torch.arange(3.0)
    assert square(x).tolist() == square(x).tolist() == [0.0, 1.0, 4.0]
    err = capsys.readouterr().err
    assert err.count("torch.compile of square failed (no working C compiler); it runs uncompiled") == 1


def check_cascade_attention(kernels=None):
    """`_cascade_attention` through a `_CascadeCache`, step after step, against plain softmax attention of each row
    over its prompt (left padding masked) and its own completion so far, grouped-query heads included, the prompt
    stored in pieces (one of them all padding); each step's key and value land in the row's buffer. `kernels`: the
    module whose Triton kernels the cache runs (the GPU's path), else the torch path."""
    torch.manual_seed(0)
    # (prompts, G, kv heads, q heads per kv head, head dim, prompt length, pieces, steps); the second: a head dim
    # that is not a power of two, a completion longer than the kernel's block of keys
    for prompts, group, kv, per, dim, plen, chunks, steps in ((2, 3, 2, 3, 8, 7, 3, 5), (2, 2, 1, 2, 12, 40, 2, 66)):
        rows = prompts * group
        prompt_k, prompt_v = torch.randn(2, prompts, kv, plen, dim)
        attention = torch.ones(prompts, plen, dtype=torch.long)
        attention[1, :3] = 0

        class Prefill:
            layers = [type("L", (), {"keys": prompt_k, "values": prompt_v})]

        cache = engine._CascadeCache(Prefill, attention, group, steps + 2, engine._attend_math, chunks=chunks)
        cache.kernels = kernels
        own_k, own_v = torch.randn(2, rows, kv, steps, dim)
        for t in range(steps):
            query = torch.randn(rows, 1, kv * per, dim).transpose(1, 2)  # strided, as the layers give it
            value = own_v[:, :, t:t + 1].transpose(1, 2).contiguous().transpose(1, 2)  # other strides than the key's
            cache.advance(torch.tensor([t]))
            key, value = cache.update(own_k[:, :, t:t + 1], value, 0)
            ours, _ = engine._cascade_attention(mock.Mock(layer_idx=0), query, key, value, cache, scaling=0.3)
            for r in range(rows):
                seen = attention[r // group].bool()
                k = torch.cat([prompt_k[r // group][:, seen], own_k[r, :, :t + 1]], 1).repeat_interleave(per, 0)
                v = torch.cat([prompt_v[r // group][:, seen], own_v[r, :, :t + 1]], 1).repeat_interleave(per, 0)
                want = torch.nn.functional.scaled_dot_product_attention(query[r], k, v, scale=0.3)  # [heads, 1, dim]
                torch.testing.assert_close(ours[r, 0], want[:, 0], rtol=1e-5, atol=1e-5)
        assert torch.equal(cache.keys[0][:, :, :steps], own_k) and torch.equal(cache.values[0][:, :, :steps], own_v)
        assert not cache.keys[0][:, :, steps:].any()


def test_cascade_attention_equals_attention_over_the_whole_row():
    check_cascade_attention()


def test_triton_cascade_attention_equals_attention_over_the_whole_row():
    """The same check of the GPU's two-kernel shared-prompt attention (`kernels.cascade_decode`, which also writes
    each step's key and value itself), run by Triton's interpreter on the CPU."""
    pytest.importorskip("triton")
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_engine; "
            "from autobuster import kernels; test_engine.check_cascade_attention(kernels); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], env=os.environ | {"TRITON_INTERPRET": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def repeat(batch, n):
    """The oracle's input: every prompt and its video repeated n times, as Hugging Face would see G samples."""
    out = {k: v.repeat_interleave(n, 0) for k, v in batch.items() if k != "pixel_values_videos"}
    chunks = batch["pixel_values_videos"].split(batch["video_grid_thw"].prod(-1).tolist())
    return out | {"pixel_values_videos": torch.cat([c for c in chunks for _ in range(n)])}


def test_token_logprobs_match_a_full_forward(policy):
    """Values and gradients against Hugging Face's forward over each prompt + completion row on its own; the two
    prompts differ in length (left padding), and the engine packs each prompt's completions behind it."""
    m, p = policy
    batch = model.encode(p, clips(2), 56 * 56,
                         [model.chat_text(p, ANSWER, "no_think"), model.chat_text(p, ANSWER)])
    assert batch["attention_mask"].min() == 0  # the shorter prompt is padded
    done = engine.generate(m, p, batch, num_samples=3, max_new_tokens=12)
    weight = torch.randn(done.ids.shape, generator=torch.Generator().manual_seed(0))
    params = [m.model.visual.patch_embed.proj.weight, m.model.language_model.layers[0].self_attn.q_proj.weight,
              m.model.language_model.layers[1].mlp.down_proj.weight]
    ours = engine.token_logprobs(m, batch, done.ids, prompt_of_row=torch.arange(2).repeat_interleave(3))
    ours_grad = torch.autograd.grad((ours * weight).sum(), params)
    rows = repeat(batch, 3)
    full = torch.cat([rows["input_ids"], done.ids], 1)
    mask = torch.cat([rows["attention_mask"], torch.ones_like(done.ids)], 1)
    logits = m(**{**rows, "input_ids": full, "attention_mask": mask,
                  "mm_token_type_ids": torch.cat([rows["mm_token_type_ids"], torch.zeros_like(done.ids)], 1)
                  }).logits
    ref = logits[:, rows["input_ids"].shape[1] - 1:-1].float().log_softmax(-1)
    ref = ref.gather(-1, done.ids.unsqueeze(-1)).squeeze(-1)
    ref_grad = torch.autograd.grad((ref * weight).sum(), params)
    assert torch.allclose(ours, ref, atol=1e-4)
    for a, b in zip(ours_grad, ref_grad):
        assert b.abs().max() > 0 and torch.allclose(a, b, atol=1e-4, rtol=1e-3)
    # a subset of rows (a micro-batch) gives the same values, whichever prompts it touches
    part = torch.tensor([2, 4, 5])
    with torch.no_grad():
        sub = engine.token_logprobs(m, batch, done.ids[part], prompt_of_row=torch.tensor([0, 1, 1]))
    assert torch.allclose(sub, ref[part].detach(), atol=1e-4)
    # the rollout's video features are the tower's, and serve the update of a frozen tower
    with torch.no_grad():
        fresh = engine.video_features(m, batch)
        again = engine.token_logprobs(m, batch, done.ids, prompt_of_row=torch.arange(2).repeat_interleave(3),
                                      features=done.features)
    assert done.features.keys() == fresh.keys() and all(torch.equal(done.features[i], fresh[i]) for i in fresh)
    assert torch.allclose(again, ref.detach(), atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3.5"])
def test_packed_update_matches_per_row_forward_with_lora(policy, monkeypatch, family):
    """The update's packed pass under LoRA, checkpointing on some layers and not others, uneven rows per prompt:
    log-probs and LoRA gradients against Hugging Face's forward of each row alone (which computes its own M-RoPE
    positions, 3-D video ones included). On Qwen3.5 each completion's Gated DeltaNet states must start from its
    prompt's, not from the completion packed before it."""
    from peft import LoraConfig, get_peft_model
    m, p = policy
    side, targets, fmt = 56, "(q|k|v|o)_proj", ANSWER
    if family == "qwen3.5":
        m, p = tiny.build_qwen3_5(p.tokenizer), tiny.build_qwen3_5_processor(p.tokenizer, 64 * 64)
        side, targets, fmt = 64, "(q_proj|k_proj|v_proj|o_proj|in_proj_qkv|in_proj_z|out_proj)", BOXED
    torch.manual_seed(1)
    lora = get_peft_model(copy.deepcopy(m), LoraConfig(r=4, target_modules=rf".*language_model.*{targets}"))
    for name, w in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(w, std=0.1)
    lora.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = model.encode(p, clips(2, seed=9), side * side,
                         [model.chat_text(p, fmt), model.chat_text(p, fmt, "no_think")])
    assert batch["attention_mask"].min() == 0
    prompt_of_row = torch.tensor([0, 0, 0, 1])
    ids = engine.generate(lora.eval(), p, batch, num_samples=3, max_new_tokens=10).ids[:4]
    lora.train()
    weight = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2))
    params = [w for n, w in lora.named_parameters() if "lora_" in n]
    ref_rows = {k: v[prompt_of_row] for k, v in batch.items() if k != "pixel_values_videos"}
    chunks = batch["pixel_values_videos"].split(batch["video_grid_thw"].prod(-1).tolist())
    ref_rows["pixel_values_videos"] = torch.cat([chunks[i] for i in prompt_of_row.tolist()])
    logits = lora(**{**ref_rows, "input_ids": torch.cat([ref_rows["input_ids"], ids], 1),
                     "attention_mask": torch.cat([ref_rows["attention_mask"], torch.ones_like(ids)], 1),
                     "mm_token_type_ids": torch.cat([ref_rows["mm_token_type_ids"], torch.zeros_like(ids)], 1)}).logits
    ref = logits[:, ref_rows["input_ids"].shape[1] - 1:-1].float().log_softmax(-1)
    ref = ref.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ref_grad = torch.autograd.grad((ref * weight).sum(), params)
    n = len(m.model.language_model.layers)
    free = iter([10] + [0.5] * (n - 1))  # checkpointing "by memory" on a GPU whose memory runs short after a layer
    monkeypatch.setattr(engine, "_memory", lambda device: (next(free), 4))
    recomputed, checkpoint = [], engine.checkpoint
    monkeypatch.setattr(engine, "checkpoint", lambda fn, *a, **k: recomputed.append(fn) or checkpoint(fn, *a, **k))
    for checkpointing, layers in ((None, n), (1, 1), (0, 0), ("memory", n - 1)):
        recomputed.clear()
        ours = engine.token_logprobs(lora, batch, ids, prompt_of_row=prompt_of_row, checkpointing=checkpointing)
        assert recomputed.count(engine._packed_layer) == layers
        ours_grad = torch.autograd.grad((ours * weight).sum(), params)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        assert sum(g.abs().sum() > 0 for g in ref_grad) == len(params)  # every adapter matrix gets a gradient
        for a, b in zip(ours_grad, ref_grad):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert next(free, None) is None  # "memory" asked before each layer
    assert m.config.text_config._attn_implementation == "sdpa"  # the switch is undone


def test_a_bf16_update_runs_its_fp32_adapters_in_bf16_and_the_delta_rule_in_fp32(policy, monkeypatch):
    """A bf16 Qwen3.5 with LoRA's weights in fp32 (as peft keeps them): the update's adapters take bf16 inputs
    under autocast, the Gated DeltaNet delta rule runs without it, and log-probs and LoRA gradients are those of
    the same weights in fp32, to bf16's precision."""
    from peft import LoraConfig, get_peft_model
    tok = policy[1].tokenizer
    m, p = tiny.build_qwen3_5(tok), tiny.build_qwen3_5_processor(tok, 64 * 64)
    torch.manual_seed(1)
    lora = get_peft_model(m, LoraConfig(r=4, target_modules=r".*language_model.*(q_proj|v_proj|in_proj_qkv)"))
    for name, w in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(w, std=0.1)
    batch = model.encode(p, clips(2, seed=9), 64 * 64, [model.chat_text(p, BOXED), model.chat_text(p, BOXED)])
    ids = engine.generate(lora.eval(), p, batch, num_samples=2, max_new_tokens=10).ids
    half = copy.deepcopy(lora).to(torch.bfloat16)
    for name, w in half.named_parameters():
        if "lora_" in name:
            w.data = w.data.float()
    weight = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2))
    prompt_of_row = torch.arange(2).repeat_interleave(2)
    seen = []  # (what was called, autocast on, its first input's dtype)
    for net in (lora, half):
        net.base_model.model.model.language_model.layers[0].linear_attn.in_proj_qkv.lora_A["default"] \
            .register_forward_pre_hook(lambda mod, args: seen.append(("lora", None, args[0].dtype)))
    qwen3_5 = sys.modules[type(m.model.language_model.layers[0].linear_attn).__module__]
    rule = qwen3_5.torch_chunk_gated_delta_rule
    monkeypatch.setattr(qwen3_5, "torch_chunk_gated_delta_rule", lambda q, *a, **k: seen.append(
        ("rule", torch.is_autocast_enabled("cpu"), q.dtype)) or rule(q, *a, **k))
    results = []
    for net in (lora.train(), half.train()):
        params = [w for n, w in net.named_parameters() if "lora_" in n]
        ours = engine.token_logprobs(net, batch, ids, prompt_of_row=prompt_of_row, checkpointing=True)
        results.append((ours.float(), torch.autograd.grad((ours.float() * weight).sum(), params)))
        assert all(g.dtype == torch.float32 for g in results[-1][1])
    assert set(seen) == {("lora", None, torch.float32), ("lora", None, torch.bfloat16),  # each model's dtype
                         ("rule", False, torch.float32), ("rule", False, torch.bfloat16)}
    (full, full_grad), (bf16, bf16_grad) = results
    torch.testing.assert_close(bf16, full, rtol=0, atol=0.1)
    for a, b in zip(bf16_grad, full_grad):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.99


def test_micro_batches_keep_to_the_packed_token_budget():
    group = torch.arange(3).repeat_interleave(4)  # 3 prompts x 4 completions; prompt 10 tokens, completion 5
    cut = engine.micro_batches(torch.arange(12), group, 10, 5, 40)
    # one prompt + 4 completions = 30 tokens; rows 4-5 would add a second prompt: 2 x (10 + 4 x 5) = 60 > 40
    assert [c.tolist() for c in cut] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    cut = engine.micro_batches(torch.arange(2, 10), group, 10, 5, 45)  # 2 x (10 + 2 x 5) = 40 fits, then 50 not
    assert [c.tolist() for c in cut] == [[2, 3, 4, 5], [6, 7, 8, 9]]
    assert [c.tolist() for c in engine.micro_batches(torch.arange(3), group, 10, 5, 1)] == [[0], [1], [2]]
    assert engine.micro_batches(torch.arange(0), group, 10, 5, 40) == []


def test_every_mlp_of_the_prefill_and_the_decode_steps_runs_its_silu_product_in_one_call(policy, monkeypatch):
    """`_fused_mlps`: the frozen tower's and the language model's MLPs compute SiLU(gate) * up in `_silu_mul`, one
    compiled kernel on a GPU (the outputs stay Hugging Face's: test_greedy_matches_hf_generate runs through it)."""
    m, p = policy
    seen = []
    monkeypatch.setattr(engine, "_silu_mul", lambda g, u: seen.append(tuple(g.shape[:-1])) or
                        torch.nn.functional.silu(g) * u)
    batch = model.encode(p, clips(1), 56 * 56, model.chat_text(p, ANSWER))
    engine.generate(m, p, batch, greedy=True, max_new_tokens=3)
    layers, blocks = len(m.model.language_model.layers), len(m.model.visual.blocks)
    patches, prompt = int(batch["video_grid_thw"].prod()), batch["input_ids"].shape[1]
    # the tower's MLPs over its patches, the language model's over the prompt, then over 2 decode steps' tokens
    assert seen == [(patches,)] * blocks + [(1, prompt)] * layers + [(1, 1)] * (2 * layers)


def test_every_residual_add_of_a_decode_step_runs_in_one_call_with_the_norm_after_it(policy, monkeypatch):
    """`_decode_layers`: in each decode step every residual add but none before the first layer (two per layer,
    the last one with the final norm) goes through `_add_rms_norm`, one compiled kernel on a GPU, and the prefill
    runs the layers as they are (the outputs stay Hugging Face's: the greedy tests of both families run through
    it)."""
    m, p = policy
    seen = []
    add_norm = engine._add_rms_norm
    monkeypatch.setattr(engine, "_add_rms_norm", lambda *a: seen.append(a[0].shape[1]) or add_norm(*a))
    batch = model.encode(p, clips(1), 56 * 56, model.chat_text(p, ANSWER))
    engine.generate(m, p, batch, greedy=True, max_new_tokens=3)
    assert seen == [1] * (2 * 2 * len(m.model.language_model.layers))  # 2 decode steps


def test_sampling_follows_the_softmax(policy):
    """Empirical first-token frequencies of 4,000 samples against softmax(logits / T) of a plain forward."""
    m, p = policy
    batch = model.encode(p, clips(1), 56 * 56, model.chat_text(p, ANSWER))
    n, temperature = 4000, 1.7
    done = engine.generate(m, p, batch, num_samples=n, max_new_tokens=1, temperature=temperature)
    with torch.no_grad():
        logits = m(**batch).logits[0, -1].float()
    logits[engine.banned_ids(p.tokenizer)] = float("-inf")
    prob = (logits / temperature).softmax(-1)
    freq = torch.bincount(done.ids[:, 0], minlength=len(prob)).float() / n
    assert prob.max() < 0.9  # a spread-out distribution, or the test would prove little
    assert ((freq - prob).abs() <= 5 * (prob * (1 - prob) / n).sqrt() + 1e-3).all()


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3.5"])
def test_rollouts_see_the_lora_weights_and_leave_the_base_intact(policy, family):
    """Decoding with the adapter merged, its q/k/v, gate/up (and Qwen3.5's in_proj_qkv/z) projections each one
    matmul (`engine.merged_lora`): token for token Hugging Face's generate through peft, base weights untouched."""
    from peft import LoraConfig, get_peft_model
    m, p = policy
    if family == "qwen3.5":
        m, p = tiny.build_qwen3_5(p.tokenizer).eval(), tiny.build_qwen3_5_processor(p.tokenizer, 64 * 64)
    torch.manual_seed(0)  # the adapter's random weights
    # every linear layer of the language model: with a thought of distinct words a warm-started model can write it
    # from the current token alone, so an adapter on q_proj / v_proj only has been seen to change nothing
    peft_model = get_peft_model(copy.deepcopy(m), LoraConfig(r=4, target_modules=r".*language_model.*_(proj|qkv|z)"))
    for name, w in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(w, std=0.5)  # peft starts B at zero: make the adapter change the outputs
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    fmt = BOXED if family == "qwen3.5" else ANSWER
    batch = model.encode(p, clips(3, seed=7), 56 * 56, model.chat_text(p, fmt))
    lora_forward = type(peft_model.base_model.model.model.language_model.layers[0].mlp.up_proj).forward
    with (mock.patch.object(engine, "_fuse", wraps=engine._fuse) as fuse,
          mock.patch.object(type(peft_model.base_model.model.model.language_model.layers[0].mlp.up_proj), "forward",
                            autospec=True, side_effect=lora_forward) as own):
        ours = engine.generate(peft_model, p, batch, greedy=True, max_new_tokens=16)
    assert fuse.call_count == 2 * len(m.model.language_model.layers)  # each layer's mixer and MLP
    members = {x for call in fuse.call_args_list for x in call.args[0]}
    assert not any(call.args[0] in members for call in own.call_args_list)  # none ran on its own: one matmul each
    ref = peft_model.generate(**batch, do_sample=False, max_new_tokens=16, eos_token_id=engine.end_ids(p.tokenizer),
                              pad_token_id=p.tokenizer.pad_token_id, suppress_tokens=engine.banned_ids(p.tokenizer))
    ref = ref[:, batch["input_ids"].shape[1]:]
    base = engine.generate(m, p, batch, greedy=True, max_new_tokens=16)
    # the oracle first: Hugging Face's generate with the adapter differs from the base model's completions ...
    assert ref[:, :base.ids.shape[1]].tolist() != base.ids[:, :ref.shape[1]].tolist()
    for i in range(3):  # ... and ours follow it token for token
        k = int(ours.lengths[i])
        assert ours.ids[i, :k].tolist() == ref[i, :k].tolist()
    after = peft_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sampling_ignores_shipped_top_k_and_never_samples_special_tokens(policy):
    m, p = policy
    m.generation_config.top_k = 1  # as Qwen2.5-VL ships it: would make all G samples identical
    batch = model.encode(p, clips(1), 56 * 56, model.chat_text(p, ANSWER))
    # the warm start writes one fixed thought, so samples differ mostly in the letter (P(A) ~0.6): with 8 of them
    # all 8 agree ~2 % of the time; with 32, never in practice
    done = engine.generate(m, p, batch, num_samples=32, max_new_tokens=32)
    assert len(set(done.texts)) > 1
    banned = set(engine.banned_ids(p.tokenizer))
    assert not any(t in banned for t in done.ids[done.mask.bool()].tolist())


def test_completion_mask_includes_the_first_end_token():
    ids = torch.tensor([[5, 6, 9, 7, 7], [5, 8, 6, 6, 6], [9, 5, 5, 5, 5]])
    mask, truncated = engine.completion_mask(ids, [8, 9])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, False, False]
    assert engine.completion_mask(torch.tensor([[1, 2]]), [8, 9])[1].tolist() == [True]


def test_video_goes_in_at_4_fps(policy):
    m, p = policy
    batch = model.encode(p, clips(1), 56 * 56, model.chat_text(p, ANSWER))
    assert batch["second_per_grid_ts"].tolist() == [0.5]
    pos, _ = m.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                    video_grid_thw=batch["video_grid_thw"],
                                    second_per_grid_ts=batch["second_per_grid_ts"],
                                    attention_mask=batch["attention_mask"])
    video = batch["input_ids"][0] == p.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    temporal = pos[0, 0, video].unique()
    assert len(temporal) == 8 and (temporal.diff() > 0).all()  # 16 frames / temporal patch 2, all distinct


def test_four_bit_load_keeps_vision_and_lm_head_unquantised(tiny_home):
    import bitsandbytes as bnb
    m, p = model.load(active().model, four_bit=True)
    lm = m.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(lm, bnb.nn.Linear4bit)
    assert not any(isinstance(x, bnb.nn.Linear4bit) for x in m.model.visual.modules())
    assert not isinstance(m.lm_head, bnb.nn.Linear4bit)
    done = engine.generate(m, p, model.encode(p, clips(1), 56 * 56, model.chat_text(p, ANSWER)), greedy=True,
                           max_new_tokens=8)
    assert done.ids.shape[0] == 1


@pytest.mark.parametrize("grids", [[[2, 4, 4], [4, 12, 20], [2, 22, 10], [1, 16, 16]], [[2, 16, 16], [4, 16, 16]]],
                         ids=["windows-of-several-sizes", "windows-of-one-size"])
def test_batched_vision_windows_match_the_hf_tower(grids):
    """The tower with one attention call per window length equals Hugging Face's call per window, values and
    gradients, on videos whose windows differ in size (grids not multiples of the window) and on videos whose
    windows are all of one size (taken as views of the tokens)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (Qwen2_5_VisionTransformerPretrainedModel,
                                                                    Qwen2_5_VLVisionConfig)
    torch.manual_seed(0)
    config = Qwen2_5_VLVisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48,
                                    fullatt_block_indexes=[1, 3], window_size=112)
    config._attn_implementation = "sdpa"
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config).float()
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    weight = tower.patch_embed.proj.weight

    def run():
        out = tower(pixels, grid_thw=grid)
        return out.pooler_output, out.last_hidden_state, torch.autograd.grad(out.pooler_output.square().sum(), weight)[0]

    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    ref = run()
    with engine.attention_as(tower.config, engine.WINDOWS):
        try:
            torch.nn.functional.scaled_dot_product_attention = lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k)
            ours = run()
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa
    assert tower.config._attn_implementation == "sdpa"  # restored
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    lengths = {int(s[2]) for s in calls}
    assert len(calls) <= 4 * len(lengths)  # a call per window length and layer, not per window
    assert (len(calls) == 4) == (len(grids) == 2)  # one per layer where each layer's windows are of one size


def test_odd_width_vision_layers_run_padded_with_the_same_result():
    """Qwen2.5-VL's vision MLP is 3,420 wide, not a multiple of 8 (cuBLAS's slow kernels in bf16): the engine runs
    such layers with zero-padded weights (`engine._vision_kernels`) where no gradient flows: the same outputs."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (Qwen2_5_VisionTransformerPretrainedModel,
                                                                    Qwen2_5_VLVisionConfig)
    torch.manual_seed(0)
    config = Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=60, num_heads=2, out_hidden_size=48,
                                    fullatt_block_indexes=[1], window_size=112)
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config).float()
    grid = torch.tensor([[2, 4, 4], [2, 8, 12]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    mlp = tower.blocks[0].mlp
    ref = tower(pixels, grid_thw=grid).pooler_output
    linear = torch.nn.functional.linear
    with (torch.no_grad(), engine._vision_kernels(tower),
          mock.patch.object(torch.nn.functional, "linear", wraps=linear) as calls):
        ours = tower(pixels, grid_thw=grid).pooler_output
    assert {tuple(c.args[1].shape) for c in calls.call_args_list} >= {(64, 32), (32, 64)}  # 60 padded to 64
    assert not any("forward" in x.__dict__ for x in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))  # restored
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    with engine._vision_kernels(tower):  # with gradients (a trained tower) the layers run as they are
        assert not any("forward" in x.__dict__ for x in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3.5"])
def test_the_patch_embedding_runs_as_a_matmul_with_the_same_outputs_and_gradients(family):
    """Both families embed each 2 x P x P patch with a Conv3d whose kernel is the whole patch (Qwen3.5's with a
    bias): `engine._vision_kernels` runs it as one matmul, with or without gradients, and no conv runs."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionConfig, Qwen3_5VisionPatchEmbed
    torch.manual_seed(0)
    embed = (Qwen2_5_VisionPatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=40)
             if family == "qwen2.5-vl" else
             Qwen3_5VisionPatchEmbed(Qwen3_5VisionConfig(patch_size=16, temporal_patch_size=2, hidden_size=40)))
    pixels = torch.randn(30, 3 * 2 * embed.patch_size ** 2, requires_grad=True)
    params = [pixels, *embed.parameters()]
    ref = embed(pixels)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    conv3d = torch.nn.functional.conv3d
    with engine._vision_kernels(embed), mock.patch.object(torch.nn.functional, "conv3d", wraps=conv3d) as conv:
        ours = embed(pixels)
        grads = torch.autograd.grad(ours.square().sum(), params)
    assert not conv.called and "forward" not in embed.proj.__dict__  # a matmul; the conv's forward put back after
    assert len(params) == (2 if family == "qwen2.5-vl" else 3)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):  # sums over 30 patches in another order: fp32 rounding of their scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
