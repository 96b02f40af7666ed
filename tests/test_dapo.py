"""train_dapo.py's DAPO pieces against numbers worked out by hand from the published formulas."""
import math

import pytest
import torch


@pytest.fixture(scope="module")
def td(tiny_home):
    import train_dapo
    return train_dapo


def test_group_advantages_worked_example(td):
    adv = td.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    # mean 0.5, unbiased std sqrt(1/3) = 0.577350 -> 0.5 / (0.577350 + 1e-6) = 0.866024
    assert torch.allclose(adv[0], torch.tensor([0.866024, -0.866024, -0.866024, 0.866024]), atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(4))


# 3 x 4: ratios, advantages and masks that hit both clip regions (clip 0.2 / 0.28)
RATIOS = [[0.5, 1.0, 1.5, 1.2], [0.5, 0.9, 1.4, 0.7], [1.1, 1.3, 0.6, 2.0]]
ADV = [1.0, -1.0, 2.0]
MASK = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
# per-token -min(r A, clip(r) A): row 0: -0.5, -1.0, -1.28 (high clip); row 1: 0.8 (low clip), 0.9, 1.4, 0.8
# (low clip); row 2: -2.2, -2.56 (high clip). Sum -3.64 over 9 valid tokens.
EXPECTED_LOSS = -3.64 / 9
# d loss / d logp = -r A / 9 where the unclipped branch is the minimum, 0 where the clipped one is
EXPECTED_GRAD = [[-0.5 / 9, -1.0 / 9, 0, 0], [0, 0.9 / 9, 1.4 / 9, 0], [-2.2 / 9, 0, 0, 0]]


def _inputs():
    logp = torch.log(torch.tensor(RATIOS)).requires_grad_()
    return logp, torch.zeros(3, 4), torch.tensor(ADV), torch.tensor(MASK, dtype=torch.float)


def test_loss_value_and_gradient(td):
    logp, old, adv, mask = _inputs()
    loss, low, high, dual = td.dapo_loss(logp, old, adv, mask, mask.sum())
    loss.backward()
    assert loss.item() == pytest.approx(EXPECTED_LOSS, abs=1e-6)
    assert torch.allclose(logp.grad, torch.tensor(EXPECTED_GRAD), atol=1e-6)
    assert (low.item(), high.item(), dual.item()) == (2, 2, 0)


@pytest.mark.parametrize("splits", [[[0, 1, 2]], [[0], [1, 2]], [[0], [1], [2]]])
def test_micro_batches_sum_to_the_same_loss(td, splits):
    logp, old, adv, mask = _inputs()
    total = sum(td.dapo_loss(logp[s], old[s], adv[s], mask[s], mask.sum())[0] for s in splits)
    total.backward()
    assert total.item() == pytest.approx(EXPECTED_LOSS, abs=1e-6)
    assert torch.allclose(logp.grad, torch.tensor(EXPECTED_GRAD), atol=1e-6)
    if len(splits) > 1:  # the mean of per-micro-batch means is a different (wrong) number
        means = [td.dapo_loss(logp[s], old[s], adv[s], mask[s], mask[s].sum())[0].item() for s in splits]
        assert sum(means) / len(means) != pytest.approx(EXPECTED_LOSS, abs=1e-3)


def test_everything_masked_gives_zero_loss_and_no_update(td):
    logp, old, adv, _ = _inputs()
    param = torch.nn.Parameter(logp.detach().clone())
    opt = torch.optim.AdamW([param], lr=0.1, weight_decay=0.0)
    mask = torch.zeros(3, 4)
    loss = td.dapo_loss(param, old, adv, mask, mask.sum().clamp(min=1))[0]
    loss.backward()
    before = param.detach().clone()
    opt.step()
    assert loss.item() == 0.0 and not torch.isnan(param.grad).any()
    assert torch.equal(param.detach(), before)


def test_soft_overlong(td):
    assert td.overlong_reward(50, 100, 20) == 0.0
    assert td.overlong_reward(80, 100, 20) == 0.0
    assert td.overlong_reward(90, 100, 20) == pytest.approx(-0.5)
    assert td.overlong_reward(100, 100, 20) == pytest.approx(-1.0)
    assert td.overlong_reward(110, 100, 20) == -1.0


@pytest.mark.parametrize("reply,reward", [
    ("<think>the motion looks calm</think><answer>A</answer>", 0.0),
    ("<think>x</think>\n<answer>B</answer>\n", 0.0),
    ("<think>x</think><answer>C</answer>", -1.0),
    ("<answer>A</answer>", -1.0),
    ("<think></think><answer>A</answer>", -1.0),
    ("<think>x</think><answer>A</answer> and more", -1.0),
    ("<think>x</think><answer>A</answer><answer>B</answer>", -1.0),
    ("<think>a<think>b</think><answer>A</answer>", -1.0),
    ("<think>x</think><answer>real</answer>", -1.0),
    ("<think>x</think><answer> A </answer>", -1.0),
])
def test_format_reward(td, reply, reward):
    assert td.format_reward(reply) == reward


def test_accuracy_reward(td):
    assert td.accuracy_reward("<think>x</think><answer>B</answer>", "fake") == 1.0
    assert td.accuracy_reward("<think>x</think><answer>B</answer>", "real") == 0.0
    assert td.accuracy_reward("no answer", "real") == 0.0


def test_dynamic_sampling_keeps_mixed_groups_only(td):
    assert td.keep_group([1.0, 0.0, 1.0, 1.0])
    assert not td.keep_group([1.0] * 8)
    assert not td.keep_group([0.0] * 8)
    assert math.isclose(td.group_advantages(torch.tensor([[0.5, 0.5]]))[0, 0].item(), 0.0)


class ScriptedClips:
    """Train clips whose frames are just their label (fakes from generator "g"); records every label drawn and the
    weights the fakes were drawn with."""

    def __init__(self):
        self.drawn, self.weights = [], []

    def batch(self, n, label=None, weights=None):
        labels = [label or ("real", "fake")[i % 2] for i in range(n)]
        self.drawn += labels
        if weights:
            self.weights.append(weights)
        return [(dict(label=lab, generator="real" if lab == "real" else "g"), lab) for lab in labels]


def scripted_policy(td, monkeypatch, fake_mixed_from_call):
    """engine.generate stand-in: real clips get half right, half wrong replies (a mixed group); fake clips all
    right (a solved group) until call number `fake_mixed_from_call`, mixed from then on."""
    calls = []

    def generate(model, processor, prompts, num_samples, **kw):
        calls.append(prompts)
        texts = []
        for label in prompts:
            right, wrong = ("A", "B") if label == "real" else ("B", "A")
            mixed = label == "real" or len(calls) >= fake_mixed_from_call
            texts += [f"<think>x</think><answer>{wrong if mixed and j % 2 else right}</answer>"
                      for j in range(num_samples)]
        rows = len(texts)
        return td.engine.Completions(torch.ones(rows, 3, dtype=torch.long), torch.ones(rows, 3),
                                     torch.full((rows,), 3), torch.zeros(rows, dtype=torch.bool), texts)

    monkeypatch.setattr(td.engine, "generate", generate)
    monkeypatch.setattr(td, "encode", lambda processor, frames, cap, texts: list(frames))
    monkeypatch.setattr(td, "chat_text", lambda processor, fmt, mode=None: "")


def test_dynamic_sampling_balances_the_kept_groups_by_label(td, monkeypatch):
    """Solved fake groups are dropped and more fakes drawn (reals no longer), so the batch stays half real. The
    second draw is sized by the fakes' kept share, which the dropped groups lowered: OVERDRAW times the missing."""
    scripted_policy(td, monkeypatch, fake_mixed_from_call=2)
    clips, stats = ScriptedClips(), {"rollout_seconds": 0.0, "rollout_tokens": 0, "seen": []}
    shares = {"real": 1.0, "fake": 1.0}
    groups = td.rollout(None, None, clips, stats, {"g": 0.5}, shares)
    half = td.PROMPTS_PER_STEP // 2
    assert clips.drawn == ["real"] * half + ["fake"] * half + ["fake"] * half * td.OVERDRAW and stats["draws"] == 2
    assert [g["label"] for g in groups] == ["real", "fake"] * half  # in turn: every optimizer step is balanced
    assert len(stats["seen"]) == 2 * half + half * td.OVERDRAW  # the surplus mixed fakes are seen, not kept
    assert sum(s["filtered"] for s in stats["seen"]) == half  # only the solved ones count as filtered
    assert shares["real"] == 1.0
    drop, keep = (1 - td.MEMORY) ** half, 1 - (1 - td.MEMORY) ** (half * td.OVERDRAW)
    assert math.isclose(shares["fake"], drop * (1 - keep) + keep)


@pytest.mark.parametrize("share", [1.0, 0.9, 0.7, 0.5, 0.2, 0.01])
@pytest.mark.parametrize("missing", [1, 2, 4])
def test_draw_size_is_the_fewest_prompts_that_likely_fill_the_quota(td, share, missing):
    """Against scipy's binomial: where not capped at OVERDRAW x missing, the draw falls short with at most 5% chance
    and one prompt fewer would not; all groups kept (dynamic sampling off, or nothing solved yet): no surplus."""
    from scipy.stats import binom
    n = td.draw_size(missing, share)
    assert missing <= n <= td.OVERDRAW * missing
    if n < td.OVERDRAW * missing:
        assert binom.cdf(missing - 1, n, share) <= 0.05
    if n > missing:
        assert binom.cdf(missing - 1, n - 1, share) > 0.05
    if share == 1.0:
        assert n == missing


def test_dynamic_sampling_gives_up_after_max_draws(td, monkeypatch, capsys):
    """Fakes never mixed: the step goes on with the real half alone after MAX_DRAWS draws, and says so."""
    scripted_policy(td, monkeypatch, fake_mixed_from_call=10 ** 9)
    clips, stats = ScriptedClips(), {"rollout_seconds": 0.0, "rollout_tokens": 0, "seen": []}
    errors = {"g": 0.5}
    groups = td.rollout(None, None, clips, stats, errors, {"real": 1.0, "fake": 1.0})
    half = td.PROMPTS_PER_STEP // 2
    assert stats["draws"] == td.MAX_DRAWS
    later = half * td.OVERDRAW * (td.MAX_DRAWS - 1)  # fakes drawn after the first draw, OVERDRAW x the missing
    assert clips.drawn == ["real"] * half + ["fake"] * (half + later)  # no more reals once they are kept
    assert [g["label"] for g in groups] == ["real"] * half
    assert len(stats["seen"]) == 2 * half + later  # every sampled group is counted
    assert f"gave up after {td.MAX_DRAWS} draws with {half}/{td.PROMPTS_PER_STEP} groups" in capsys.readouterr().out
    # every fake group was all right: the running error decays by (1 - MEMORY) per group
    assert math.isclose(errors["g"], 0.5 * (1 - td.MEMORY) ** (half + later))
    assert len(clips.weights) == td.MAX_DRAWS


def test_focus_weights_follow_the_running_error(td, monkeypatch):
    """FOCUS of the draw mass in proportion to the error, the rest even; all errors zero -> even."""
    monkeypatch.setattr(td, "FOCUS", 0.75)
    w = td.focus_weights({"a": 0.6, "b": 0.2, "c": 0.2, "d": 0.0})
    # worked by hand: 0.25 / 4 = 0.0625 even, plus 0.75 * error / 1.0
    assert w == pytest.approx({"a": 0.5125, "b": 0.2125, "c": 0.2125, "d": 0.0625})
    assert td.focus_weights({"a": 0.0, "b": 0.0}) == pytest.approx({"a": 0.5, "b": 0.5})


def test_running_mean_is_the_mean_of_the_steps_added(td):
    """The tail average: bf16 weights get the fp32 mean of the snapshots taken at `add`, rounded once."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    mean = td.RunningMean([p])
    mean.load()  # nothing added yet: the weights stay
    before = p.detach().clone()
    assert torch.equal(p, before)
    snapshots = []
    for _ in range(300):
        with torch.no_grad():
            p.add_(torch.randn_like(p) * 0.01)
        snapshots.append(p.detach().double())
        mean.add()
    mean.load()
    assert mean.count == 300
    # within bf16's rounding of the exact mean (a mean kept in bf16 drifts by several of its steps here)
    torch.testing.assert_close(p.detach().double(), torch.stack(snapshots).mean(0), rtol=2 ** -8, atol=1e-6)


def test_train_clips_draw_generators_by_weight_and_skip_bad_clips(td, monkeypatch):
    """Fakes come only from generators with weight; by default from every generator in proportion to its clips;
    a clip that fails to decode is skipped, counted, and replaced by another."""
    from autobuster import dataset
    load = dataset.load_frames
    bad = lambda row: row["generator"] == "tint" and int(row["id"][-1], 16) % 2 == 0  # noqa: E731

    def flaky(setup, row):
        if bad(row):
            raise dataset.BadVideo(f"{row['id']}: corrupt")
        return load(setup, row)

    monkeypatch.setattr(dataset, "load_frames", flaky)
    clips = dataset.TrainClips(td.SETUP, seed=0)
    try:
        assert clips.generators == {"real": ["real"], "fake": ["checker", "flicker", "stutter", "tint"]}
        drawn = clips.batch(24, "fake", {"checker": 0.0, "flicker": 0.0, "stutter": 1.0, "tint": 1.0})
        assert {row["generator"] for row, _ in drawn} == {"stutter", "tint"}
        assert not any(bad(row) for row, _ in drawn) and clips.skipped > 0
        counts = {g: 0 for g in clips.generators["fake"]}
        for row, frames in clips.batch(400, "fake"):
            counts[row["generator"]] += 1
            assert frames.ndim == 4
        assert all(60 <= c <= 140 for c in counts.values()), counts  # 100 each expected (50 train clips each)
        assert [row["label"] for row, _ in clips.batch(4)] == ["real", "fake"] * 2
    finally:
        clips.close()


def test_every_update_on_a_rollout_batch_is_against_the_sampling_policy(td, monkeypatch):
    """UPDATES_PER_BATCH steps, each on its share of the rows in order: every step's ratio is against the weights
    that sampled, worked out here with plain SGD from the clipped surrogate (steps large enough to clip) over every
    row and position. The update leaves out a row without loss tokens and the positions after the last one, with
    the same steps."""
    from peft import LoraConfig, get_peft_model

    from autobuster import dataset, engine
    from autobuster.model import load, lora_targets
    monkeypatch.setattr(td, "UPDATES_PER_BATCH", 3)
    monkeypatch.setattr(td, "GROUP_SIZE", 4)
    monkeypatch.setattr(td, "GRAD_CLIP", float("inf"))
    monkeypatch.setattr(td, "TRAIN_VISION", True)
    clips = dataset.TrainClips(td.SETUP, seed=0)
    drawn = clips.batch(3)
    clips.close()
    gen = torch.Generator().manual_seed(0)
    groups = []
    for i, (_, frames) in enumerate(drawn):
        lengths = torch.randint(3, 7, (4,), generator=gen)
        well_formed = [True] * 4
        if i == 1:  # a reply that rambled to the cap, out of the loss: the update leaves its row and width out
            lengths[2], well_formed[2] = 8, False
        mask = (torch.arange(8) < lengths[:, None]).long()
        groups.append(dict(frames=frames, mode=None, mask=mask, well_formed=well_formed,
                           ids=torch.randint(0, 90, (4, 8), generator=gen).masked_fill(mask == 0, 0),
                           rewards=torch.randn(4, generator=gen).tolist()))

    def policy():
        torch.manual_seed(0)
        model, processor = load(td.BASE_MODEL)
        lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=lora_targets(["q_proj"]),
                          modules_to_save=["visual"])
        model = get_peft_model(model, lora)
        return model, processor, [p for p in model.parameters() if p.requires_grad]

    ref, processor, ref_params = policy()
    prompts, ids, mask, adv, prompt_of_row = td.collate(processor, groups)
    assert ids.shape[1] == 8 and mask.any(0).nonzero().max() < 6 and not mask[6].any()  # a row, 2 positions to skip
    # micro-batches of 2 rows, so that the no-grad pass and the steps are cut differently
    monkeypatch.setattr(td, "MICRO_BATCH_TOKENS", prompts["input_ids"].shape[1] + 2 * ids.shape[1])
    lr = 2.0
    model, _, params = policy()
    before = [p.detach().clone() for p in params]
    td.update(model, torch.optim.SGD(params, lr=lr), processor, groups, {"step": 0})

    with torch.no_grad():
        sampler = engine.token_logprobs(ref, prompts, ids, prompt_of_row=prompt_of_row)
    ratios = []
    for rows in torch.arange(len(ids)).tensor_split(3):
        logp = engine.token_logprobs(ref, prompts, ids[rows], prompt_of_row=prompt_of_row[rows])
        ratio, a = torch.exp(logp - sampler[rows]), adv[rows, None]
        surrogate = torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a)
        surrogate = torch.where(a < 0, torch.maximum(surrogate, 3.0 * a), surrogate)  # the dual clip
        (-(surrogate * mask[rows]).sum() / mask[rows].sum()).backward()
        with torch.no_grad():
            for p in ref_params:
                p -= lr * p.grad
                p.grad = None
        ratios.append(ratio[mask[rows] > 0].detach())
    torch.testing.assert_close(ratios[0], torch.ones_like(ratios[0]))
    later = torch.cat(ratios[1:])
    assert ((later < 0.8) | (later > 1.28)).any() and (later - 1).abs().max() > 0.05  # steps that matter
    for p, q, w in zip(params, ref_params, before):  # the steps, up to fp32 rounding of differently cut sums
        torch.testing.assert_close(p - w, q - w, rtol=1e-3, atol=1e-3 * (q - w).abs().max().item())


def test_train_clips_name_a_generator_none_of_whose_clips_decodes(td, monkeypatch):
    """Training cannot go on without a style it draws: one clear error after a whole pass of failures, not a hang."""
    from autobuster import dataset
    from autobuster.errors import UserError
    load = dataset.load_frames

    def broken(setup, row):
        if row["generator"] == "stutter":
            raise dataset.BadVideo(f"{row['id']}: corrupt")
        return load(setup, row)

    monkeypatch.setattr(dataset, "load_frames", broken)
    clips = dataset.TrainClips(td.SETUP, seed=0)
    try:
        assert len(clips.batch(8, "fake", {"checker": 1.0, "flicker": 1.0, "stutter": 0.0, "tint": 1.0})) == 8
        with pytest.raises(UserError, match=r"none of the 50 train clips of stutter \(fake\) decodes"):
            clips.batch(1, "fake", {"checker": 0.0, "flicker": 0.0, "stutter": 1.0, "tint": 0.0})
        assert clips.skipped == 100  # two passes' worth: every clip was tried
    finally:
        clips.close()


def test_dual_clip_bounds_the_loss_of_a_negative_advantage(td):
    """verl's dual clip (c = 3): for A < 0 the token loss is -A min(c, max(r, clip(r))), so a ratio past c adds no
    gradient; a positive advantage is only clipped high, as before."""
    logp = torch.log(torch.tensor([[2.0, 4.0], [4.0, 1.0]])).requires_grad_()
    adv, mask = torch.tensor([-1.0, 1.0]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, _, high, dual = td.dapo_loss(logp, torch.zeros(2, 2), adv, mask, mask.sum())
    loss.backward()
    # tokens: r 2, A -1 -> 2 (unclipped, gradient -r A / 3); r 4, A -1 -> 3 (dual clip); r 4, A 1 -> -1.28
    assert td.DUAL_CLIP == 3.0
    assert (high.item(), dual.item()) == (1, 1)  # the masked r 1 token counts in neither
    assert loss.item() == pytest.approx((2 + 3 - 1.28) / 3, abs=1e-6)
    assert torch.allclose(logp.grad, torch.tensor([[2 / 3, 0.0], [0.0, 0.0]]), atol=1e-6)
