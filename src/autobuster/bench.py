"""`autobuster bench`: the engine against the plain Hugging Face path, in one run, at a real Qwen2.5-VL or Qwen3.5
size with random weights (nothing is downloaded). Random weights never emit the end token on purpose, so every row
decodes the full length; the decode floor (weights + KV cache + linear-attention states read once per step at the
measured copy bandwidth) is worked out for the same setting.

    uv run autobuster bench --size 7b --frames 16 --side 448 --prompts 8 --group 8 --new-tokens 512
    uv run autobuster bench --family qwen3.5 --size 4b
"""
import json
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2_5_VLConfig, Qwen3_5Config

from . import distributed, engine
from .errors import UserError
from .families import QWEN2_5_VL, QWEN3_5, Family, family_named, family_of_model
from .model import default_device, lora_targets, nf4
from .profiles import PROFILES

TEXT = {  # language-model shapes of the public checkpoints
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=152064),
}
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,  # the same tower for 3B and 7B
              fullatt_block_indexes=[7, 15, 23, 31])
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1])
SPECIAL = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
SPECIAL_FROM = 151643  # ids from here up are Qwen's special tokens: never sampled (a sampled <|video_pad|> breaks
# the next forward), as engine.banned_ids does with a real tokenizer
# Qwen3.5 (Qwen/Qwen3.5-4B's config; the layers are three Gated DeltaNet ones, then one with full attention)
TEXT_3_5 = {
    "4b": dict(hidden_size=2560, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=16,
               num_key_value_heads=4, head_dim=256, vocab_size=248320, linear_num_key_heads=16,
               linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
               rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                "mrope_section": [11, 11, 10], "mrope_interleaved": True}),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=248320, linear_num_key_heads=2,
                 linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.5,
                                  "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
}
VISION_3_5 = {
    "4b": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, num_position_embeddings=2304),
    "tiny": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=256),
}
SPECIAL_3_5 = dict(image_token_id=248056, video_token_id=248057, vision_start_token_id=248053,
                   vision_end_token_id=248054)
SPECIAL_FROM_3_5 = 248044
TEXT_TOKENS = 142  # the BusterX++ prompt and chat template around the video (2,190 - 2,048 at 448²)
STAMP_TOKENS = 4  # Qwen3.5: the "<0.1 seconds>" text before each frame pair
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj")  # as train_dapo.py


@dataclass(frozen=True)
class Shapes:
    """What the bench builds for one model family at one size."""
    family: Family
    config: object  # the model's config
    special: dict  # the vision token ids
    special_from: int  # first special token id (never sampled)
    per_pair: bool  # each frame pair is its own vision run after a timestamp (Qwen3.5) or one run per video


def shapes(family: str, size: str) -> Shapes:
    if family_named(family) is QWEN3_5:
        if size not in TEXT_3_5:
            raise UserError(f"unknown --size {size!r} for {family}: use one of {', '.join(TEXT_3_5)}")
        text = TEXT_3_5[size] | dict(max_position_embeddings=262144, rms_norm_eps=1e-6, linear_conv_kernel_dim=4)
        cfg = Qwen3_5Config(text_config=text, vision_config=VISION_3_5[size] | dict(
            out_hidden_size=text["hidden_size"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2),
            tie_word_embeddings=size == "4b", **SPECIAL_3_5)
        return Shapes(QWEN3_5, cfg, SPECIAL_3_5, SPECIAL_FROM_3_5, True)
    if size not in TEXT:
        raise UserError(f"unknown --size {size!r}: use one of {', '.join(TEXT)}")
    return Shapes(QWEN2_5_VL, config(size), SPECIAL, SPECIAL_FROM, False)


def config(size: str) -> Qwen2_5_VLConfig:
    vision = TINY_VISION if size == "tiny" else VISION
    text = TEXT[size] | dict(max_position_embeddings=128000, rms_norm_eps=1e-6,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]
                                              if size != "tiny" else [2, 3, 3]})
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision | dict(out_hidden_size=text["hidden_size"], patch_size=14,
                                                      spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                                                      tokens_per_second=2),
        tie_word_embeddings=size == "3b", **SPECIAL)


def random_model(size: str, four_bit: bool, device: torch.device, family: str = "qwen2.5-vl"):
    """Random weights at the real shapes; 4-bit goes through a saved checkpoint, as a real one is loaded."""
    shape = shapes(family, size)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = shape.family.model_class._from_config(shape.config, dtype=dtype)
    if four_bit:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            del model
            torch.cuda.empty_cache()
            model = shape.family.model_class.from_pretrained(
                tmp, dtype=dtype, quantization_config=nf4(dtype, shape.family), device_map={"": device})
    return model.eval()


def prompts(n: int, frames: int, side: int, seed: int = 0, shape: Shapes | None = None) -> dict:
    """A batch shaped like encode()'s: chat text around one video of `frames` frames at side² (random pixels)."""
    shape = shape or shapes("qwen2.5-vl", "7b")
    g = torch.Generator().manual_seed(seed)
    sp, patch = shape.special, shape.config.vision_config.patch_size
    t, h = frames // 2, side // patch // 2 * 2
    text = torch.randint(0, shape.special_from, (n, TEXT_TOKENS + t * STAMP_TOKENS), generator=g)
    start, end = torch.full((n, 1), sp["vision_start_token_id"]), torch.full((n, 1), sp["vision_end_token_id"])
    if shape.per_pair:  # each frame pair: its timestamp, then its own vision run
        at = TEXT_TOKENS
        pairs = [[text[:, at + i * STAMP_TOKENS:at + (i + 1) * STAMP_TOKENS], start,
                  torch.full((n, h * h // 4), sp["video_token_id"]), end] for i in range(t)]
        video = torch.cat([x for pair in pairs for x in pair], 1)
    else:
        video = torch.cat([start, torch.full((n, t * h * h // 4), sp["video_token_id"]), end], 1)
    ids = torch.cat([text[:, :15], video, text[:, 17:TEXT_TOKENS]], 1)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                 mm_token_type_ids=(ids == sp["video_token_id"]).long() * 2,
                 pixel_values_videos=torch.randn(n * t * h * h, 3 * 2 * patch * patch, generator=g),
                 video_grid_thw=torch.tensor([[t, h, h]] * n))
    return batch if shape.per_pair else batch | dict(second_per_grid_ts=torch.tensor([0.5] * n))


def special(model) -> list[int]:
    first = SPECIAL_FROM_3_5 if family_of_model(model) is QWEN3_5 else SPECIAL_FROM
    return list(range(first, model.config.text_config.vocab_size))


@contextmanager
def clock(out: dict, key: str):
    """Wall seconds of the block into out[key], with the GPU drained on both sides."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    yield
    sync()
    out[key] = time.perf_counter() - t0


def peak_gb(reset: bool = False) -> float:
    if not torch.cuda.is_available():
        return 0.0
    gb = torch.cuda.max_memory_allocated() / 1e9
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return gb


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (the decode floor's denominator)."""
    if not torch.cuda.is_available():
        return float("nan")
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    r = {}
    with clock(r, "s"):
        for _ in range(10):
            y.copy_(x)
    return 2 * 10 * x.numel() / r["s"]


def engine_rollout(model, batch, group, new, r):
    """Vision + prefill + first token, then the full rollout: (ids, what the update takes from it)."""
    kw = dict(ends=[], banned=special(model), pad=0)
    engine.decode(model, batch, group, 2, **kw)  # warm-up: kernels, allocator, graph capture
    with clock(r, "prefill_s"):
        engine.decode(model, batch, group, 1, **kw)
    peak_gb(reset=True)
    with clock(r, "rollout_s"), torch.no_grad():
        features = engine.video_features(model, batch)
        ids, _ = engine.decode(model, batch, group, new, features=features, **kw)
    r["rollout_peak_gb"] = peak_gb(reset=True)
    return ids, dict(features=features)


def engine_update(model, batch, ids, group, micro_tokens, r, checkpointing="memory", features=None):
    """Old log-probs (no grad) and one forward/backward over every completion, micro-batched by token budget;
    under torchrun the gradients are summed over the ranks, as train_dapo.py does. `checkpointing` as
    train_dapo.py's GRADIENT_CHECKPOINTING. The 7B tower is frozen: the rollout's video `features` serve every
    pass, as in train_dapo.py."""
    prompt_of_row = torch.arange(len(batch["input_ids"])).repeat_interleave(group)
    micro = engine.micro_batches(torch.arange(len(ids)), prompt_of_row, batch["input_ids"].shape[1], ids.shape[1],
                                 micro_tokens)
    adv = torch.randn(len(ids), device=ids.device)
    batch = {k: v.to(ids.device) for k, v in batch.items()}
    with clock(r, "update_s"):
        with torch.no_grad():
            old = [engine.token_logprobs(model, batch, ids[p], prompt_of_row=prompt_of_row[p], features=features)
                   for p in micro]
        for p, o in zip(micro, old):
            logp = engine.token_logprobs(model, batch, ids[p], prompt_of_row=prompt_of_row[p], features=features,
                                         checkpointing=checkpointing)
            (-(torch.exp(logp - o) * adv[p, None]).sum() / ids.numel()).backward()
        distributed.all_sum_grads([q for q in model.parameters() if q.requires_grad])
    r["update_peak_gb"] = peak_gb(reset=True)


def eval_throughput(model, clips, batch_size, new_tokens, frames, side, r, shape: Shapes | None = None):
    """The fixed evaluation's path as evaluate.py runs it: LoRA merged, greedy, `batch_size` clips per decode, the
    A/B logits tracked; random weights never end a reply, so every one runs to the cap."""
    kw = dict(ends=[], banned=special(model), pad=0, greedy=True, track_ids=[32, 33])
    batches = [prompts(min(batch_size, clips - i), frames, side, seed=100 + i, shape=shape)
               for i in range(0, clips, batch_size)]
    with engine.merged_lora(model):
        engine.decode(model, batches[0], 1, 2, **kw)  # warm-up
        peak_gb(reset=True)
        with clock(r, "s"):
            for b in batches:
                engine.decode(model, b, 1, new_tokens, **kw)
    r.update(clips=clips, batch=batch_size, new_tokens=new_tokens, clips_per_s=clips / r["s"], peak_gb=peak_gb(True))


def plain_rollout(model, batch, group, new, r):
    """Hugging Face generate: every sample repeats the vision tower and the prefill."""
    batch = {k: v.to(model.device) for k, v in batch.items()}
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=group,
              suppress_tokens=special(model))
    model.generate(**batch, max_new_tokens=2, min_new_tokens=2, **kw)
    with clock(r, "prefill_s"):
        model.generate(**batch, max_new_tokens=1, min_new_tokens=1, **kw)
    peak_gb(reset=True)
    with clock(r, "rollout_s"):
        out = model.generate(**batch, max_new_tokens=new, min_new_tokens=new, **kw)
    r["rollout_peak_gb"] = peak_gb(reset=True)
    return out[:, batch["input_ids"].shape[1]:], {}


def plain_update(model, batch, ids, group, rows_per_micro, r):
    """Full logits over prompt + completion, the vision tower once per sample, micro-batches of whole rows."""
    rep = {k: v.repeat_interleave(group, 0) for k, v in batch.items() if k != "pixel_values_videos"}
    pixels = batch["pixel_values_videos"].split(batch["video_grid_thw"].prod(-1).tolist())
    rep["pixel_values_videos"] = torch.cat([p for p in pixels for _ in range(group)])
    rep = {k: v.to(ids.device) for k, v in rep.items()}
    per_video = len(pixels[0])
    plen = rep["input_ids"].shape[1]

    def logprobs(p):
        ext = {k: v[p] for k, v in rep.items() if k != "pixel_values_videos"} | dict(
            input_ids=torch.cat([rep["input_ids"][p], ids[p]], 1),
            attention_mask=torch.cat([rep["attention_mask"][p], torch.ones_like(ids[p])], 1),
            mm_token_type_ids=torch.cat([rep["mm_token_type_ids"][p], torch.zeros_like(ids[p])], 1),
            pixel_values_videos=rep["pixel_values_videos"][p[0] * per_video:(p[-1] + 1) * per_video])
        logits = model(**ext).logits[:, plen - 1:-1].float()
        return logits.log_softmax(-1).gather(-1, ids[p].unsqueeze(-1)).squeeze(-1)

    micro = torch.arange(len(ids)).split(rows_per_micro)
    adv = torch.randn(len(ids), device=ids.device)
    with clock(r, "update_s"):
        with torch.no_grad():
            old = [logprobs(p) for p in micro]
        for p, o in zip(micro, old):
            (-(torch.exp(logprobs(p) - o) * adv[p, None]).sum() / ids.numel()).backward()
    r["update_peak_gb"] = peak_gb(reset=True)


def greedy_agreement(model, batch, n: int = 64) -> dict:
    """The engine's first n greedy tokens (one row per prompt) against Hugging Face.

    `free`: the share equal to generate's, position by position. `forced`: the share equal to the argmax of a
    plain full forward over the engine's own sequence (teacher-forced; `plain_forced` is the same check of
    generate's own tokens). With random weights the logits are near-uniform and bf16 rounding flips near-ties in
    any decoder, and one flipped tie makes the free-running sequences part for good; so both are also reported
    where the reference is clear of the noise. The noise is measured, not assumed: `noise` is the largest
    difference, over every position and token, between generate's logits and a full forward's over the same
    sequence (the same logits computed two ways in bf16). Where the full forward's top-1 leads its top-2 by more
    than `threshold` = 2 x noise, a decoder whose logits are that close must pick the same token. `forced_clear`
    is `forced` over those positions (`clear` of them), `free_clear` is `free` over the positions before each
    row's first unclear one in generate's sequence (`free_clear_positions` of them). `cascade_forced` and
    `cascade_forced_clear` are the same checks of the engine with two greedy rows per prompt, where it shares each
    prompt's cache (`cascade`)."""
    batch = {k: v.to(model.device) for k, v in batch.items()}
    first = special(model)[0]
    ours, _ = engine.decode(model, batch, 1, n, ends=[], banned=special(model), pad=0, greedy=True)
    gen = model.generate(**batch, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                         suppress_tokens=special(model), output_logits=True, return_dict_in_generate=True)
    ref = gen.sequences[:, -n:]

    def forced(ids):  # logits of a plain full forward over prompt + ids at the positions that predict ids
        ext = dict(batch, input_ids=torch.cat([batch["input_ids"], ids], 1),
                   attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(ids)], 1),
                   mm_token_type_ids=torch.cat([batch["mm_token_type_ids"], torch.zeros_like(ids)], 1))
        return model(**ext, logits_to_keep=n + 1).logits[:, :-1, :first].float()

    ours_forced, ref_forced = forced(ours), forced(ref)
    noise = (torch.stack(gen.logits, 1)[..., :first].float() - ref_forced).abs().max().item()
    threshold = 2 * noise

    def clear(logits):
        top = logits.topk(2, -1).values
        return top[..., 0] - top[..., 1] > threshold

    forced_ok = ours == ours_forced.argmax(-1)
    ours_clear = clear(ours_forced)
    before_tie = clear(ref_forced).long().cumprod(1).bool()  # positions before the row's first unclear one
    # the shared-prompt (cascade) path, which only runs with several rows per prompt: two greedy rows each
    pairs, _ = engine.decode(model, batch, 2, n, ends=[], banned=special(model), pad=0, greedy=True)
    pair_ok = torch.stack([pairs[j::2] == forced(pairs[j::2]).argmax(-1) for j in range(2)])
    pair_clear = torch.stack([clear(forced(pairs[j::2])) for j in range(2)])
    return dict(cascade=engine.uses_cascade(model, 2), cascade_forced=pair_ok.float().mean().item(),
                cascade_forced_clear=pair_ok[pair_clear].float().mean().item(),
                free=(ours == ref).float().mean().item(), forced=forced_ok.float().mean().item(),
                plain_forced=(ref == ref_forced.argmax(-1)).float().mean().item(), noise=noise,
                threshold=threshold, forced_clear=forced_ok[ours_clear].float().mean().item(),
                clear=ours_clear.float().mean().item(), free_clear=(ours == ref)[before_tie].float().mean().item(),
                free_clear_positions=int(before_tie.sum()))


def with_lora(model):
    """LoRA as train_dapo.py puts it; HF's gradient checkpointing on, for the plain path (the engine's update
    chooses its own, `checkpointing`)."""
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=lora_targets(LORA_MODULES)))
    lora.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora.enable_input_require_grads()
    return lora


def bench(size="7b", frames=16, side=448, prompts_per_step=8, group=8, new_tokens=512, four_bit=False,
          plain=True, micro_tokens=16384, plain_micro_rows=8, check=False, out=None, eval_clips=64,
          eval_batch=PROFILES["genbuster"].eval_batch, eval_new_tokens=PROFILES["genbuster"].eval_max_new_tokens,
          checkpointing="memory", family="qwen2.5-vl"):
    shape = shapes(family, size)
    if frames % 2 or side < 56:
        raise UserError("--frames must be even and --side at least 56")
    rank, world = distributed.init()  # under torchrun: one DAPO step per rank, its own prompts, summed gradients
    plain = plain and world == 1
    device = default_device()
    model = random_model(size, four_bit, device, family)
    batch = prompts(prompts_per_step, frames, side, seed=rank, shape=shape)
    rows, plen = prompts_per_step * group, batch["input_ids"].shape[1]
    weights = "nf4" if four_bit else "bf16" if device.type == "cuda" else "fp32"
    setting = dict(family=family, size=size, frames=frames, side=side, prompt_tokens=plen, prompts=prompts_per_step,
                   group=group, rows=rows, new_tokens=new_tokens, weights=weights, gpus=world,
                   device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   cascade=engine.uses_cascade(model, group), checkpointing=checkpointing,
                   linear_kernels=engine.linear_attention_kernels(model))
    print(json.dumps(setting))
    result = dict(setting=setting, weights_gb=peak_gb(reset=True))
    if check:
        with torch.no_grad():
            result["greedy_agreement"] = greedy_agreement(model, batch)
        print("greedy agreement (first 64 tokens)", json.dumps(result["greedy_agreement"]), flush=True)
    model = with_lora(model)
    paths = [("engine", engine_rollout, partial(engine_update, checkpointing=checkpointing), micro_tokens)]
    if plain:
        paths.append(("plain", plain_rollout, plain_update, plain_micro_rows))
    for name, rollout, update, micro in paths:
        r = {}
        try:
            model.eval()
            with engine.merged_lora(model) if name == "engine" else torch.no_grad():
                ids, taken = rollout(model, batch, group, new_tokens, r)
            model.train()
            try:
                update(model, batch, ids, group, micro, r, **taken)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:  # a kernel that refuses this GPU (fla's backward on Hopper with old Triton)
                r["update_error"] = str(e).splitlines()[0]
            model.zero_grad(set_to_none=True)
        except torch.OutOfMemoryError:
            r["oom"] = True
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        if "rollout_s" in r:
            r["rollout_tokens_per_s"] = rows * new_tokens / r["rollout_s"]
            r["decode_ms_per_step"] = 1000 * (r["rollout_s"] - r["prefill_s"]) / (new_tokens - 1)
        if "update_s" in r:
            r["update_tokens_per_s"] = rows * new_tokens / r["update_s"]
            r["step_s"] = distributed.all_max(r["rollout_s"] + r["update_s"])  # the slowest rank sets the pace
            r["prompts_per_s"] = world * prompts_per_step / r["step_s"]
        result[name] = r
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    if eval_clips:
        model.eval()
        result["eval"] = r = {}
        eval_throughput(model, eval_clips, eval_batch, eval_new_tokens, frames, side, r, shape)
        print("eval", json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    bw = copy_bandwidth()
    text = model.config.text_config
    kinds = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * kinds.count("full_attention") * text.num_key_value_heads * head_dim * 2
    # a Gated DeltaNet layer reads and writes its fp32 recurrent state and its convolution state every step
    state_per_row = (kinds.count("linear_attention") * 2 * (
        4 * text.linear_num_value_heads * text.linear_key_head_dim * text.linear_value_head_dim
        + 2 * (2 * text.linear_num_key_heads * text.linear_key_head_dim
               + text.linear_num_value_heads * text.linear_value_head_dim) * text.linear_conv_kernel_dim)
        if "linear_attention" in kinds else 0)
    lm_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "visual" not in n)
    # a decode step reads every weight but the input embedding (it gathers one row per token; a tied one is the head)
    tied = model.config.tie_word_embeddings
    read = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if "visual" not in n and "lora_" not in n and (tied or "embed_tokens" not in n))
    chunks, piece, room = engine.cascade_layout(prompts_per_step, plen, text.num_key_value_heads, new_tokens + 2,
                                                device)
    kv_tokens = {  # KV one decode step reads, at the mean completion length
        "old": rows * (plen + new_tokens / 2),  # every row its own copy of its prompt (the floor printed first)
        "shared": prompts_per_step * plen + rows * new_tokens / 2,  # each prompt's KV once per group (cascade)
        # what the engine's decode reads: its whole static cache; if it shares them (cascade), each prompt once and
        # each row's own buffer, only as far as the row has come with the Triton kernels
        "path": (prompts_per_step * chunks * piece + rows * (new_tokens / 2 if engine.cascade_kernels(
            device, torch.bfloat16) else room)) if setting["cascade"] else rows * (plen + new_tokens + 2),
    }
    floor = dict(copy_tb_per_s=bw / 1e12, weights_read_gb=read / 1e9, states_gb=rows * state_per_row / 1e9)
    for name, tokens in kv_tokens.items():
        seconds = ((lm_bytes if name == "old" else read) + tokens * kv_per_token + rows * state_per_row) / bw
        floor |= {f"{name}_kv_gb": tokens * kv_per_token / 1e9, f"{name}_ms_per_step": 1000 * seconds,
                  f"{name}_tokens_per_s": rows / seconds}
    # the keys earlier JSONs have: the old floor
    result["floor"] = floor | dict(decode_ms_per_step=floor["old_ms_per_step"], tokens_per_s=floor["old_tokens_per_s"])
    if plain and "rollout_s" in result.get("plain", {}) and "rollout_s" in result["engine"]:
        e, p = result["engine"], result["plain"]
        result["ratios"] = dict(rollout=e["rollout_tokens_per_s"] / p["rollout_tokens_per_s"],
                                update=p.get("update_s", float("nan")) / e.get("update_s", float("nan")),
                                step=p.get("step_s", float("nan")) / e.get("step_s", float("nan")))
    print("floor", json.dumps(result["floor"]))
    if "ratios" in result:
        print("ratios", json.dumps(result["ratios"]))
    if out and rank == 0:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    distributed.close()
    return result
