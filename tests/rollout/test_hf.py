"""The HF engine: K samples per prompt as token ids, EOS handling, padding-independence, seeding."""

import pytest
import torch

from sppo_lightning.module import SPPOModule
from sppo_lightning.rollout.base import PolicyHandle, SamplingParams, truncate_at_stop
from sppo_lightning.rollout.hf import HFEngine, hf_generate


def module_for(path) -> SPPOModule:  # an engine generates from the module's live policy, with its tokenizer
    module = SPPOModule(str(path))
    module.configure_model()
    return module


def chat_prompt_ids(tok, questions) -> list[list[int]]:
    """Each question as a one-turn chat, templated for generation and tokenized, as the datamodule does."""
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]  # fmt: skip
    return [tok(text, add_special_tokens=False)["input_ids"] for text in texts]


def test_truncate_at_stop_keeps_eos_and_drops_padding():
    assert truncate_at_stop([5, 6, 2, 7, 0], {2}, pad_id=0) == [5, 6, 2]
    assert truncate_at_stop([5, 6, 0, 0], {2}, pad_id=0) == [5, 6]
    assert truncate_at_stop([5, 6, 7], {2}, pad_id=0) == [5, 6, 7]  # truncated by max_new_tokens: no EOS


def test_k_samples_per_prompt_grouped_and_bounded(toy_model_dir):
    m = module_for(toy_model_dir)
    tok = m.tokenizer
    texts = [
        tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False)
        for c in ["What is 1+2?", "What is 40+41?", "What is 9+99?"]
    ]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    out = HFEngine(batch_size=8).generate(m.policy_handle(), prompts, SamplingParams(n=4, max_new_tokens=12), seed=0)
    assert out.logprobs is None  # without logprobs_from_rollout the pipeline computes them
    out = out.response_ids
    assert len(out) == 3 and all(len(g) == 4 for g in out)
    for group in out:
        for r in group:
            assert 1 <= len(r) <= 12
            assert tok.eos_token_id not in r[:-1]  # EOS, when present, is the last token
    texts = [tok.decode(r, skip_special_tokens=True) for r in out[0]]
    assert sum(t.startswith("\\boxed{") for t in texts) >= 2  # sampled at T=1, most keep the task's format


def test_same_seed_same_samples_and_rng_untouched(toy_model_dir):
    m = module_for(toy_model_dir)
    tok = m.tokenizer
    prompts = [
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": "What is 5+6?"}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )["input_ids"]
    ]
    params = SamplingParams(n=4, max_new_tokens=8)
    policy = m.policy_handle()
    torch.manual_seed(123)
    a = HFEngine().generate(policy, prompts, params, seed=5)
    after_a = torch.rand(1)
    torch.manual_seed(123)
    b = HFEngine().generate(policy, prompts, params, seed=5)
    assert a == b
    assert torch.rand(1) == after_a  # the engine's private RNG stream leaves the global one alone
    assert HFEngine().generate(policy, prompts, params, seed=6) != a


def test_a_handle_without_any_lightning_module_is_all_an_engine_needs(toy_model_dir):
    """A PolicyHandle made from a bare policy and its tokenizer (no LightningModule, no Trainer): the engine samples
    exactly what it samples through the module's own handle, and the log-probs with them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    bare = PolicyHandle(policy, tok, str(toy_model_dir), trust_remote_code=False, step=0, device=torch.device("cpu"))
    prompts = chat_prompt_ids(tok, ("What is 3+4?", "What is 33+44?"))
    params = SamplingParams(n=3, max_new_tokens=12, logprobs=True)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    engine = HFEngine(batch_size=6, logprobs_from_rollout=True)
    got, got_greedy = engine.generate(bare, prompts, params, seed=4), engine.generate(bare, prompts, greedy, seed=0)
    via_module = module_for(toy_model_dir).policy_handle()
    assert got == engine.generate(via_module, prompts, params, seed=4)
    assert got_greedy == engine.generate(via_module, prompts, greedy, seed=0)
    assert [len(g) for g in got.response_ids] == [3, 3]
    assert [[len(x) for x in g] for g in got.logprobs] == [[len(r) for r in g] for g in got.response_ids]
    assert got_greedy.logprobs is None  # not asked for (validation's calls): no logits kept
    answers = [tok.decode(g[0], skip_special_tokens=True) for g in got_greedy.response_ids]
    assert answers[1] == "\\boxed{77}"  # the toy policy answering (it gets 33+44 right, 3+4 wrong: 75)


def test_greedy_result_does_not_depend_on_left_padding(toy_model_dir):
    m = module_for(toy_model_dir)
    tok = m.tokenizer
    short = tok.apply_chat_template(
        [{"role": "user", "content": "What is 3+4?"}], add_generation_prompt=True, tokenize=False
    )
    long = tok.apply_chat_template(
        [{"role": "user", "content": "What is 33+44?"}], add_generation_prompt=True, tokenize=False
    )
    ids = [tok(short, add_special_tokens=False)["input_ids"], tok(long, add_special_tokens=False)["input_ids"]]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    batched = hf_generate(m.policy, ids, greedy, tok.pad_token_id, tok.eos_token_id, batch_size=2)
    alone = hf_generate(m.policy, ids[:1], greedy, tok.pad_token_id, tok.eos_token_id, batch_size=1)
    assert batched[0] == alone[0]


def test_logprobs_from_the_rollout_equal_a_forward_pass(toy_model_dir):
    """With logprobs_from_rollout, log π_t(y|x) comes from generation's own logits: it must equal what the training
    forward (right padding, no cache) computes for the same ids, up to float rounding; at temperature 0.7 too,
    since π_t is the policy itself, not the sampling distribution."""
    from sppo_lightning.data.batching import collate
    from sppo_lightning.data.examples import Example
    from sppo_lightning.logprobs import response_token_logps
    from sppo_lightning.rollout.hf import HFEngine

    m = module_for(toy_model_dir)
    tok = m.tokenizer
    prompts = chat_prompt_ids(tok, ("What is 3+4?", "What is 33+44?", "What is 1+99?"))
    params = SamplingParams(n=3, temperature=0.7, max_new_tokens=12, logprobs=True)
    samples = HFEngine(batch_size=4, logprobs_from_rollout=True).generate(m.policy_handle(), prompts, params, 0)
    ids, logps = samples.response_ids, samples.logprobs
    rows = [Example(prompts[p], ids[p][k], 0.0, 0.5, 0.0, p, ref_logps=logps[p][k]) for p in range(3) for k in range(3)]
    b = collate(rows, tok.pad_token_id)  # the rollout's values, response-aligned as training reads them
    with torch.no_grad():
        expected = response_token_logps(m.policy.eval(), b.input_ids, b.attention_mask, b.response_mask)
    torch.testing.assert_close(b.ref_logps, expected, atol=1e-4, rtol=1e-5)
    # the same samples as without log-probs: the option changes nothing else
    assert HFEngine(batch_size=4).generate(m.policy_handle(), prompts, params, 0).response_ids == ids


# What instruct models commonly ship in generation_config.json, and more: transformers 5 fills every field that
# generate is not given from this file, so each of these would change what the engine samples.
FOLDER_GENERATION_CONFIG = {
    "do_sample": True,
    "temperature": 0.3,
    "top_k": 3,
    "top_p": 0.5,
    "typical_p": 0.9,
    "repetition_penalty": 1.8,
    "no_repeat_ngram_size": 2,
    "min_new_tokens": 6,
    "bad_words_ids": [[93]],  # "{": the toy answers in \boxed{...}
    "suppress_tokens": [19],  # "1"
    "renormalize_logits": True,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def test_generation_uses_only_the_configured_settings_not_the_folders(toy_model_dir, tmp_path):
    """Two folders with the same weights, one whose generation_config.json sets penalties, bans, a minimum length,
    top-k...: the rollout's samples and log-probs and the greedy validation outputs are identical, and the log-probs
    are the policy's own (a forward pass), so the samples really are draws from π_t."""
    import json
    import shutil

    from sppo_lightning.data.batching import collate
    from sppo_lightning.data.examples import Example
    from sppo_lightning.logprobs import response_token_logps

    plain, shipped = tmp_path / "plain", tmp_path / "shipped"
    shutil.copytree(toy_model_dir, plain)
    (plain / "generation_config.json").unlink()
    shutil.copytree(toy_model_dir, shipped)
    (shipped / "generation_config.json").write_text(json.dumps(FOLDER_GENERATION_CONFIG))

    results = {}
    for name, path in (("plain", plain), ("shipped", shipped)):
        m = module_for(path)
        tok = m.tokenizer
        prompts = chat_prompt_ids(tok, ("What is 3+4?", "What is 33+44?", "What is 11+19?"))
        sample = SamplingParams(n=4, max_new_tokens=12, logprobs=True)
        samples = HFEngine(batch_size=8, logprobs_from_rollout=True).generate(m.policy_handle(), prompts, sample, 0)
        ids, logps = samples.response_ids, samples.logprobs
        greedy_params = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
        greedy = HFEngine().generate(m.policy_handle(), prompts, greedy_params, seed=0).response_ids
        results[name] = (ids, logps, greedy)
        assert m.policy.generation_config.repetition_penalty == (1.8 if name == "shipped" else None)  # left as loaded

    (ids, logps, greedy), (s_ids, s_logps, s_greedy) = results["plain"], results["shipped"]
    assert s_ids == ids and s_greedy == greedy
    assert s_logps == logps
    assert any("{" in tok.decode(r) for group in greedy for r in group)  # what the folder bans is still produced
    rows = [Example(prompts[p], ids[p][k], 0.0, 0.5, 0.0, p, ref_logps=logps[p][k]) for p in range(3) for k in range(4)]
    b = collate(rows, tok.pad_token_id)
    with torch.no_grad():
        expected = response_token_logps(m.policy.eval(), b.input_ids, b.attention_mask, b.response_mask)
    torch.testing.assert_close(b.ref_logps, expected, atol=1e-4, rtol=1e-5)


def sliding_window_policy(vocab_size: int):
    """A random 2-layer Gemma-2 (one full, one sliding-window layer of 3 tokens, soft-capped): its cache has layers
    a static cache cannot stand in for, so the engine keeps the growing one."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=3, pad_token_id=0,
                          attn_logit_softcapping=2.0, final_logit_softcapping=5.0)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


@pytest.mark.parametrize("policy", ["toy", "sliding-window"])
def test_k_samples_from_one_prompt_cache_are_the_plain_calls_draws(toy_model_dir, policy):
    """Each prompt's KV cache is computed once for its K samples (``shared_prompt_cache``: written into a static
    cache for the toy Qwen2, the growing cache kept for a sliding-window model): the same tokens as transformers' own
    ``num_return_sequences=K`` call with the same seed, and the same log-probs up to float rounding; prompts of
    different lengths (left padding) included."""
    from transformers import GenerationConfig

    m = module_for(toy_model_dir)
    tok = m.tokenizer
    model = (m.policy if policy == "toy" else sliding_window_policy(len(tok))).eval()
    prompts = chat_prompt_ids(tok, ("What is 3+4?", "What is 33+44?", "What is 1+99?", "What is 50+5?"))
    params = SamplingParams(n=4, max_new_tokens=12)
    width = max(map(len, prompts))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    for seed in range(5):
        torch.manual_seed(seed)
        ours, logps = hf_generate(model, prompts, params, tok.pad_token_id, tok.eos_token_id, 16, with_logprobs=True)
        torch.manual_seed(seed)
        plain = model.generate(
            input_ids=input_ids, attention_mask=(input_ids != tok.pad_token_id).long(),
            generation_config=GenerationConfig(
                do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=12, num_return_sequences=4,
                pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id], return_dict_in_generate=True,
                output_logits=True,
            ),
        )  # fmt: skip
        rows = [truncate_at_stop(r, {tok.eos_token_id}, tok.pad_token_id) for r in plain.sequences[:, width:].tolist()]
        assert [r for group in ours for r in group] == rows
        expected = torch.stack(plain.logits, 1).log_softmax(-1).gather(-1, plain.sequences[:, width:, None])[..., 0]
        for i, row in enumerate(r for group in logps for r in group):
            torch.testing.assert_close(torch.tensor(row), expected[i, : len(row)], atol=1e-4, rtol=0)
