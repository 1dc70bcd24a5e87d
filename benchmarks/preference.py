"""SPPO where it was made for: a graded, then partly intransitive, then length-biased pairwise judge. Our loss types
(the Nash-learning ones on the same K x K matrix included) against TRL's online DPO and GRPO given the same judge, at
equal numbers of completions.

    pip install -e ".[bench]"
    python benchmarks/preference.py [--setting graded|intransitive|length-biased] [--seeds 1] [--first-seed 0]
        [--iterations 10] [--prompts 64] [--methods sppo sppo_pair dpo ipo inpo dno trl_online_dpo trl_grpo]
        [--val 200] [--length-bias 0.5]

The task is the toy addition with the shipped tiny model, as in ``benchmarks/vs_trl.py`` (same prompts, K = 4
samples of 64 prompts per round, 16 new tokens, lr 1e-4, 64 completions per optimizer step, one pass). The oracle is
``sppo_lightning.toy.judge.ClosenessJudge`` (its docstring has the formula): ``graded`` is σ((d(b) − d(a)) / 2), d
the distance of the answer to the sum, so a response one closer wins 62 %; ``intransitive`` adds a rock-paper-scissors
cycle of weight 1 logit on the answer's residue mod 3 (0 ≻ 1 ≻ 2 ≻ 0), so near the truth there is no best answer;
``length-biased`` adds ``--length-bias`` logits per character of length difference to the graded judge (it prefers
longer answers whatever they say, as PairRM and GPT-4 judges do) and trains every method on it, while a separate,
unbiased graded judge evaluates: a method that wins by the training judge and not by the held-out one learned the
bias. The table then reports both judges' win rates, the held-out judge's length-controlled win rate (AlpacaEval 2's,
``sppo_lightning.lc_win_rate``) and the answers' length.

- Ours (``sppo`` all K, ``sppo_pair``, ``dpo``, ``ipo``, ``inpo``, ``dno``): the same iteration loop, the judge as
  ``data.oracle`` (win-rates from the symmetrised K × K matrix, which INPO regresses on directly), η = 2, DPO and DNO
  β = 0.1, IPO τ = 0.1, INPO τ = 0.1 (ητ = 0.2 towards the starting policy): the demo's settings.
- ``trl_grpo``: TRL 1.16's GRPOTrainer with vs_trl's matched settings (β = 0, no reference model) and, as reward,
  each completion's mean preference over its group of K (itself counted ½): exactly our P̂(y ≻ π_t), which GRPO then
  centres and divides by the group's standard deviation.
- ``trl_online_dpo``: TRL 1.16's OnlineDPOTrainer (experimental), 32 prompts × 2 samples per step (64 completions,
  as ours), β = 0.1, its fixed initial-model reference, and as reward of each of the two samples the judge's
  symmetrised probability that it beats the other (TRL picks the higher as chosen).

After training, each policy answers ``--val`` held-out problems greedily. Reported: the evaluation judge's win rate of
those answers against the starting policy's greedy answers (mean over prompts, then mean ± s.e. over seeds; ½ = no
change), and with ``length-biased`` the training judge's too, the length-controlled win rate and the mean answer length
in characters; exact accuracy (the boxed-answer checker), and seconds per 1,000 completions (median over seeds, all
methods in this one process, alternated within each seed; each method's training loop, its setup left out, as in
``vs_trl.py``). A graded judge of closeness need not raise exact accuracy, and the intransitive one rewards wrong
answers of the winning style: both are measured.
Last lines: ``time_ratio_sppo_over_trl_grpo=<x>`` and ``time_ratio_sppo_over_trl_online_dpo=<x>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from argtypes import at_least  # noqa: E402
from vs_trl import LR, MICRO, NEW_TOKENS, PROMPTS, Clock, K, greedy_texts, mean_and_se, run_ours, run_trl  # noqa: E402

OURS = ("sppo", "sppo_pair", "dpo", "ipo", "inpo", "dno")  # the paper's loss, its baselines, the Nash learners
TRL = ("trl_online_dpo", "trl_grpo")
SETTINGS = {"graded": 0.0, "intransitive": 1.0, "length-biased": 0.0}  # the judge's cycle weight
SCALE = 2.0
LENGTH_BIAS = 0.5  # logits per character the length-biased training judge adds for the longer answer


def make_judge(setting: str, length_bias: float = LENGTH_BIAS):
    """The judge every method trains on."""
    from sppo_lightning.toy.judge import ClosenessJudge

    bias = length_bias if setting == "length-biased" else 0.0
    return ClosenessJudge(scale=SCALE, cycle=SETTINGS[setting], length_bias=bias)


def eval_judge(setting: str):
    """The judge the table's win rate is by: the training judge, except for ``length-biased``, where it is the same
    graded judge without the bias (held out from training)."""
    return make_judge("graded" if setting == "length-biased" else setting)


def prompt_record(messages):
    from sppo_lightning.data.prompts import PromptRecord

    return PromptRecord(messages=messages, ground_truth="")


def group_preference_reward(judge, k: int):
    """GRPO's reward: each completion's mean preference over its group of ``k`` (consecutive in TRL's batch)."""
    from sppo_lightning.rollout.base import Rollout

    def reward(prompts, completions, **kwargs):
        texts = [c[0]["content"] for c in completions]
        groups = range(0, len(texts), k)
        if any(prompts[g + i] != prompts[g] for g in groups for i in range(k)):
            raise RuntimeError("TRL's batch is not in consecutive groups of num_generations")
        rollout = Rollout(
            prompts=[prompt_record(prompts[g]) for g in groups],
            prompt_ids=[[] for _ in groups],
            response_ids=[[[]] * k for _ in groups],
            response_text=[texts[g : g + k] for g in groups],
        )
        return judge.score(rollout).win_rates.flatten().tolist()

    reward.__name__ = "group_preference"
    return reward


def pair_preference_reward(judge):
    """Online DPO's reward: the first and second halves of the batch are the two samples of each prompt; each gets
    the judge's (symmetrised) probability that it beats the other."""
    from sppo_lightning.evaluation import preference_over_reference

    def reward(prompts, completions, **kwargs):
        texts = [c[0]["content"] for c in completions]
        b = len(texts) // 2
        records = [prompt_record(p) for p in prompts[:b]]
        first = preference_over_reference(judge, records, [[t] for t in texts[:b]], [[t] for t in texts[b:]])
        return [*first.flatten().tolist(), *(1 - first).flatten().tolist()]

    reward.__name__ = "pair_preference"
    return reward


def run_trl_online_dpo(iterations: int, seed: int, out: Path, judge, lr: float = LR, prompts: int = PROMPTS) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from sppo_lightning.toy import MODEL_DIR
    from sppo_lightning.toy.task import addition_records

    clock = Clock()
    rows = [{"prompt": r["prompt"]} for r in addition_records("train", seed=seed)]
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    steps = iterations * prompts * K // MICRO  # 2 completions per prompt: MICRO // 2 prompts per step
    config = OnlineDPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, gradient_checkpointing=False, beta=0.1, learning_rate=lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=MICRO // 2, gradient_accumulation_steps=1, max_new_tokens=NEW_TOKENS,
        temperature=1.0, top_p=1.0, top_k=0, max_steps=steps, logging_steps=10**9, save_strategy="no",
        report_to="none", seed=seed, disable_tqdm=True, dataloader_num_workers=0, disable_dropout=False,
    )  # fmt: skip
    trainer = OnlineDPOTrainer(
        model=model, reward_funcs=pair_preference_reward(judge), args=config, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, callbacks=[clock.trl_callback()],
    )  # fmt: skip
    trainer.train()
    return {**clock.stop(), "completions": steps * MICRO, "steps": trainer.state.global_step,
            "model": trainer.model, "tokenizer": tokenizer}  # fmt: skip


def run_method(
    method: str,
    setting: str,
    iterations: int,
    seed: int,
    out: Path,
    eta: float = 2.0,
    prompts: int = PROMPTS,
    length_bias: float = LENGTH_BIAS,
) -> dict:
    judge = make_judge(setting, length_bias)
    if method in OURS:
        overrides = (
            f"--model.loss_type={method}",
            "--data.oracle=sppo_lightning.toy.judge.ClosenessJudge",
            f"--data.oracle.init_args.scale={SCALE}",
            f"--data.oracle.init_args.cycle={SETTINGS[setting]}",
            f"--data.oracle.init_args.length_bias={judge.length_bias}",
            f"--model.eta={eta}",
        )
        return run_ours(iterations, seed, out, overrides=overrides, prompts=prompts)
    if method == "trl_grpo":
        return run_trl(iterations, seed, out, reward_fn=group_preference_reward(judge, K), prompts=prompts)
    return run_trl_online_dpo(iterations, seed, out, judge, prompts=prompts)


def evaluate(model, tokenizer, records, start_texts, judge, train_judge) -> dict:
    """The held-out ``judge``'s win rate against the starting answers, its length-controlled version (lengths in
    characters, as AlpacaEval), the training judge's win rate, the answers' mean length and exact accuracy."""
    from sppo_lightning.evaluation import preference_over_reference
    from sppo_lightning.lc_win_rate import length_controlled_win_rate
    from sppo_lightning.rewards.base import rule_scores
    from sppo_lightning.rewards.math import compute_score

    texts = greedy_texts(model, tokenizer, records)
    preference = preference_over_reference(judge, records, texts, start_texts).flatten()
    lengths = torch.tensor([len(g[0]) for g in texts], dtype=torch.float64)
    start_lengths = torch.tensor([len(g[0]) for g in start_texts], dtype=torch.float64)
    return {
        "win_rate": float(preference.mean()),
        "win_rate_lc": length_controlled_win_rate(preference, lengths - start_lengths),
        "win_rate_train_judge": float(preference_over_reference(train_judge, records, texts, start_texts).mean()),
        "length": float(lengths.mean()),
        "accuracy": float(rule_scores(compute_score, texts, records).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="graded")
    parser.add_argument("--seeds", type=at_least(1), default=1, help="how many seeds (each runs every method once)")
    parser.add_argument(
        "--first-seed", type=at_least(0), default=0, help="seeds first-seed, first-seed + 1, ...; the table merges "
        "every earlier invocation's runs found in --out for the same setting, rounds and --val (split methods and "
        "seeds over several invocations to keep each short; the time ratios come from one invocation)"
    )  # fmt: skip
    parser.add_argument("--iterations", type=at_least(1), default=10, help="generation rounds of 64 x 4 completions")
    parser.add_argument("--prompts", type=at_least(1), default=PROMPTS, help="prompts per round (x 4 samples)")
    parser.add_argument("--methods", nargs="+", default=[*OURS, *TRL], choices=[*OURS, *TRL])
    parser.add_argument("--val", type=at_least(1), default=200, help="held-out problems answered greedily")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "preference")
    parser.add_argument("--eta", type=float, default=2.0, help="η of our loss types (the demo's 2 by default)")
    parser.add_argument(
        "--threads", type=at_least(1), default=1, help="torch CPU threads (1: fair on a shared machine)"
    )
    parser.add_argument(
        "--length-bias", type=float, default=LENGTH_BIAS, help="length-biased setting: the training judge's logits "
        "per character of length difference"
    )  # fmt: skip
    args = parser.parse_args()
    if args.prompts * K % MICRO:
        parser.error(f"--prompts: {args.prompts} x {K} samples is not a whole number of {MICRO}-completion steps")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sppo_lightning.toy import MODEL_DIR, AdditionPrompts

    judge, train_judge = eval_judge(args.setting), make_judge(args.setting, args.length_bias)
    val = AdditionPrompts("val", num_prompts=args.val, seed=1).load()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    start_texts = greedy_texts(AutoModelForCausalLM.from_pretrained(MODEL_DIR), tokenizer, val)
    start = evaluate(AutoModelForCausalLM.from_pretrained(MODEL_DIR), tokenizer, val, start_texts, judge, train_judge)

    results: dict[str, list[dict]] = {label(m, args.eta): [] for m in args.methods}
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for seed in seeds:
        for method in args.methods:
            with tempfile.TemporaryDirectory() as tmp:
                got = run_method(
                    method, args.setting, args.iterations, seed, Path(tmp), args.eta, args.prompts, args.length_bias
                )
            got.update(evaluate(got.pop("model"), got.pop("tokenizer"), val, start_texts, judge, train_judge))
            got["s_per_1000"] = 1000 * got["seconds"] / got["completions"]
            got["seed"] = seed
            results[label(method, args.eta)].append(got)
            save(args, seeds, start, results)  # after every run: a run cut short keeps what it finished
            print(f"seed {seed} {method:>14}: {got['seconds']:.1f} s for {got['completions']} completions, "
                  f"{got['steps']} steps, win rate vs start {got['win_rate']:.1%} (LC {got['win_rate_lc']:.1%}, "
                  f"training judge {got['win_rate_train_judge']:.1%}), length {got['length']:.1f}, "
                  f"accuracy {got['accuracy']:.1%}", flush=True)  # fmt: skip

    median = {m: statistics.median(r["s_per_1000"] for r in runs) for m, runs in results.items()}
    for trl in TRL:  # from this invocation only: absolute times drift between runs on a shared machine
        if "sppo" in median and trl in median:
            print(f"time_ratio_sppo_over_{trl}={median['sppo'] / median[trl]:.3f}")
    print_table(args.out, args.setting, args.iterations, args.val, start, args.prompts, args.length_bias)


def label(method: str, eta: float) -> str:
    """A method's name in the table: the SPPO losses with a non-default η carry it (DPO and IPO have none)."""
    from sppo_lightning.loss import LOSSES

    has_eta = method in LOSSES and LOSSES[method].target is not None  # η lives in the targets
    return f"{method} (η = {eta:g})" if has_eta and eta != 2.0 else method


def save(args, seeds: range, start: dict, results: dict) -> None:
    """One JSON per invocation, named by setting, rounds, seeds and methods."""
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"setting": args.setting, "iterations": args.iterations, "val": args.val, "prompts": args.prompts,
              "start": start, "runs": results}  # fmt: skip
    if args.setting == "length-biased":
        record["length_bias"] = args.length_bias
    eta = "" if args.eta == 2.0 else f"_eta{args.eta:g}"
    if args.setting == "length-biased" and args.length_bias != LENGTH_BIAS:
        eta += f"_bias{args.length_bias:g}"
    name = f"{args.setting}_r{args.iterations}_seeds{seeds[0]}-{seeds[-1]}_{'+'.join(args.methods)}{eta}.json"
    (args.out / name).write_text(json.dumps(record, indent=2))


def print_table(
    out: Path, setting: str, iterations: int, val: int, start: dict, prompts: int = PROMPTS,
    length_bias: float = LENGTH_BIAS,
) -> None:  # fmt: skip
    """The table over every seed run so far for this setting, rounds and validation size (one JSON per invocation)."""
    merged: dict[str, list[dict]] = {label(m, 2.0): [] for m in (*OURS, *TRL)}  # the table's order
    seen: dict[str, set[int]] = {}  # a method and seed run twice counts once
    biased = setting == "length-biased"
    for path in sorted(out.glob(f"{setting}_r{iterations}_seeds*.json")):
        record = json.loads(path.read_text())
        if (
            record.get("val") == val
            and record.get("prompts", PROMPTS) == prompts
            and (not biased or record.get("length_bias") == length_bias)
        ):
            for method, runs in record["runs"].items():
                merged.setdefault(method, []).extend(r for r in runs if r["seed"] not in seen.get(method, set()))
                seen.setdefault(method, set()).update(r["seed"] for r in runs)
    merged = {m: runs for m, runs in merged.items() if runs}
    seeds = max(len(runs) for runs in merged.values())
    judge = f"judge scale {SCALE}, cycle {SETTINGS[setting]}" + (f", length bias {length_bias:g}/char" * biased)
    print(f"\nsetting {setting} ({judge}); {iterations} rounds of {prompts}x{K} completions; {val} held-out problems, "
          f"starting greedy accuracy {start['accuracy']:.1%}, length {start.get('length', 0):.1f} chars")  # fmt: skip
    columns = [("win_rate", "win rate vs start" + (" (held-out judge)" if biased else "")),
               ("win_rate_lc", "LC win rate" + (" (held-out judge)" if biased else ""))]  # fmt: skip
    if biased:
        columns.append(("win_rate_train_judge", "win rate (training judge)"))
    columns += [("length", "length (chars)"), ("accuracy", "exact accuracy")]
    header = " | ".join(f"{name} (mean ± s.e.)" for _, name in columns)
    print(f"| method | seeds | {header} | s / 1,000 completions |")
    print("|---|---|" + "---|" * len(columns) + "---|")
    for method in merged:
        runs = merged[method]
        cells = []
        for key, _ in columns:
            values = [r[key] for r in runs if key in r]  # runs saved before a column existed have none: "–"
            if not values:
                cells.append("–")
                continue
            mean, se = mean_and_se(values)
            cells.append(f"{mean:.1f} ± {se:.1f}" if key == "length" else f"{mean:.1%} ± {se:.1%}")
        s_1000 = statistics.median(r["s_per_1000"] for r in runs)
        print(f"| `{method}` | {len(runs)} | " + " | ".join(cells) + f" | {s_1000:.2f} |")
    if seeds < 2:
        print("(one seed: no standard error)")


if __name__ == "__main__":
    main()
