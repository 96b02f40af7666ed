"""One DAPO experiment: LoRA on a Qwen2.5-VL or Qwen3.5 model, rewarded for telling real video from generated video.

This is the file the agent edits. Everything that defines the score (data, frames, prompt, evaluation) is
fixed and lives in prepare.py / evaluate.py / src/autobuster; everything about training is here, top to
bottom: constants, rewards, advantages, loss, the loop, the summary.

Run: uv run train_dapo.py   (after `uv run prepare.py`; the loop runs it as `uv run autobuster run "..."`)
On N GPUs: torchrun --standalone --nproc-per-node N train_dapo.py   (`autobuster run --gpus N` does this)
"""
import json
import math
import os
import re
import resource
import sys
import time
from itertools import zip_longest
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from autobuster import dataset, distributed, engine, evaluation
from autobuster.cli import guarded
from autobuster.model import chat_text, encode, load, lora_targets
from autobuster.profiles import active
from autobuster.prompt import MODES, thinks

SETUP = guarded(active)  # the profile prepare.py recorded: data, base model, time budget
TINY = SETUP.profile == "tiny"  # the tiny CPU model needs far larger steps than LoRA on a 7B model
TIME_BUDGET = SETUP.time_budget  # seconds of rollouts + updates, fixed per profile (not an experiment knob)
FORMAT = SETUP.model_family.format  # the prompt and reply format the fixed evaluation scores (prompt.py)

# ---------------------------------------------------------------- constants (edit these)
BASE_MODEL = SETUP.model  # the prepared base model (a Qwen2.5-VL or Qwen3.5 directory or hub id, e.g. BusterX++)
FOUR_BIT = False  # QLoRA: NF4 base weights, bf16 LoRA
LORA_RANK = 16
LORA_ALPHA = 32
LORA_DROPOUT = 0.0  # dropout would make the importance ratio noisy
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")  # attention: every Qwen2.5-VL layer, every 4th Qwen3.5 one
LORA_MODULES += ("in_proj_qkv", "in_proj_z", "out_proj")  # Qwen3.5's Gated DeltaNet layers (Qwen2.5-VL has none)
LORA_MODULES += ("gate_proj", "up_proj", "down_proj") if TINY else ()  # the MLPs
# The 7B vision tower is pretrained and stays frozen; the tiny one is a random 2-block ViT that has never learnt to
# see (frozen, even supervised training stays at chance; LoRA on it learns too slowly), so the tiny profile trains
# it in full and saves it with the adapter (peft's modules_to_save).
TRAIN_VISION = TINY
LEARNING_RATE = 5e-4 if TINY else 1e-5
VISION_LEARNING_RATE = 7e-4  # the tiny tower, trained in full from random blocks (faster rates leave stutter, the
# style learnt last, near chance more often: 1e-3 on the models that missed, 2e-3 more so; 4e-3 unlearnt checker
# and flicker; BENCHMARKS.md)
WARMUP = 0.05  # share of the time budget with a linear learning-rate warm-up
WARMDOWN = 0.5  # share of the budget at the end with a linear decay to FINAL_LR_FRACTION (steadies the last steps)
FINAL_LR_FRACTION = 0.1
AVERAGE_FROM = 1.0 if TINY else 0.6  # share of the budget after which the weights are averaged step by step; the
# mean is the model saved and scored. The tiny runs still learn when the budget ends, so 1.0 there (the last step
# alone): over 32 runs the last weights beat the mean from 0.6 in 26, by 0.022 val F1 on average (BENCHMARKS.md)
WEIGHT_DECAY = 0.0
GRAD_CLIP = 1.0
GROUP_SIZE = 8  # G completions per prompt
PROMPTS_PER_STEP = 8  # groups per rollout batch (half real, half fake clips are drawn)
MAX_NEW_TOKENS = 64 if TINY else 750
OVERLONG_WINDOW = 16 if TINY else 150  # soft overlong penalty ramps from max - window to max
TEMPERATURE = 1.0  # sampling temperature; log-probs are divided by the same value
CLIP_LOW, CLIP_HIGH = 0.2, 0.28  # DAPO's decoupled clip range
DUAL_CLIP = 3.0  # a token with A < 0 whose ratio has passed this adds no gradient (verl's clip_ratio_c, on in its
# DAPO): its loss, -A x ratio, has no bound above, and one such token can throw the later mini-batches' steps off
UPDATES_PER_BATCH = 3 if TINY else 2  # optimizer steps per rollout batch; > 1 adds a no-grad old-log-prob pass
# over all but the first one's rows (the tiny model's rollouts cost more than its updates: 3 narrowed val F1's
# spread over eight seeds, BENCHMARKS.md)
DYNAMIC_SAMPLING = True  # drop groups whose samples are all right or all wrong, draw more prompts
MAX_DRAWS = 4  # prompt draws per step before going on with fewer groups
OVERDRAW = 2  # a draw takes up to this many times the groups still missing, sized by the share of groups kept so
# far, so that one draw mostly fills the step: a second costs nearly a whole rollout (decoding is paid per token
# step, not per row: 8 tiny prompts x 8 decode in 134 ms, 16 in 195 ms, 2 in 89 ms). The surplus is dropped, as in
# DAPO's gen_batch_size > train_batch_size. Memory: at 7B, 16 prompts peak at 41.5 GB against 30.0 GB for 8
FOCUS = 0.75  # share of the fake clips drawn by their generator's running rollout error, the rest evenly: a style
# not yet learnt gets more of the batch (learnt ones stay mixed groups, as the tiny model's letter confidence is
# capped near 0.89, and would fill the quota; BENCHMARKS.md)
MEMORY = 0.1  # weight of each new group in the running means: its generator's error, its label's kept share
MALFORMED_IN_LOSS = False  # False: malformed or truncated replies score -1 but stay out of the loss
MICRO_BATCH_TOKENS = 16384  # tokens per forward/backward, each prompt once plus its completions (memory vs speed)
GRADIENT_CHECKPOINTING = "memory"  # recompute a decoder layer in backward instead of keeping its activations:
# "memory" only once the GPU's free memory runs short (none on a CPU), True every layer, False none
SEED = SETUP.seed  # from the runner: 0 on a configuration's first run, then 1, 2, ... on its repeats
RUN_DIR = Path(os.environ.get("AUTOBUSTER_RUN_DIR") or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")

# BusterX++ stages 2 and 3 (both off: stage 1 alone, as above). Their time counts in TIME_BUDGET.
STAGE2 = False  # thinking-mode fusion: SFT on correct replies, /think -> the full reply, /no_think -> its answer
STAGE3 = False  # DAPO again, each prompt in a random mode, plus the hybrid and thinking rewards
STAGE1_SHARE = 0.5  # share of the budget for stage 1 when stage 2 or 3 is on; stage 3 runs to the end
FUSION_CLIPS = 256 if TINY else 300  # train clips sampled (G replies each) for stage 2's correct replies
FUSION_BATCH = 8  # pairs per stage-2 optimizer step (one epoch over all pairs)
FUSION_LR = 1e-3 if TINY else LEARNING_RATE  # stage 2's learning rate (the tiny LoRA learns /no_think in ~60 steps)
FUSION_CHECK = 32  # train clips answered greedily under /no_think after stage 2 (logged: no_think_obeyed)
# The thinking reward's reward model: a Qwen2.5-VL directory (the paper: SophiaVL-R1-Thinking-Reward-Model-3B);
# "" turns the thinking reward off.
THINKING_SCORER = ""


# ---------------------------------------------------------------- rewards


def format_reward(reply: str, mode: str | None = None) -> float:
    """0 for a well-formed reply in FORMAT (2025: exactly <think>...</think><answer>A|B</answer>; 2026: the thought,
    </think>, then 50+ characters ending in \\boxed{A|B}; the answer alone in no_think mode), -1 otherwise."""
    return 0.0 if FORMAT.well_formed(reply, mode) else -1.0


def accuracy_reward(reply: str, label: str) -> float:
    return 1.0 if FORMAT.parse(reply) == label else 0.0


def overlong_reward(length: int, max_len: int = MAX_NEW_TOKENS, window: int = OVERLONG_WINDOW) -> float:
    """0 up to max - window, then linear down to -1 at max, -1 beyond."""
    if length <= max_len - window:
        return 0.0
    return max(-1.0, (max_len - window - length) / window)


def hybrid_reward(reply: str, mode: str) -> float:
    """Stage 3: 0 when the reply obeys its mode (a think block under /think, none under /no_think), -1 otherwise."""
    return 0.0 if thinks(reply) == (mode == "think") else -1.0


def thinking_reward(reply: str, frames, accuracy: float, mode: str, scorer) -> float:
    """Stage 3: min(accuracy, M(reply)) under /think, so reasoning earns nothing without the right answer; 0 under
    /no_think or without a scorer. `scorer(reply, frames)` is M, a reasoning-quality score in [0, 1]."""
    if mode != "think" or scorer is None or not accuracy:
        return 0.0
    return min(accuracy, max(0.0, min(1.0, scorer(reply, frames))))


class RewardModelScorer:
    """M for the thinking reward: a Qwen2.5-VL reward model, loaded like the policy, rates the reply's reasoning
    about the video; the first number it writes, clamped to [0, 1], is the score (no number: 0)."""
    ASK = ("Question about the video:\n{question}\n\nA model's reasoning and answer:\n{reply}\n\n"
           "Rate the quality of the reasoning with one number between 0 and 1.")

    def __init__(self, path: str):
        self.model, self.processor = load(path)

    def __call__(self, reply: str, frames) -> float:
        text = chat_text(self.processor, FORMAT, prompt=self.ASK.format(question=FORMAT.prompt, reply=reply))
        done = engine.generate(self.model, self.processor, encode(self.processor, [frames], SETUP.settings.pixel_cap,
                                                                  text), greedy=True, max_new_tokens=8)
        number = re.search(r"\d+(?:\.\d+)?", done.texts[0])
        return min(1.0, float(number.group())) if number else 0.0


# ---------------------------------------------------------------- DAPO pieces


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r - group mean) / (unbiased group std + eps) for rewards [groups, G]; equal rewards give 0."""
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def keep_group(correct: list[float]) -> bool:
    """Dynamic sampling: a group teaches something only if its samples differ in correctness."""
    return len(set(correct)) > 1


def dapo_loss(logp, old_logp, adv, mask, n_tokens):
    """Clipped surrogate per token (dual-clipped where A < 0), summed over valid tokens, divided by the mini-batch's
    token count (pass the same n_tokens to every micro-batch so the sum of their losses is the mini-batch loss)."""
    ratio = torch.exp(logp - old_logp)
    a = adv.unsqueeze(1)
    per_token = -torch.min(ratio * a, ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH) * a)
    per_token = torch.where(a < 0, torch.minimum(per_token, -a * DUAL_CLIP), per_token)
    loss = (per_token * mask).sum() / n_tokens
    clip_low = ((ratio < 1 - CLIP_LOW) & (a < 0) & (mask > 0)).sum()
    clip_high = ((ratio > 1 + CLIP_HIGH) & (a > 0) & (mask > 0)).sum()
    clip_dual = ((ratio > DUAL_CLIP) & (a < 0) & (mask > 0)).sum()
    return loss, clip_low, clip_high, clip_dual


class RunningMean:
    """The mean of `params` over the steps `add` is called at, in fp32 (bf16 LoRA weights would round it away)."""

    def __init__(self, params):
        self.params, self.count, self.mean = params, 0, []

    @torch.no_grad()
    def add(self):
        self.count += 1
        if self.count == 1:  # the copy is made only once averaging starts
            self.mean = [p.detach().float().clone() for p in self.params]
            return
        for m, p in zip(self.mean, self.params):
            m.lerp_(p.float(), 1 / self.count)

    @torch.no_grad()
    def load(self):
        """Put the mean into the parameters (nothing to put before the first `add`)."""
        if not self.count:
            return
        for m, p in zip(self.mean, self.params):
            p.copy_(m)


# ---------------------------------------------------------------- rollouts


def focus_weights(errors: dict[str, float]) -> dict[str, float]:
    """Draw weights of the fake generators: FOCUS of the mass in proportion to their running error, the rest even."""
    total = sum(errors.values())
    return {g: (1 - FOCUS) / len(errors) + FOCUS * (e / total if total else 1 / len(errors)) for g, e in errors.items()}


def draw_size(missing: int, share: float) -> int:
    """Prompts to draw for `missing` groups of a label whose groups are kept at the running `share`: the fewest
    whose kept count (binomial) falls short with at most 5% chance, at most OVERDRAW x `missing`."""
    def short(n):
        return sum(math.comb(n, k) * share ** k * (1 - share) ** (n - k) for k in range(missing))

    n = missing
    while n < OVERDRAW * missing and short(n) > 0.05:
        n += 1
    return n


def rollout(model, processor, clips, stats, errors, shares, mixed=False, scorer=None):
    """Groups for one step: sample G replies per clip, score them, keep groups with mixed correctness. `errors`
    {fake generator: running error} steers which fakes are drawn, `shares` {label: running share of groups kept}
    how many; both are updated here. `mixed` (stage 3): each clip's prompt in a random mode, with the hybrid and
    thinking rewards."""
    # Balanced after filtering, not only when drawn: a solved label's groups are all right and dropped, and a
    # batch of the other label alone pushes the answer prior towards it until the weakest style flips.
    quota = {"real": PROMPTS_PER_STEP // 2, "fake": PROMPTS_PER_STEP - PROMPTS_PER_STEP // 2}
    kept, draws = {label: [] for label in quota}, 0
    while draws < MAX_DRAWS:
        missing = {label: n - len(kept[label]) for label, n in quota.items()}
        if not sum(missing.values()):
            break
        n = {label: draw_size(m, shares[label]) for label, m in missing.items()}
        drawn = clips.batch(n["real"], "real") + clips.batch(n["fake"], "fake", focus_weights(errors))
        draws += 1
        modes = [MODES[torch.randint(len(MODES), ()).item()] if mixed else None for _ in drawn]
        t0 = time.time()
        prompts = encode(processor, [f for _, f in drawn], SETUP.settings.pixel_cap,
                         [chat_text(processor, FORMAT, m) for m in modes])
        done = engine.generate(model, processor, prompts, num_samples=GROUP_SIZE, max_new_tokens=MAX_NEW_TOKENS,
                               temperature=TEMPERATURE)
        stats["rollout_seconds"] += time.time() - t0
        stats["rollout_tokens"] += int(done.lengths.sum())
        for i, ((row, frames), mode) in enumerate(zip(drawn, modes)):
            rows = slice(i * GROUP_SIZE, (i + 1) * GROUP_SIZE)
            texts, lengths = done.texts[rows], done.lengths[rows].tolist()
            correct = [accuracy_reward(t, row["label"]) for t in texts]
            if row["label"] == "fake":
                errors[row["generator"]] += MEMORY * (1 - sum(correct) / GROUP_SIZE - errors[row["generator"]])
            well_formed = [format_reward(t, mode) == 0 and not tr
                           for t, tr in zip(texts, done.truncated[rows].tolist())]
            rewards = [c + format_reward(t, mode) + overlong_reward(n) for c, t, n in zip(correct, texts, lengths)]
            if mode:
                rewards = [r + hybrid_reward(t, mode) + thinking_reward(t, frames, c, mode, scorer)
                           for r, t, c in zip(rewards, texts, correct)]
            keep = keep_group(correct) or not DYNAMIC_SAMPLING
            stats["seen"].append(dict(correct=correct, well_formed=well_formed, rewards=rewards, lengths=lengths,
                                      truncated=done.truncated[rows].tolist(), filtered=not keep))
            shares[row["label"]] += MEMORY * (keep - shares[row["label"]])
            if keep and len(kept[row["label"]]) < quota[row["label"]]:
                kept[row["label"]].append(dict(label=row["label"], frames=frames, mode=mode, ids=done.ids[rows],
                                               mask=done.mask[rows], rewards=rewards, well_formed=well_formed,
                                               features=None if TRAIN_VISION else done.features[i]))
    # real and fake in turn, so each of the UPDATES_PER_BATCH optimizer steps (consecutive groups) is as balanced
    # as its share allows (8 groups in 3 steps: 3, 3, 2 groups, the odd ones one label short)
    groups = [g for pair in zip_longest(*kept.values()) for g in pair if g]
    stats["draws"] = draws
    if len(groups) < PROMPTS_PER_STEP:
        print(f"warning: dynamic sampling gave up after {draws} draws with {len(groups)}/{PROMPTS_PER_STEP} groups")
    return groups


def collate(processor, groups):
    """The prompt batch (one row per group), completions padded to one length, the prompt of each completion,
    advantages and the loss mask."""
    if not groups:  # a rank whose dynamic sampling found nothing: no rows, but it still joins the all-reduces
        return {}, torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1), torch.zeros(0), torch.zeros(0).long()
    prompts = encode(processor, [g["frames"] for g in groups], SETUP.settings.pixel_cap,
                     [chat_text(processor, FORMAT, g["mode"]) for g in groups])
    width = max(g["ids"].shape[1] for g in groups)
    pad = processor.tokenizer.pad_token_id
    ids = torch.cat([torch.nn.functional.pad(g["ids"], (0, width - g["ids"].shape[1]), value=pad) for g in groups])
    mask = torch.cat([torch.nn.functional.pad(g["mask"], (0, width - g["mask"].shape[1])) for g in groups]).float()
    prompt_of_row = torch.arange(len(groups)).repeat_interleave(GROUP_SIZE)
    adv = group_advantages(torch.tensor([g["rewards"] for g in groups])).flatten()
    if not MALFORMED_IN_LOSS:
        mask = mask * torch.tensor([w for g in groups for w in g["well_formed"]]).float().unsqueeze(1)
    return prompts, ids, mask, adv, prompt_of_row


# ---------------------------------------------------------------- update


def update(model, opt, processor, groups, stats):
    """The optimizer steps on one rollout batch. Under torchrun every rank calls it at once with its own groups:
    token counts and gradients are summed over the ranks, so each step is the one a single process would take
    on all the ranks' groups together."""
    prompts, ids, mask, adv, prompt_of_row = collate(processor, groups)
    # Rows without a loss token (malformed or truncated replies, unless MALFORMED_IN_LOSS) and the positions after
    # the last loss token of all rows add nothing to the loss or its gradient: no pass runs them (one rambling row
    # would otherwise widen every completion to its length). Exact, as a position's log-prob sees only those before.
    width = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
    ids, mask = ids[:, :width], mask[:, :width]
    trainable = [p for p in model.parameters() if p.requires_grad]
    device = trainable[0].device
    prompts = {k: v.to(device) for k, v in prompts.items()}
    ids, mask, adv = ids.to(device), mask.to(device), adv.to(device)
    rows = torch.arange(len(ids))
    # a frozen tower saw each video once in the rollout: its features serve every pass of the update
    features = None if TRAIN_VISION or not groups else {i: g["features"] for i, g in enumerate(groups)}

    def micro(part):
        part = part[mask[part].any(1).cpu()]
        return engine.micro_batches(part, prompt_of_row, prompts["input_ids"].shape[1], ids.shape[1],
                                    MICRO_BATCH_TOKENS) if len(part) else []

    def logprobs(part):
        return engine.token_logprobs(model, prompts, ids[part], TEMPERATURE, prompt_of_row=prompt_of_row[part],
                                     features=features, checkpointing=GRADIENT_CHECKPOINTING)

    # The policy moves between updates, so the later mini-batches need the sampler's log-probs frozen in a no-grad
    # pass; the first one runs on the sampler's weights, where its own detached log-probs are those.
    minis = rows.tensor_split(UPDATES_PER_BATCH)  # as many steps on every rank, even one without rows
    later, old = rows[len(minis[0]):], torch.zeros_like(mask)
    if len(later):
        with torch.no_grad():
            for p in micro(later):
                old[p] = logprobs(p)
    losses, clipped, norms = [], torch.zeros(3), []  # tokens clipped low, high, dual
    for i, mini in enumerate(minis):
        n_tokens = distributed.all_sum(mask[mini].sum()).clamp(min=1)  # the global DAPO normaliser
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for part in micro(mini):  # none on a rank without rows
            logp = logprobs(part)
            ref = old[part] if i else logp.detach()
            loss, *clips = dapo_loss(logp, ref, adv[part], mask[part], n_tokens)
            loss.backward()
            total += loss.detach()
            clipped += torch.stack(clips).cpu()
        distributed.all_sum_grads(trainable)  # explicit, not DDP: the engine calls the unwrapped model
        total = distributed.all_sum(total).item()
        norm = torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
        if not (math.isfinite(total) and torch.isfinite(norm)):
            print(f"FAIL: non-finite loss {total} or grad norm {norm.item()} at step {stats['step']}")
            sys.exit(1)
        opt.step()
        losses.append(total)
        norms.append(norm.item())
    return sum(losses) / len(losses), *(clipped / mask.sum().clamp(min=1).item()).tolist(), max(norms)


# ---------------------------------------------------------------- stage 2: thinking-mode fusion


def fusion_pairs(replies: list[str], label: str) -> list[tuple[str, str]]:
    """(mode, target) pairs from one clip's replies: the first right, well-formed reply in full under /think and its
    answer block alone under /no_think; none when no reply is right."""
    for reply in replies:
        if accuracy_reward(reply, label) and format_reward(reply) == 0:
            reply = reply.strip()
            return [("think", reply), ("no_think", reply[reply.rindex(FORMAT.anchor):])]
    return []


def fuse(model, processor, clips) -> dict:
    """Stage 2: collect right replies of the current policy on FUSION_CLIPS clips, then one epoch of plain
    cross-entropy on their /think and /no_think pairs (its own optimizer: the DAPO one keeps its state). Only the
    LoRA weights learn the switch: a trained tiny vision tower stays as stage 1 left it (SFT there unlearnt seeing).
    Ends with the shares of greedy /no_think replies on FUSION_CHECK train clips that skip the think block and that
    are exactly an answer block."""
    cap, tok = SETUP.settings.pixel_cap, processor.tokenizer
    model.eval()
    pairs = []
    for _ in range(math.ceil(FUSION_CLIPS / PROMPTS_PER_STEP)):
        drawn = clips.batch(PROMPTS_PER_STEP)
        done = engine.generate(model, processor, encode(processor, [f for _, f in drawn], cap,
                                                        chat_text(processor, FORMAT)),
                               num_samples=GROUP_SIZE, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE)
        for i, (row, frames) in enumerate(drawn):
            replies = done.texts[i * GROUP_SIZE:(i + 1) * GROUP_SIZE]
            pairs += [(frames, mode, target) for mode, target in fusion_pairs(replies, row["label"])]
    model.train()
    params = [p for n, p in model.named_parameters() if p.requires_grad and ".visual." not in n]
    opt = torch.optim.AdamW(params, lr=FUSION_LR, weight_decay=0.0)
    device, losses = next(model.parameters()).device, []
    for batch in torch.randperm(len(pairs)).split(FUSION_BATCH):
        frames, modes, targets = zip(*[pairs[j] for j in batch.tolist()])
        prompts = encode(processor, list(frames), cap, [chat_text(processor, FORMAT, m) for m in modes])
        ids, mask = (x.to(device) for x in engine.reply_ids(tok, list(targets)))
        # mean per reply: the short /no_think targets weigh as much as the long /think ones
        logp = engine.token_logprobs(model, prompts, ids, checkpointing=GRADIENT_CHECKPOINTING)
        loss = -((logp * mask).sum(1) / mask.sum(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        losses.append(loss.item())
    losses = losses or [0.0]  # no right reply at all: nothing to fine-tune on
    model.eval()
    drawn = clips.batch(FUSION_CHECK)
    done = engine.generate(model, processor, encode(processor, [f for _, f in drawn], cap,
                                                    chat_text(processor, FORMAT, "no_think")),
                           greedy=True, max_new_tokens=MAX_NEW_TOKENS)
    model.train()
    return dict(stage=2, pairs=len(pairs), loss_first=losses[0], loss_last=losses[-1],
                no_think_obeyed=sum(not thinks(t) for t in done.texts) / len(drawn),
                no_think_well_formed=sum(FORMAT.well_formed(t, "no_think") for t in done.texts) / len(drawn))


# ---------------------------------------------------------------- main


def lr_factor(progress: float) -> float:
    """Learning-rate multiplier at `progress` (elapsed / budget): linear warm-up, flat, linear warm-down."""
    warm = progress / WARMUP if WARMUP else 1.0
    down = FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * (1 - progress) / WARMDOWN if WARMDOWN else 1.0
    return max(0.0, min(1.0, warm, down))


def main():
    SETUP.check_device()
    rank, world = distributed.init()  # (0, 1) unless started by torchrun
    t_start = time.time()
    torch.manual_seed(SEED * 1000 + rank)  # every rank of every seed samples its own prompts and completions
    if rank == 0:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
    model, processor = load(BASE_MODEL, four_bit=FOUR_BIT)
    lora = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                      target_modules=lora_targets(LORA_MODULES),
                      modules_to_save=["visual"] if TRAIN_VISION else None)
    model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    distributed.broadcast(trainable)  # rank 0's LoRA init on every rank
    kernels = engine.linear_attention_kernels(model)
    print(f"base {BASE_MODEL}  {SETUP.family} ({FORMAT.name} format{', ' + kernels if kernels else ''})  "
          f"trainable {sum(p.numel() for p in trainable):,} params  budget {TIME_BUDGET}s  ranks {world}")
    vision = {id(p) for n, p in model.named_parameters() if p.requires_grad and ".visual." in n}
    param_groups = [dict(params=[p for p in trainable if id(p) not in vision], peak=LEARNING_RATE),
                    dict(params=[p for p in trainable if id(p) in vision], peak=VISION_LEARNING_RATE)]
    opt = torch.optim.AdamW([g for g in param_groups if g["params"]], weight_decay=WEIGHT_DECAY)
    clips = dataset.TrainClips(SETUP, seed=SEED * 1000 + rank)
    log = open(RUN_DIR / "train.jsonl" if rank == 0 else os.devnull, "a")  # rank 0 logs its own rollouts' stats

    step, trained, rollouts, stats = 0, 0.0, 0, {"rollout_seconds": 0.0, "rollout_tokens": 0}
    # BusterX++ stages 2 and 3 begin when stage 1 has had its share of the budget
    stage1_end, fused = (STAGE1_SHARE * TIME_BUDGET if STAGE2 or STAGE3 else TIME_BUDGET), not STAGE2
    scorer = RewardModelScorer(THINKING_SCORER) if STAGE3 and THINKING_SCORER else None
    if STAGE3 and scorer is None:
        print("thinking reward off: THINKING_SCORER names no reward model")
    average = RunningMean(trainable)  # of the steps after AVERAGE_FROM
    errors = {g: 0.5 for g in clips.generators["fake"]}  # running rollout error per fake generator
    shares = {"real": 1.0, "fake": 1.0}  # running share of groups kept per label
    while trained < TIME_BUDGET:
        t0 = time.time()
        if not fused and trained >= stage1_end:
            rec = fuse(model, processor, clips)
            fused, dt = True, time.time() - t0
            trained += dt
            log.write(json.dumps(rec | dict(elapsed=round(trained, 2), step_seconds=dt)) + "\n")
            print(f"stage 2 | {trained:6.1f}s | {rec['pairs']} pairs | loss {rec['loss_first']:.4f} -> "
                  f"{rec['loss_last']:.4f} | no_think obeyed {rec['no_think_obeyed']:.3f} "
                  f"well-formed {rec['no_think_well_formed']:.3f} | {dt:.2f}s", flush=True)
            continue
        stage = 3 if STAGE3 and trained >= stage1_end else 1
        for group in opt.param_groups:
            group["lr"] = group["peak"] * lr_factor(trained / TIME_BUDGET)
        stats.update(step=step, seen=[])
        model.eval()
        groups = rollout(model, processor, clips, stats, errors, shares, mixed=stage == 3, scorer=scorer)
        model.train()
        loss = clip_low = clip_high = clip_dual = grad_norm = 0.0
        if distributed.all_max(len(groups)):  # the update's all-reduces need every rank, with groups or not
            loss, clip_low, clip_high, clip_dual, grad_norm = update(model, opt, processor, groups, stats)
        seen = stats["seen"]
        rollouts += len(seen) * GROUP_SIZE
        flat = lambda key: [x for s in seen for x in s[key]]  # noqa: E731
        rewards, lengths = torch.tensor(flat("rewards")), torch.tensor(flat("lengths")).float()
        dt = distributed.all_max(time.time() - t0)  # one clock: every rank stops at the same step
        trained += dt
        rec = dict(step=step, elapsed=round(trained, 2), reward_mean=rewards.mean().item(),
                   reward_std=rewards.std().item(), accuracy=sum(flat("correct")) / len(rewards),
                   format_rate=sum(flat("well_formed")) / len(rewards),
                   filtered=sum(s["filtered"] for s in seen) / len(seen), groups=len(groups),
                   real_groups=sum(g["label"] == "real" for g in groups), draws=stats["draws"],
                   len_mean=lengths.mean().item(), len_max=int(lengths.max()),
                   truncated=sum(flat("truncated")) / len(rewards), loss=loss, clip_low=clip_low,
                   clip_high=clip_high, clip_dual=clip_dual, grad_norm=grad_norm, lr=opt.param_groups[0]["lr"],
                   rollout_tokens_per_s=stats["rollout_tokens"] / max(stats["rollout_seconds"], 1e-9),
                   step_seconds=dt, skipped_clips=clips.skipped, errors={g: round(e, 3) for g, e in errors.items()})
        rec["stage"] = stage
        log.write(json.dumps(rec) + "\n")
        log.flush()
        print(f"step {step:4d} | {trained:6.1f}s | reward {rec['reward_mean']:+.3f} | acc {rec['accuracy']:.3f} | "
              f"fmt {rec['format_rate']:.3f} | groups {len(groups)}/{len(seen)} | len {rec['len_mean']:.0f} | "
              f"loss {loss:+.5f} | gnorm {grad_norm:.3f} | {dt:.2f}s", flush=True)
        step += 1
        if fused and trained >= AVERAGE_FROM * TIME_BUDGET:  # after stage 2, whose weights differ in kind
            average.add()
    average.load()
    clips.close()
    rollouts = int(distributed.all_sum(rollouts))  # the summary counts every rank's rollouts
    stats["rollout_tokens"] = int(distributed.all_sum(stats["rollout_tokens"]))
    distributed.close()
    if rank:
        return

    model.save_pretrained(RUN_DIR / "adapter")
    model.eval()
    m, _ = evaluation.evaluate_model(model, processor, SETUP, "val")
    both = evaluation.evaluate_model(model, processor, SETUP, "val", mode="no_think")[0] if STAGE2 or STAGE3 else {}
    peak = (torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
    summary = dict(f1=m["f1"], accuracy=m["accuracy"], precision=m["precision"], recall=m["recall"], mcc=m["mcc"],
                   auc=m["auc"] if m["auc"] is not None else float("nan"), unclear_rate=m["unclear_rate"],
                   peak_memory_gb=peak, training_seconds=trained, total_seconds=time.time() - t_start,
                   num_steps=step, averaged_steps=average.count, num_rollouts=rollouts,
                   rollout_tokens_per_s=stats["rollout_tokens"] / max(stats["rollout_seconds"], 1e-9))
    if both:  # the model was taught both modes: report the /no_think one too
        summary.update(f1_no_think=both["f1"], no_think_think_rate=both["think_rate"])
    print("---")
    for k, v in summary.items():
        print(f"{k + ':':<22}{v:.6f}" if isinstance(v, float) else f"{k + ':':<22}{v}")


if __name__ == "__main__":
    guarded(main)
