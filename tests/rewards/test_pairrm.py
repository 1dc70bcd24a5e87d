"""PairRM, written here, against LLM-Blender's own code on a tiny random configuration; and a fit that uses it.

The reference is LLM-Blender's released wheel (llm-blender 0.0.2, whose ``pair_ranker`` files are those of the
GitHub repository's head): only its ranker and collator modules are imported, under stub parent packages, because
the package's ``__init__`` imports ``transformers.utils.hub.TRANSFORMERS_CACHE``, gone in transformers 5. The
collator's one transformers-4 call, ``tokenizer.batch_encode_plus``, is pointed at ``tokenizer.__call__``, its
transformers-5 equivalent.
"""

import importlib
import json
import sys
import types

import pytest
import torch

from sppo_lightning.data.prompts import PromptRecord
from sppo_lightning.rewards.pairrm import PairRMOracle
from sppo_lightning.rollout.base import Rollout
from tests.rewards.tiny_pairrm import CANDIDATE_MAX_LENGTH, SOURCE_MAX_LENGTH, build_tokenizer, encoder_config

PROMPTS = ["What is 2 + 2? Answer in one short sentence, please.", "Say hello."]
GROUPS = [  # lengths around the tiny truncation limits (24 prompt tokens, 12 + what the prompt leaves)
    ["It is 4.", "2 + 2 makes four, as everyone learns at school early on.", "5"],
    ["Hello!", "hi", "Good morning to you, and a very pleasant day as well, friend."],
]


def llm_blender_modules(monkeypatch):
    from tests.upstream import released_source

    root = released_source("llm-blender", "0.0.2") / "llm_blender"
    for name, path in [("llm_blender", root), ("llm_blender.pair_ranker", root / "pair_ranker"),
                       ("llm_blender.gpt_eval", root / "gpt_eval")]:  # fmt: skip
        stub = types.ModuleType(name)
        stub.__path__ = [str(path)]  # a package whose __init__ is not run
        monkeypatch.setitem(sys.modules, name, stub)
    for name in ["ranker", "collator", "layers", "model_moe", "loss"]:
        monkeypatch.delitem(sys.modules, f"llm_blender.pair_ranker.{name}", raising=False)
    monkeypatch.delitem(sys.modules, "llm_blender.gpt_eval.utils", raising=False)
    return (
        importlib.import_module("llm_blender.pair_ranker.ranker"),
        importlib.import_module("llm_blender.pair_ranker.collator"),
        importlib.import_module("llm_blender.gpt_eval.utils"),
    )


@pytest.fixture
def reference(monkeypatch, tiny_pairrm_dir):
    """LLM-Blender's CrossCompareReranker and CrossCompareCollator with the tiny folder's weights."""
    from safetensors.torch import load_file
    from transformers import DebertaV2Model

    ranker_mod, collator_mod, utils = llm_blender_modules(monkeypatch)
    tok = build_tokenizer()
    tok.batch_encode_plus = tok.__call__  # removed in transformers 5; in 4.x it was __call__ on a list of texts
    collator = collator_mod.CrossCompareCollator(SOURCE_MAX_LENGTH, tok, CANDIDATE_MAX_LENGTH)  # adds the markers
    encoder = DebertaV2Model(encoder_config(len(tok)))
    encoder.config.out_hidden_state_size = encoder.config.hidden_size  # what LLM-Blender's build_pretrained_model sets
    args = types.SimpleNamespace(
        n_tasks=1, num_pos=1, num_neg=1, sub_sampling_mode="all_pair", sub_sampling_ratio=0.5,
        loss_type="instructgpt", drop_out=0.05, inference_mode="bubble",
    )  # fmt: skip
    ranker = ranker_mod.CrossCompareReranker(encoder, args, tok)
    result = ranker.load_state_dict(load_file(tiny_pairrm_dir / "model.safetensors"), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    return ranker.eval(), collator, utils


def reference_full_predict(ranker, collator, prompt, candidates):
    """``[K, K]`` logits L(i, j) as ``Blender.rank`` computes them (one prompt per batch, as the SPPO authors')."""
    batch = collator([{"source": prompt, "candidates": candidates}])
    del batch["scores"]
    with torch.no_grad():
        return ranker._full_predict(**batch)["logits"][0]


def rollout_of(prompts, groups):
    return Rollout(
        prompts=[PromptRecord([{"role": "user", "content": p}], "") for p in prompts],
        prompt_ids=[[1] for _ in prompts],
        response_ids=[[[1] for _ in g] for g in groups],
        response_text=groups,
    )


def test_logits_match_llm_blender_to_1e5(reference, tiny_pairrm_dir):
    ranker, collator, _ = reference
    oracle = PairRMOracle(str(tiny_pairrm_dir), batch_size=5)  # batches mix prompts and lengths: padding is inert
    for prompt, group in zip(PROMPTS, GROUPS, strict=True):
        expected = reference_full_predict(ranker, collator, prompt, group)
        pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
        got = oracle.logits([prompt] * 6, [group[i] for i, _ in pairs], [group[j] for _, j in pairs])
        torch.testing.assert_close(got, torch.stack([expected[i, j] for i, j in pairs]), atol=1e-5, rtol=0)
        assert got.abs().max() > 0.1  # not a flat judge: the comparison means something
    # the inputs were cut: the longest response is longer than any candidate budget
    assert len(oracle.tokens.tokenizer(GROUPS[1][2])["input_ids"]) > CANDIDATE_MAX_LENGTH + SOURCE_MAX_LENGTH // 2


# LLM-Blender's logits L(i, j) for PROMPTS / GROUPS on the tiny folder (build_tiny_pairrm, seed 0), recorded so that
# the comparison also runs where the wheel cannot be downloaded: reference_full_predict(...) of the fixture above,
# rounded to 7 decimals, with llm-blender 0.0.2, torch 2.13.0+cpu, transformers 5.24.0 (2026-11-25).
RECORDED = [
    [[0.0, 5.0251627, 6.1970043], [6.0707111, 0.0, 5.5478945], [6.5786877, 4.5089102, 0.0]],
    [[0.0, 2.0663271, 2.3072538], [0.4060917, 0.0, 1.9085325], [1.4438057, 0.7274971, 0.0]],
]


def test_logits_match_recorded_llm_blender_values(tiny_pairrm_dir):
    oracle = PairRMOracle(str(tiny_pairrm_dir))
    for prompt, group, expected in zip(PROMPTS, GROUPS, RECORDED, strict=True):
        pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
        got = oracle.logits([prompt] * 6, [group[i] for i, _ in pairs], [group[j] for _, j in pairs])
        torch.testing.assert_close(got, torch.tensor([expected[i][j] for i, j in pairs]), atol=1e-5, rtol=0)


def test_authors_pipeline_win_rates_match_to_1e5(reference, tiny_pairrm_dir):
    """``from_scores``: uclaml/SPPO's rank.py (Blender.rank, return_scores) + compute_prob.py (σ(s_i − s_j)), then
    the win-rate their trainer regresses on: the row mean of that matrix, the response against itself included."""
    ranker, collator, utils = reference
    expected = []
    for prompt, group in zip(PROMPTS, GROUPS, strict=True):
        cmp = reference_full_predict(ranker, collator, prompt, group)
        s = torch.as_tensor(utils.get_scores_from_cmps(cmp[None].numpy()))[0]
        expected.append(torch.sigmoid(s[:, None] - s[None, :]).mean(dim=1))
    rollout = rollout_of(PROMPTS, GROUPS)
    scores = PairRMOracle(str(tiny_pairrm_dir), from_scores=True).score(rollout)
    torch.testing.assert_close(scores.win_rates, torch.stack(expected), atol=1e-5, rtol=0)


def test_prefer_is_blender_compare_of_both_orders(reference, tiny_pairrm_dir):
    """``Blender.compare`` (mode "[A,B]+[B,A]") ranks the two candidates and returns s_A − s_B; prefer is σ of it."""
    ranker, collator, utils = reference
    oracle = PairRMOracle(str(tiny_pairrm_dir))
    a, b = GROUPS[0][0], GROUPS[0][1]
    cmp = reference_full_predict(ranker, collator, PROMPTS[0], [a, b])
    s = utils.get_scores_from_cmps(cmp[None].numpy())[0]
    p = oracle.prefer([PROMPTS[0]] * 2, [a, b], [b, a], None)
    torch.testing.assert_close(p, torch.sigmoid(torch.tensor([s[0] - s[1], s[1] - s[0]])), atol=1e-5, rtol=0)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)  # position bias cancels by construction


def test_pairwise_win_rates_by_hand(tiny_pairrm_dir):
    """Default mode: P(i ≻ j) = σ(L(i, j) − L(j, i)) per pair; P̂_i = (½ + Σ_{j≠i} P(i ≻ j)) / K."""
    oracle = PairRMOracle(str(tiny_pairrm_dir))
    rollout = rollout_of(PROMPTS[:1], GROUPS[:1])
    scores = oracle.score(rollout)
    group = GROUPS[0]
    L = {(i, j): oracle.logits([PROMPTS[0]], [group[i]], [group[j]])[0] for i in range(3) for j in range(3) if i != j}
    expected = [(0.5 + sum(torch.sigmoid(L[i, j] - L[j, i]) for j in range(3) if j != i)) / 3 for i in range(3)]
    torch.testing.assert_close(scores.win_rates[0], torch.stack(expected), atol=1e-6, rtol=0)
    assert scores.win_rates.sum().item() == pytest.approx(1.5, abs=1e-5)  # K/2: every pair's ½ + ½ is shared


def test_bin_weights_load_as_tensors_only(tmp_path):
    from sppo_lightning.errors import ConfigError
    from tests.rewards.tiny_pairrm import build_tiny_pairrm

    folder = build_tiny_pairrm(tmp_path / "bin", safetensors=False)
    assert PairRMOracle(str(folder)).prefer(["q"], ["a"], ["b"], None).shape == (1,)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({"state": state, "hook": types.SimpleNamespace(x=1)}, folder / "pytorch_model.bin")  # not just tensors
    with pytest.raises(ConfigError, match="not a plain tensor state dict"):
        PairRMOracle(str(folder)).load()


def test_a_response_that_writes_a_marker_is_judged_as_if_it_were_a_space(tiny_pairrm_dir):
    oracle = PairRMOracle(str(tiny_pairrm_dir))
    got = oracle.logits(["Say hello."] * 2, ["Hello<|candidate2|>!", "Hello !"], ["hi", "hi"])
    assert got[0].item() == pytest.approx(got[1].item(), abs=1e-6)


def test_a_missing_judge_is_one_config_error(tmp_path):
    from sppo_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="neither a folder nor a hub repo"):
        PairRMOracle(str(tmp_path / "no-such-folder")).load()  # the tests run with HF_HUB_OFFLINE=1


@pytest.mark.slow
def test_demo_fits_with_the_tiny_pairrm_judge(tmp_path, tiny_pairrm_dir):
    """Two iterations of the demo judged by PairRM, end to end on CPU; the win-rates the run trained on are the
    judge's own on the logged responses."""
    from tests.test_cli import DEMO, SHORT, read_metrics, run

    run(
        "fit", "--config", DEMO, *SHORT, "--data.oracle=sppo_lightning.rewards.PairRMOracle",
        f"--data.oracle.init_args.model_name_or_path={tiny_pairrm_dir}", "--data.prompts_per_epoch=8",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
    )  # fmt: skip
    losses = [float(r["train/loss"]) for r in read_metrics(tmp_path) if r.get("train/loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {r["epoch"] for r in rows} == {0, 1}
    rollout = rollout_of([r["prompt"] for r in rows], [[x["text"] for x in r["responses"]] for r in rows])
    scores = PairRMOracle(str(tiny_pairrm_dir)).score(rollout)
    logged = torch.tensor([[x["win_rate"] for x in r["responses"]] for r in rows])
    torch.testing.assert_close(logged, scores.win_rates, atol=1e-5, rtol=0)
    assert logged.std() > 0.01  # graded preferences, not ties
