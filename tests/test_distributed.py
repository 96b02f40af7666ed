"""Data parallel DAPO: train_dapo.update on 2 gloo processes under torchrun, each with half the groups, against one
process that sees every group. Given completions and rewards (no sampling), so both sides see the same numbers.

Run as a script, this file is the worker: `python tests/test_distributed.py OUT` (one process, no torch.distributed)
or under torchrun (each rank takes its share of the groups)."""
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
G = 4  # completions per group
LENGTHS = [(2, 4), (3, 5), (30, 40), (35, 48)]  # completion lengths per group: the last two are ~10x longer
SPLITS = {"halves": ([0, 1], [2, 3]), "one rank empty": ([0, 1, 2, 3], [])}  # groups of rank 0, rank 1
VISION = ("trained tower", "frozen tower")  # the tiny profile's setting, and the 7B one (video features once)
LR = 0.5


def completions():
    """Fixed completions, rewards and format flags per group; one malformed reply per group stays out of the loss."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for lo, hi in LENGTHS:
        lengths = torch.randint(lo, hi + 1, (G,), generator=gen)
        mask = (torch.arange(hi) < lengths[:, None]).long()
        ids = torch.randint(0, 90, (G, hi), generator=gen).masked_fill(mask == 0, 0)  # ordinary characters
        out.append(dict(ids=ids, mask=mask, mode=None, rewards=torch.randn(G, generator=gen).tolist(),
                        well_formed=[True] * (G - 1) + [False]))
    return out


def worker(out: Path):
    from peft import LoraConfig, get_peft_model

    import train_dapo as td
    from autobuster import dataset, distributed, engine
    from autobuster.model import load, lora_targets

    rank, world = distributed.init()
    # 3 rows per micro-batch (the prompt is 161 tokens), cutting across groups; no clipping, so that the comparison
    # sees the gradient's scale; one optimizer step per batch (with more, each rank cuts its own mini-batches)
    td.GROUP_SIZE, td.MICRO_BATCH_TOKENS, td.GRAD_CLIP, td.UPDATES_PER_BATCH = G, 630, float("inf"), 1
    clips = dataset.TrainClips(td.SETUP, seed=0)
    groups = [g | dict(frames=frames) for g, (_, frames) in zip(completions(), clips.batch(len(LENGTHS)))]
    clips.close()
    cases = SPLITS.items() if world > 1 else [("single", [range(len(LENGTHS))])]
    for (name, split), vision in itertools.product(cases, VISION):
        td.TRAIN_VISION = vision == "trained tower"
        torch.manual_seed(rank)  # a different random init on each rank: the broadcast must make them equal
        model, processor = load(td.BASE_MODEL)
        lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=lora_targets(["q_proj", "v_proj"]),
                          modules_to_save=["visual"] if td.TRAIN_VISION else None)
        model = get_peft_model(model, lora)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        distributed.broadcast(trainable.values())
        before = {n: p.detach().clone() for n, p in trainable.items()}
        # SGD, not AdamW: Adam's first step is lr * sign(grad), blind to a wrongly scaled gradient
        opt = torch.optim.SGD(trainable.values(), lr=LR)
        mine = [groups[i] for i in split[rank]]
        if not td.TRAIN_VISION and mine:  # the video features a rollout keeps with its groups for a frozen tower
            with torch.no_grad():
                features = engine.video_features(model, td.collate(processor, mine)[0])
            mine = [g | dict(features=features[i]) for i, g in enumerate(mine)]
        loss, *_, norm = td.update(model, opt, processor, mine, {"step": 0})
        torch.save(dict(loss=loss, norm=norm, before=before, distributed=torch.distributed.is_initialized(),
                        after={n: p.detach().clone() for n, p in trainable.items()}),
                   out / f"{name}-{vision}-{rank}.pt")
    distributed.close()


@pytest.fixture(scope="module")
def results(tiny_home, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(cmd + [__file__, str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for cmd in ([sys.executable], [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                           "--nproc-per-node", "2"])]
    for p in runs:
        log = p.communicate()[0]
        assert p.returncode == 0, log[-5000:]
    return {f.stem: torch.load(f) for f in out.glob("*.pt")}


def test_one_process_starts_no_process_group(results):
    assert not results["single-frozen tower-0"]["distributed"] and results["halves-frozen tower-0"]["distributed"]


@pytest.mark.parametrize("vision", VISION)
@pytest.mark.parametrize("split", SPLITS)
def test_one_step_on_two_ranks_equals_one_process(results, split, vision):
    single = results[f"single-{vision}-0"]
    moved = [name for name, w in single["after"].items() if not torch.equal(w, single["before"][name])]
    assert len(moved) > len(single["after"]) // 2  # the step changed the weights: equal weights mean equal steps
    for rank in (0, 1):
        r = results[f"{split}-{vision}-{rank}"]
        assert r["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert r["norm"] == pytest.approx(single["norm"], rel=1e-5)
        for name, w in single["after"].items():
            assert torch.equal(r["before"][name], single["before"][name]), name  # rank 0's init everywhere
            # the steps agree up to fp32 rounding: of the gradient sums' order (measured: 1.6e-6 of the largest
            # step) and of the weights they are added to; a wrong normaliser or a missing all-reduce changes
            # them by tens of percent
            step, ref = r["after"][name] - r["before"][name], w - single["before"][name]
            tol = 1e-4 * ref.abs().max().item() + 1e-6 * w.abs().max().item()
            assert torch.allclose(step, ref, rtol=1e-4, atol=tol), name


def test_the_normaliser_is_the_global_token_count(results):
    # At the first step the ratio is 1, so the loss is -sum(advantage * valid tokens) / all valid tokens.
    per_rank = []
    for rows in SPLITS["halves"]:
        adv_tokens, tokens = 0.0, 0.0
        for g in (completions()[i] for i in rows):
            r = torch.tensor(g["rewards"])
            adv = (r - r.mean()) / (r.std() + 1e-6)
            valid = g["mask"].sum(1) * torch.tensor(g["well_formed"])
            adv_tokens, tokens = adv_tokens + (adv * valid).sum().item(), tokens + valid.sum().item()
        per_rank.append((adv_tokens, tokens))
    (a0, n0), (a1, n1) = per_rank
    assert n1 > 5 * n0  # very different completion lengths on the two ranks
    expected = -(a0 + a1) / (n0 + n1)
    for run in ("halves-trained tower-0", "single-trained tower-0"):
        assert results[run]["loss"] == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(-(a0 / n0 + a1 / n1) / 2, rel=0.05)  # rank-local normalisers would differ


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
