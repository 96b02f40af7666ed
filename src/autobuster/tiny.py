"""The tiny models, one per family (prepare.py saves one as the tiny profile's base model): a Qwen2.5-VL and a
Qwen3.5 at their real patch / merge / temporal settings and layer patterns with tiny widths, a locally trained
byte-level BPE tokenizer with Qwen's special tokens and the family's chat template, and the standard processors.
Saved as an ordinary Hugging Face model directory, so every loader treats it like a real checkpoint."""
import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                          Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3_5Config,
                          Qwen3_5ForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from .families import QWEN2_5_VL, QWEN3_5, Family, family_of_model
from .profiles import MIN_PIXELS
from .prompt import ANSWER, BOXED, Format

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
           "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL / Qwen2.5-VL chat template (the video goes in as <|vision_start|><|video_pad|><|vision_end|>).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3.5's: the assistant turn opens the think block, or writes it empty when thinking is off.
CHAT_TEMPLATE_3_5 = CHAT_TEMPLATE.replace(
    "<|im_start|>assistant\n{% endif %}",
    "<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}")

# The warm start's one line of reasoning (the 2025 format must think). A single fixed line keeps the sampled replies'
# entropy in the answer letter: random reasoning tokens would add gradient noise that drowns the letter's signal in
# RL. No token in it repeats, so each token alone says what follows: with "the motion, the colours and the texture"
# the 2-layer model had to count which "the" it was at, RL's updates broke the count, and runs drifted into loops
# ("the motion, the colours and the motion, ...", longer replies, slower steps; 0 of 16 runs with this line,
# BENCHMARKS.md).
THOUGHT = "let me think about motion, colours and texture"
# The 2026 format's explanation after the think block: its 50 characters (with the box) in few tokens, no token
# repeated.
CONCLUSION = "Having weighed every frame, my verdict is"
# What the warm start writes per format (thought, conclusion). The 2026 one may leave its think block empty, so it
# does: DAPO's loss is a mean over tokens, and the fewer tokens a reply has around its letter, the larger the
# letter's share of the gradient (and the cheaper the step). 15 tokens a reply, where the 2025 thought and an 11-word
# explanation made 27: val F1 0.76 over five RL seeds against 0.72 over four (0.84 with the dual clip; BENCHMARKS.md).
WARM_REPLIES = {ANSWER.name: (THOUGHT, ""), BOXED.name: ("", CONCLUSION)}


def warm_reply(fmt: Format, letter: str) -> str:
    thought, conclusion = WARM_REPLIES[fmt.name]
    return fmt.write(thought, letter, conclusion)


def build_tokenizer(fmt: Format = ANSWER) -> Qwen2Tokenizer:
    """A byte-level BPE in Qwen's pre-tokenisation, trained here on the format's prompt and replies."""
    corpus = [fmt.prompt, "You are a helpful assistant.", "system", "user", "assistant", "real", "fake"]
    corpus += [warm_reply(fmt, x) for x in "AB"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(corpus * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                         eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                         additional_special_tokens=SPECIAL, model_max_length=32768)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(tokenizer, pixel_cap: int) -> Qwen2_5_VLProcessor:
    """The standard Qwen2.5-VL processors; the video cap equals the frame cache's, so frames pass unresized."""
    image = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=pixel_cap)
    video = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=pixel_cap)
    return Qwen2_5_VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                               chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1], tokens_per_second=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).float()


def build_qwen3_5(tokenizer, seed: int = 0) -> Qwen3_5ForConditionalGeneration:
    """A tiny Qwen3.5: its real layer pattern (three Gated DeltaNet layers, then full attention), patch 16 / merge 2 /
    temporal 2, partial rotary with interleaved M-RoPE, tiny widths."""
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3_5Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                         linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                         linear_conv_kernel_dim=4, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.5,
                                          "mrope_section": [2, 1, 1], "mrope_interleaved": True},
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen3_5ForConditionalGeneration(config).float()


def build_qwen3_5_processor(tokenizer, pixel_cap: int) -> Qwen3VLProcessor:
    """Qwen3.5's processors (timestamps before every frame pair), patch 16."""
    image = Qwen2VLImageProcessor(patch_size=16, size={"shortest_edge": MIN_PIXELS, "longest_edge": pixel_cap})
    video = Qwen3VLVideoProcessor(patch_size=16, size={"shortest_edge": MIN_PIXELS, "longest_edge": pixel_cap})
    return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                            chat_template=CHAT_TEMPLATE_3_5)


BUILDERS = {QWEN2_5_VL: (build_model, build_processor), QWEN3_5: (build_qwen3_5, build_qwen3_5_processor)}


def build(out: Path, pixel_cap: int, family: Family = QWEN2_5_VL) -> None:
    """Write the untrained tiny model directory of `family` (model, tokenizer, processor, generation config)."""
    build_model_of, build_processor_of = BUILDERS[family]
    tok = build_tokenizer(family.format)
    model = build_model_of(tok)
    ids = tok.convert_tokens_to_ids
    model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.save_pretrained(out)
    build_processor_of(tok, pixel_cap).save_pretrained(out)


def opinion(frames: list, direction: torch.Tensor) -> torch.Tensor:
    """A label-free opinion per clip: which side of the batch median a fixed random projection of the clip's
    mean 4x4 colour layout falls on (True = A). Half the batch gets each letter."""
    x = torch.stack([torch.from_numpy(f).float().mean(0) for f in frames]).permute(0, 3, 1, 2)
    score = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) @ direction
    return score < score.median()


def warm_start(model_dir: Path, clips, steps: int, batch: int = 16, lr: float = 2e-3, log=print) -> None:
    """Teach the family's format without the task, in place (`warm_reply`): `<think>{THOUGHT}</think><answer>X</answer>`
    (2025), `</think>\n\n{CONCLUSION} \\boxed{X}` closing the opened think block at once (2026).

    The letter never comes from the label: it comes from a label-free "opinion" about the video, learnt softly
    (P = 0.6), so the model writes A for about half the clips, depends on the video, and still samples both
    letters. Softly, because RL must then unlearn the opinion, which says nothing about the label (eight RL seeds
    each on slower cores: mean val F1 0.70 after a warm start at P = 0.75, 0.85 at P = 0.6, 0.71 at P = 0.55; one
    model each, BENCHMARKS.md). Cross-entropy on random letters would instead flatten P(A) to 0.5 for every video
    and erase the video pathway.

    The tower stays at its random initialisation but for its merger (patch embedding, blocks, Qwen3.5's position
    embedding): trained
    on the colour opinion they would specialise in colour and lose the fine texture and frame-to-frame changes
    that RL must find (a model whose RL never told checker and flicker from real, val F1 0.62, reached 0.94 from
    the same seed with them frozen; BENCHMARKS.md)."""
    from . import engine
    from .evaluation import letter_index
    from .model import chat_text, encode, load
    model, processor = load(str(model_dir), device=torch.device("cpu"))
    tok, fmt = processor.tokenizer, family_of_model(model).format
    model.train()
    model.model.visual.requires_grad_(False)
    model.model.visual.merger.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = torch.Generator().manual_seed(0)
    direction = torch.randn(48, generator=rng)
    cap = processor.video_processor.size["longest_edge"]

    for step in range(steps):
        rows = clips.batch(batch)
        prompts = encode(processor, [f for _, f in rows], cap, chat_text(processor, fmt))
        # score each reply with A and with B: the tokens after the letter learn both continuations
        ids_a, mask = engine.reply_ids(tok, [warm_reply(fmt, "A")] * batch)
        ids_b, _ = engine.reply_ids(tok, [warm_reply(fmt, "B")] * batch)
        at = torch.arange(batch), torch.tensor([letter_index(tok, r.tolist(), fmt.anchor) for r in ids_a])
        lp_a = engine.token_logprobs(model, prompts, ids_a)
        lp_b = engine.token_logprobs(model, prompts, ids_b)
        either = torch.logaddexp(lp_a[at], lp_b[at])  # log(P(A) + P(B)) at the letter
        q = 0.4 + 0.2 * opinion([f for _, f in rows], direction).float()  # target P(A | A or B)
        margin = lp_a[at] - lp_b[at]
        letter = -(q * torch.nn.functional.logsigmoid(margin) + (1 - q) * torch.nn.functional.logsigmoid(-margin))
        mask[at] = 0
        text = ((lp_a + lp_b) / 2 * mask).sum() / mask.sum()
        loss = -text - either.mean() + letter.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"warm start step {step:4d}  loss {loss.item():.4f}")
    model.eval()
    model.save_pretrained(model_dir)
