"""The engine against Hugging Face: greedy generation token for token, log-probs against a full forward,
and the model loading paths (4-bit on CPU, 4 fps temporal positions)."""
import pytest
import torch

from autobuster import dataset, engine, model
from autobuster.profiles import active


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
        batch = model.encode(p, clips(n, seed=n), 56 * 56)
        ours = engine.generate(m, p, batch, greedy=True, max_new_tokens=new)
        ref = m.generate(**batch, do_sample=False, max_new_tokens=new, eos_token_id=engine.end_ids(p.tokenizer),
                         pad_token_id=p.tokenizer.pad_token_id, suppress_tokens=engine.banned_ids(p.tokenizer))
        ref = ref[:, batch["input_ids"].shape[1]:]
        for i in range(n):
            k = int(ours.lengths[i])
            assert ours.ids[i, :k].tolist() == ref[i, :k].tolist()


def test_token_logprobs_match_a_full_forward(policy):
    m, p = policy
    batch = model.encode(p, clips(2), 56 * 56)
    done = engine.generate(m, p, batch, num_samples=3, max_new_tokens=12)
    rows = engine.repeat_rows(batch, 3)
    ours = engine.token_logprobs(m, rows, done.ids)
    full = torch.cat([rows["input_ids"], done.ids], 1)
    mask = torch.cat([rows["attention_mask"], torch.ones_like(done.ids)], 1)
    with torch.no_grad():
        logits = m(**{**rows, "input_ids": full, "attention_mask": mask,
                      "mm_token_type_ids": torch.cat([rows["mm_token_type_ids"], torch.zeros_like(done.ids)], 1)
                      }).logits
    ref = logits[:, rows["input_ids"].shape[1] - 1:-1].float().log_softmax(-1)
    ref = ref.gather(-1, done.ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(ours, ref, atol=1e-4)


def test_sampling_ignores_shipped_top_k_and_never_samples_special_tokens(policy):
    m, p = policy
    m.generation_config.top_k = 1  # as Qwen2.5-VL ships it: would make all G samples identical
    batch = model.encode(p, clips(1), 56 * 56)
    done = engine.generate(m, p, batch, num_samples=8, max_new_tokens=24)
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
    batch = model.encode(p, clips(1), 56 * 56)
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
    done = engine.generate(m, p, model.encode(p, clips(1), 56 * 56), greedy=True, max_new_tokens=8)
    assert done.ids.shape[0] == 1
