"""The shipped toy model and task: the folder loads as any HF model, its tokenizer round-trips text exactly."""

from transformers import AutoModelForCausalLM, AutoTokenizer

from sppo_lightning.rewards.math import compute_score
from sppo_lightning.toy.task import addition_problems, addition_records, format_answer


def test_splits_are_disjoint_and_balanced():
    train, val = set(addition_problems("train")), set(addition_problems("val"))
    assert not train & val
    assert len(train) + len(val) == 100 * 100
    # every last digit of the sum appears in validation (a split by a linear hash once put only 0s there)
    assert {(a + b) % 10 for a, b in val} == set(range(10))


def test_records_follow_verl_schema_and_answers_score():
    rec = addition_records("val", num_prompts=3, seed=1)[0]
    a, b = rec["extra_info"]["a"], rec["extra_info"]["b"]
    assert rec["prompt"] == [{"role": "user", "content": f"What is {a}+{b}?"}]
    assert rec["reward_model"] == {"style": "rule", "ground_truth": str(a + b)}
    assert compute_score(format_answer(a + b), rec["reward_model"]["ground_truth"]) == 1.0
    assert compute_score(format_answer(a + b + 1), rec["reward_model"]["ground_truth"]) == 0.0


def test_shipped_tokenizer_round_trips_text_exactly(toy_model_dir):
    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    for text in ["What is 12 + 3?", "  two  spaces\nnew line\t tab", "\\boxed{\\frac{1}{2}}", "héllo ☃"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 3+4?"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_shipped_model_is_small_and_answers_in_the_format(toy_model_dir):
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    assert model.config.model_type == "qwen2"
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert sum(f.stat().st_size for f in toy_model_dir.iterdir()) < 5 * 2**20  # a few MB at most
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 21+30?"}], add_generation_prompt=True, tokenize=False
    )
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.startswith("\\boxed{") and text.endswith("}")
