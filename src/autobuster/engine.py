"""The generation and log-prob engine shared by rollouts and evaluation.

This is the simple, correct implementation on top of Hugging Face `generate`; the performance work keeps
these two functions' interfaces (`generate`, `token_logprobs`) and makes them fast."""
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from .model import unwrap


@dataclass
class Completions:
    """Rows are prompt-major: row i * num_samples + j is sample j of prompt i."""
    ids: torch.Tensor  # [rows, L] generated tokens, padded after the first end token
    mask: torch.Tensor  # [rows, L] 1 up to and including the first end token
    lengths: torch.Tensor  # [rows] valid tokens (the end token included)
    truncated: torch.Tensor  # [rows] bool: no end token within max_new_tokens
    texts: list[str]  # decoded completions, special tokens removed
    tracked: torch.Tensor | None = None  # [rows, L, len(track_ids)] raw logits of the tracked tokens


def end_ids(tokenizer) -> list[int]:
    """Both Qwen end tokens: <|im_end|> and <|endoftext|>."""
    return sorted({tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")})


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


class _Track(LogitsProcessor):
    """Keeps the raw logits of a few token ids at every decoding step (for P(fake) at the answer letter)."""

    def __init__(self, ids):
        self.ids, self.steps = ids, []

    def __call__(self, input_ids, scores):
        self.steps.append(scores[:, self.ids].float().cpu())
        return scores


@torch.no_grad()
def generate(model, processor, batch, num_samples: int = 1, max_new_tokens: int = 64, greedy: bool = False,
             temperature: float = 1.0, track_ids: list[int] | None = None) -> Completions:
    """Sample `num_samples` completions per prompt (or one greedy completion). Every sampling setting is set
    here: temperature as given, top_p 1, top_k off, no repetition penalty (Qwen2.5-VL ships top_k = 1)."""
    tok = processor.tokenizer
    ends = end_ids(tok)
    sampling = {} if greedy else dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
    config = GenerationConfig(
        **sampling, repetition_penalty=1.0, num_return_sequences=num_samples, max_new_tokens=max_new_tokens,
        eos_token_id=ends, pad_token_id=tok.pad_token_id, suppress_tokens=banned_ids(tok))
    track = _Track(track_ids) if track_ids else None
    batch = batch.to(model.device)
    out = model.generate(**batch, generation_config=config,
                         logits_processor=LogitsProcessorList([track]) if track else None)
    ids = out[:, batch["input_ids"].shape[1]:]
    if ids.shape[1] == 0:
        ids = torch.full((len(out), 1), ends[0], device=out.device)
    mask, truncated = completion_mask(ids, ends)
    ids = ids.masked_fill(mask == 0, tok.pad_token_id)
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    tracked = torch.stack(track.steps, 1) if track and track.steps else None
    return Completions(ids, mask, mask.sum(1), truncated, texts, tracked)


def reply_ids(tokenizer, replies: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Target replies as completion ids for token_logprobs: each with the end token, right-padded, and its mask."""
    t = tokenizer([r + tokenizer.eos_token for r in replies], add_special_tokens=False, padding=True,
                  padding_side="right", return_tensors="pt")
    return t.input_ids, t.attention_mask.float()


def repeat_rows(batch, n: int):
    """The prompt batch with every prompt repeated n times (prompt-major), videos included."""
    out = {k: v.repeat_interleave(n, 0) for k, v in batch.items()
           if k in ("input_ids", "attention_mask", "mm_token_type_ids", "video_grid_thw", "second_per_grid_ts")}
    per_video = (batch["video_grid_thw"].prod(-1)).tolist()
    chunks = batch["pixel_values_videos"].split(per_video)
    out["pixel_values_videos"] = torch.cat([c for c in chunks for _ in range(n)])
    return out


def token_logprobs(model, batch, ids: torch.Tensor, temperature: float = 1.0, chunk_rows: int = 8) -> torch.Tensor:
    """log p(ids | prompt) per completion token, [rows, L], with gradients if enabled.

    `batch` holds one prompt per row (already repeated to match `ids`). Only completion positions reach
    lm_head, chunk by chunk under checkpointing, so no [rows, seq, vocab] fp32 tensor ever exists."""
    core = unwrap(model)
    batch = {k: v.to(ids.device) for k, v in batch.items()}
    prompt_len = batch["input_ids"].shape[1]
    input_ids = torch.cat([batch["input_ids"], ids], 1)
    attention = torch.cat([batch["attention_mask"], torch.ones_like(ids)], 1)
    mm = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(ids)], 1)
    core.model.rope_deltas = None  # positions come from this batch, never from an earlier generate
    hidden = core.model(input_ids=input_ids, attention_mask=attention, mm_token_type_ids=mm,
                        pixel_values_videos=batch["pixel_values_videos"], video_grid_thw=batch["video_grid_thw"],
                        second_per_grid_ts=batch["second_per_grid_ts"], use_cache=False).last_hidden_state
    hidden = hidden[:, prompt_len - 1:-1]  # position t predicts token t + 1

    def rows_logprobs(h, target):
        logits = core.lm_head(h).float() / temperature
        return logits.log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)

    parts = []
    for h, t in zip(hidden.split(chunk_rows), ids.split(chunk_rows)):
        parts.append(checkpoint(rows_logprobs, h, t, use_reentrant=False) if torch.is_grad_enabled()
                     else rows_logprobs(h, t))
    return torch.cat(parts)
