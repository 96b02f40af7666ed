"""`autobuster bench` end to end on CPU at the tiny size: both paths measured, the engine's greedy tokens equal to
Hugging Face generate's on the same random model."""
import json

import pytest

from autobuster.bench import bench
from autobuster.cli import main


def test_bench_runs_both_paths_and_agrees_with_generate(tmp_path):
    out = tmp_path / "bench.json"
    main(["bench", "--size", "tiny", "--frames", "4", "--side", "56", "--prompts", "2", "--group", "2",
          "--new-tokens", "4", "--check", "--eval-clips", "3", "--eval-batch", "2", "--eval-new-tokens", "4",
          "--json", str(out)])
    r = json.loads(out.read_text())
    agree = r["greedy_agreement"]
    for key in ("free", "forced", "plain_forced", "forced_clear", "free_clear", "cascade_forced",
                "cascade_forced_clear"):
        assert agree[key] == 1.0, key
    assert agree["cascade"] and agree["noise"] < 1e-4 and agree["clear"] > 0.9  # fp32: no near-ties
    assert agree["free_clear_positions"] > 0
    assert r["setting"]["rows"] == 4
    assert r["setting"]["prompt_tokens"] == 142 + (4 // 2) * (56 // 28) ** 2  # text + video tokens
    for path in ("engine", "plain"):
        assert r[path]["rollout_tokens_per_s"] > 0 and r[path]["update_s"] > 0
    assert r["eval"]["clips"] == 3 and r["eval"]["batch"] == 2 and r["eval"]["clips_per_s"] > 0
    # the floors: every row's copy of its prompt (old), each prompt once per group (shared), the engine's buffer
    f, plen = r["floor"], r["setting"]["prompt_tokens"]
    assert f["old_kv_gb"] / f["shared_kv_gb"] == pytest.approx((4 * (plen + 2)) / (2 * plen + 4 * 2))
    assert r["setting"]["cascade"]  # 2 samples per prompt: the engine reads each prompt once, 16-aligned
    assert f["path_kv_gb"] / f["old_kv_gb"] == pytest.approx((2 * 160 + 4 * 16) / (4 * (plen + 2)))  # plen 150
    assert {"weights_read_gb", "shared_ms_per_step", "path_ms_per_step", "decode_ms_per_step"} <= f.keys()  # ms: GPU


def test_bench_runs_qwen3_5_through_both_paths(tmp_path):
    """The bench at the tiny Qwen3.5 shapes (Gated DeltaNet layers, patch 16, a timestamp before each frame pair):
    the engine decodes what generate does, updates, evaluates, and the floor counts the recurrent states."""
    out = tmp_path / "bench.json"
    main(["bench", "--family", "qwen3.5", "--size", "tiny", "--frames", "4", "--side", "64", "--prompts", "2",
          "--group", "2", "--new-tokens", "4", "--check", "--eval-clips", "2", "--eval-batch", "2",
          "--eval-new-tokens", "4", "--json", str(out)])
    r = json.loads(out.read_text())
    agree = r["greedy_agreement"]
    for key in ("free", "forced", "plain_forced", "cascade_forced"):
        assert agree[key] == 1.0, key
    assert r["setting"]["cascade"] and r["setting"]["family"] == "qwen3.5"  # its attention layers share prompts
    assert r["setting"]["prompt_tokens"] == 142 + 2 * (4 + 2 + (64 // 32) ** 2) - 2  # each pair: stamp, run, ends
    for path in ("engine", "plain"):
        assert r[path]["rollout_tokens_per_s"] > 0 and r[path]["update_s"] > 0
    # 3 Gated DeltaNet layers x 4 rows, read and written: fp32 recurrent state 4 x 16 x 16, conv 128 channels x 4
    assert r["floor"]["states_gb"] * 1e9 == pytest.approx(4 * 3 * 2 * (4 * 4 * 16 * 16 + 2 * 128 * 4))


@pytest.mark.parametrize("args,message", [
    (["--size", "13b"], "unknown --size '13b': use one of 7b, 3b, tiny"),
    (["--family", "qwen3.5", "--size", "7b"], "unknown --size '7b' for qwen3.5: use one of 4b, tiny"),
    (["--family", "llama"], "unknown --family 'llama': use qwen2.5-vl or qwen3.5"),
])
def test_bench_refuses_an_unknown_size_or_family(args, message, capsys):
    with pytest.raises(SystemExit):
        main(["bench", *args])
    assert capsys.readouterr().err.strip() == f"error: {message}"
