"""Side by side with TRL's GRPOTrainer on identical work: time per 1,000 completions and accuracy after equal work.

    pip install -e ".[bench]"
    python benchmarks/vs_trl.py [--iterations 10] [--rounds 16] [--lr 1e-4] [--passes 1] [--prompts 64] [--val 400]
        [--threads 1] [--warmup 1] [--trl-option epsilon=100 ...] [-- --model.eta=4 ...]

Same tiny model (the shipped toy Qwen2), same prompts (2-digit addition), same reward (the boxed-answer checker), K = 4
samples of 64 prompts per generation round, 16 new tokens, lr 1e-4, and 4 optimizer steps of 64 completions per pass
over each round on both sides (``--passes``: our ``data.passes_per_rollout``, TRL's ``num_iterations``). TRL: beta 0 (no
reference model; SPPO needs none either), fp32, no gradient checkpointing (TRL's defaults would turn on bf16 and
checkpointing; both are off to match our demo), dropout as in the model. Neither side validates, logs to a file or saves
checkpoints during the run, and ours computes no KL metric (``model.kl_metrics=false``: TRL computes its KL only when
beta > 0); ``-- --model.kl_metrics=true`` puts our two KL forwards back. The two are alternated in this one process,
``--rounds`` times with seeds 0, 1, ..., the side that runs first alternating too (ours first in even rounds, TRL first
in odd ones: on a shared machine whose speed drifts, a drift within a round then does not always fall on the same side):
time is the median of the rounds, accuracy (greedy, on the same 400 held-out problems, same scorer) their mean and
standard error, since it varies by about 3 points from seed to seed. A side's time is its training loop, every rollout,
score and step, from its trainer's start-of-training hook (ours: Lightning's ``on_fit_start``, TRL:
``TrainerCallback.on_train_begin``) to the end of the call; what comes before it is done once per run (loading the model
and the prompts, building the trainer and the optimizer: TRL's mostly before ``train()``, ours inside ``fit``), is
printed apart as setup and is also in ``time_ratio_with_setup``. Before the rounds each side runs ``--warmup``
iterations untimed, so that what a process does once (imports inside the timed call, first-use caches) falls in neither
side's rounds. torch runs on ``--threads`` threads, 1 by default (on a shared machine two threads of this tiny model
wait on each other). Last lines: each round's own ratio (ours over the TRL run of the same round) and their median, each
side's setup and ``time_ratio_with_setup=<x>``, ``cpu_time_ratio_ours_over_trl=<x>`` (process CPU time of the loops),
``time_ratio_ours_over_trl=<x>`` (wall time; both ratios of the medians).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from argtypes import at_least  # noqa: E402

PROMPTS, K, NEW_TOKENS, LR, MICRO = 64, 4, 16, 1e-4, 64


def accuracy(model, tokenizer, records) -> float:
    from sppo_lightning.rewards.base import rule_scores
    from sppo_lightning.rewards.math import compute_score

    return float(rule_scores(compute_score, greedy_texts(model, tokenizer, records), records).mean())


def greedy_texts(model, tokenizer, records) -> list[list[str]]:
    """``[P][1]`` greedy responses of ``model`` to ``records``, decoded."""
    from sppo_lightning.rollout.base import SamplingParams
    from sppo_lightning.rollout.hf import hf_generate

    ids = [
        tokenizer(tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False)["input_ids"]
        for r in records
    ]  # fmt: skip
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=NEW_TOKENS)
    out = hf_generate(model, ids, params, tokenizer.pad_token_id, tokenizer.eos_token_id, batch_size=len(ids))
    return [[tokenizer.decode(r, skip_special_tokens=True) for r in g] for g in out]


class Clock:
    """A side's time in two parts, wall and process CPU: ``setup`` from the start of its construction to the start of
    its training loop (loading the model and the prompts, building the trainer and the optimizer: once per run, ours
    inside ``fit``, TRL's mostly before ``train()``), then ``seconds``, the loop (every rollout, score and step).
    Made where the side's construction starts."""

    def __init__(self) -> None:
        self.marks = [(time.perf_counter(), time.process_time())]

    def loop_starts(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def stop(self) -> dict:
        (w0, c0), (w1, c1), (w2, c2) = *self.marks, (time.perf_counter(), time.process_time())
        return {"seconds": w2 - w1, "cpu_seconds": c2 - c1, "setup_seconds": w1 - w0, "setup_cpu_seconds": c1 - c0}

    def lightning_callback(self):
        """Marks the loop's start in our fit: Lightning calls ``on_fit_start`` after ``setup`` and ``configure_model``
        and the optimizer, before the loop asks for the first rollout."""
        import lightning.pytorch as L

        clock = self

        class LoopStart(L.Callback):
            def on_fit_start(self, trainer, pl_module):
                clock.loop_starts()

        return LoopStart()

    def trl_callback(self):
        """Marks the loop's start in a TRL trainer's ``train()``: ``on_train_begin`` comes after the optimizer and
        accelerate's ``prepare``, before the first batch is drawn."""
        from transformers import TrainerCallback

        clock = self

        class LoopStart(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.loop_starts()

        return LoopStart()


def run_ours(
    iterations: int,
    seed: int,
    out: Path,
    lr: float = LR,
    passes: int = 1,
    overrides: tuple[str, ...] = (),
    prompts: int = PROMPTS,
) -> dict:
    from cli_run import build_run, fit

    args = ["--config", str(REPO / "configs" / "demo.yaml"), f"--trainer.max_epochs={iterations}",
            "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
            "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", "--model.kl_metrics=false",
            f"--seed_everything={seed}", f"--trainer.default_root_dir={out}", f"--data.prompts_per_epoch={prompts}",
            f"--data.samples_per_prompt={K}", f"--data.max_response_length={NEW_TOKENS}",
            f"--data.micro_batch_size={MICRO}", f"--model.learning_rate={lr}", f"--data.seed={seed}",
            f"--data.passes_per_rollout={passes}", *overrides]  # fmt: skip
    clock = Clock()
    cli = build_run(args)
    cli.trainer.callbacks.append(clock.lightning_callback())
    fit(cli)
    return {**clock.stop(), "completions": iterations * prompts * K, "steps": cli.trainer.global_step,
            "model": cli.model.policy, "tokenizer": cli.model.tokenizer}  # fmt: skip


def run_trl(
    iterations: int,
    seed: int,
    out: Path,
    lr: float = LR,
    passes: int = 1,
    options: dict | None = None,
    reward_fn=None,
    prompts: int = PROMPTS,
) -> dict:
    """TRL's GRPO on the same work; ``reward_fn`` (a TRL reward function) replaces the boxed-answer checker."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from sppo_lightning.rewards.math import compute_score
    from sppo_lightning.toy import MODEL_DIR
    from sppo_lightning.toy.task import addition_records

    clock = Clock()
    rows = [{"prompt": r["prompt"], "ground_truth": r["reward_model"]["ground_truth"]}
            for r in addition_records("train", seed=seed)]  # fmt: skip

    def reward(completions, ground_truth, **kwargs):
        return [compute_score(c[0]["content"], gt) for c, gt in zip(completions, ground_truth, strict=True)]

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    settings = dict(
        output_dir=str(out), use_cpu=True, bf16=False, gradient_checkpointing=False, beta=0.0,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=MICRO, gradient_accumulation_steps=1, steps_per_generation=prompts * K // MICRO,
        num_generations=K, max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0,
        max_steps=passes * iterations * prompts * K // MICRO, num_iterations=passes, logging_steps=10**9,
        save_strategy="no", report_to="none", seed=seed, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    config = GRPOConfig(**{**settings, **(options or {})})  # --trl-option wins over the matched settings
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward_fn or reward, args=config, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, callbacks=[clock.trl_callback()],
    )  # fmt: skip
    trainer.train()
    return {**clock.stop(), "completions": iterations * prompts * K, "steps": trainer.state.global_step,
            "model": trainer.model, "tokenizer": tokenizer}  # fmt: skip


def trl_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as JSON where it parses (numbers, true, null), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (0 for a single value)."""
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return statistics.fmean(values), se


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=at_least(1), default=10, help="generation rounds of 64 x 4 completions")
    parser.add_argument("--rounds", type=at_least(1), default=2, help="alternations of ours and TRL")
    parser.add_argument("--lr", type=float, default=LR, help="learning rate of both sides")
    parser.add_argument("--passes", type=at_least(1), default=1, help="training passes over each round, both sides")
    parser.add_argument(
        "--trl-option", action="append", default=[], type=trl_option, metavar="KEY=VALUE",
        help="a GRPOConfig field for TRL's side, e.g. epsilon=100 (no clipping) or scale_rewards=none; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--prompts", type=at_least(1), default=PROMPTS, help="prompts per round (x 4 samples), both sides"
    )
    parser.add_argument("--val", type=at_least(1), default=400, help="held-out problems answered greedily")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "vs_trl")
    parser.add_argument(
        "--threads", type=at_least(1), default=1, help="torch CPU threads, both sides (1: fair on a shared machine)"
    )
    parser.add_argument(
        "--warmup", type=at_least(0), default=1, help="untimed iterations of each side before the rounds (0: none)"
    )
    parser.add_argument("overrides", nargs="*", help="our side's CLI overrides, e.g. --model.eta=4 (after --)")
    args = parser.parse_args()
    args.trl_option = dict(args.trl_option)
    if args.prompts * K % MICRO:
        parser.error(f"--prompts: {args.prompts} x {K} samples is not a whole number of {MICRO}-completion steps")
    if args.trl_option:
        from dataclasses import fields

        from trl import GRPOConfig

        unknown = sorted(set(args.trl_option) - {f.name for f in fields(GRPOConfig)})
        if unknown:
            parser.error(f"--trl-option: GRPOConfig has no field {', '.join(unknown)}")
    # One thread by default: on a machine other jobs share, two threads wait on each other for every small op of this
    # 0.6M-parameter model (a 10-iteration run took 30 times as long), whatever the code does.
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    from sppo_lightning.toy import AdditionPrompts

    val = AdditionPrompts("val", num_prompts=args.val, seed=1).load()
    both = {"lr": args.lr, "passes": args.passes, "prompts": args.prompts}
    sides = (
        ("ours", partial(run_ours, overrides=tuple(args.overrides), **both)),
        ("trl", partial(run_trl, options=args.trl_option, **both)),
    )
    if args.warmup:
        # What a process does once, on first use, stays out of the rounds: imports made inside the timed call (ours
        # imports math-verify when it first scores; TRL's imports come before its timed call), caches and the heap's
        # first growth. Without it the first round of whichever side runs first pays them alone.
        warm = {}
        for name, fn in sides:
            with tempfile.TemporaryDirectory() as tmp:
                warm[name] = fn(args.warmup, seed=args.rounds, out=Path(tmp))["seconds"]
        print(f"warm-up (--warmup {args.warmup}), not counted: ours {warm['ours']:.1f} s, trl {warm['trl']:.1f} s")
    results = {"ours": [], "trl": []}
    for r in range(args.rounds):
        for name, fn in sides if r % 2 == 0 else sides[::-1]:
            with tempfile.TemporaryDirectory() as tmp:
                got = fn(args.iterations, seed=r, out=Path(tmp))
            got["accuracy"] = accuracy(got.pop("model"), got.pop("tokenizer"), val)
            got["s_per_1000"] = 1000 * got["seconds"] / got["completions"]
            results[name].append(got)
            print(f"round {r} {name:>4}: {got['seconds']:.1f} s for {got['completions']} completions, "
                  f"{got['steps']} optimizer steps, greedy accuracy {got['accuracy']:.1%} "
                  f"({got['cpu_seconds']:.1f} s CPU; setup before the loop {got['setup_seconds']:.2f} s)",
                  flush=True)  # fmt: skip

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sppo_lightning.module import SPPOModule  # noqa: F401 - the starting accuracy, same scorer
    from sppo_lightning.toy import MODEL_DIR

    start_acc = accuracy(AutoModelForCausalLM.from_pretrained(MODEL_DIR), AutoTokenizer.from_pretrained(MODEL_DIR), val)
    median = {n: statistics.median(x["s_per_1000"] for x in v) for n, v in results.items()}
    # Accuracy varies a lot from seed to seed (a standard deviation of about 3 points here): its mean and standard
    # error over the rounds, not a median, and the gap between the two sides with its own standard error.
    acc = {n: mean_and_se([x["accuracy"] for x in v]) for n, v in results.items()}
    completions = results["ours"][0]["completions"]
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux reports KiB
    print(f"\nstarting greedy accuracy {start_acc:.1%}; {args.iterations} rounds of {args.prompts}x{K} completions "
          f"each; peak RSS of this process {rss_mib} MiB")  # fmt: skip
    print(
        f"| | s per 1,000 completions (median) | accuracy after (mean ± s.e., {args.rounds} seeds) "
        "| gain per 1,000 completions |"
    )
    print("|---|---|---|---|")
    for n in ("ours", "trl"):
        m, se = acc[n]
        print(f"| {n} | {median[n]:.2f} | {m:.1%} ± {se:.1%} | {100_000 * (m - start_acc) / completions:+.2f} pts |")
    gap = acc["ours"][0] - acc["trl"][0]
    gap_se = (acc["ours"][1] ** 2 + acc["trl"][1] ** 2) ** 0.5
    print(
        f"accuracy gap ours - trl: {100 * gap:+.1f} ± {100 * gap_se:.1f} points "
        f"({100_000 * gap / completions:+.2f} ± {100_000 * gap_se / completions:.2f} per 1,000 completions)"
    )
    settings = {"iterations": args.iterations, "lr": args.lr, "passes": args.passes, "threads": args.threads,
                "trl_options": args.trl_option, "our_overrides": args.overrides}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"settings": settings, "start_accuracy": start_acc, "runs": results}
    (args.out / "vs_trl.json").write_text(json.dumps(record, indent=2))
    cpu = {n: statistics.median(x["cpu_seconds"] for x in v) for n, v in results.items()}
    # Each round's own ratio (ours over the TRL run of the same round): how far one round's comparison moves on a
    # machine whose speed drifts, which the ratio of the medians below does not show.
    paired = [o["seconds"] / t["seconds"] for o, t in zip(results["ours"], results["trl"], strict=True)]
    print(f"rounds' own ratios (wall): {' '.join(f'{x:.2f}' for x in paired)}, median {statistics.median(paired):.3f}")
    setup = {n: statistics.median(x["setup_seconds"] for x in v) for n, v in results.items()}
    whole = {n: statistics.median(x["setup_seconds"] + x["seconds"] for x in v) for n, v in results.items()}
    print(f"setup before the loop (median s, not in the ratios below): ours {setup['ours']:.2f}, trl "
          f"{setup['trl']:.2f}; with it, time_ratio_with_setup={whole['ours'] / whole['trl']:.3f}")  # fmt: skip
    print(f"cpu_time_ratio_ours_over_trl={cpu['ours'] / cpu['trl']:.3f} (medians of the process CPU time)")
    print(f"time_ratio_ours_over_trl={median['ours'] / median['trl']:.3f}")


if __name__ == "__main__":
    main()
