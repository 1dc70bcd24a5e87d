"""Padding against packing on a MATH-like workload: the padding share and the time of the training and π_t passes,
padded micro-batches (today's default) side by side with packed rows and token-budget micro-batches.

    python benchmarks/packing.py [--rows 32] [--hidden 512] [--layers 4] [--repeats 2] [--workload math|demo]

``math``: a random Qwen2 (``benchmarks/random_model.py``), one response per prompt (the MATH recipe's K = 1), and
lengths drawn like MATH's under Qwen2.5's chat template: prompt = 40 template tokens + the problem, lognormal with
median 70 tokens and σ = 0.6, cut to [50, 1,024]; response lognormal with median 250 and σ = 0.7, cut to [20, 512]
(about 15 % hit the 512 cap, as truncated solutions do). ``demo``: the shipped toy model and the demo's shapes
(K = 4, prompts of about 30 tokens, responses of 8 to 16, micro-batches of 64 rows).

Each setup runs ``--repeats`` times, interleaved with the others, on ``--threads`` threads (1 by default), and the
time counted is the process's CPU time (``time.process_time``): on a shared machine the wall clock mostly measures
the neighbours, the CPU time spent on the work does not (wall seconds are printed beside it). Timed: the π_t pass
(``token_logps`` under no_grad, eval mode) and the training pass (forward + backward of the SPPO regression) over
the same rows; the optimizer step, the same for all, is left out.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from argtypes import at_least  # noqa: E402


def math_like_groups(rows: int, vocab: int, seed: int = 0) -> list:
    from sppo_lightning.data.examples import Example

    rng = random.Random(seed)

    def lognormal(median: float, sigma: float, low: int, high: int) -> int:
        return int(min(high, max(low, round(median * rng.lognormvariate(0, sigma)))))

    groups = []
    for g in range(rows):
        prompt = [rng.randrange(3, vocab) for _ in range(min(1024, 40 + lognormal(70, 0.6, 10, 984)))]
        prompt = prompt[: max(50, len(prompt))]
        response = [rng.randrange(3, vocab) for _ in range(lognormal(250, 0.7, 20, 512))]
        groups.append([Example(prompt, response, 0.0, 0.5, rng.uniform(-1, 1), g)])
    return groups


def demo_groups(prompts: int, vocab: int, seed: int = 0) -> list:
    from sppo_lightning.data.examples import Example

    rng = random.Random(seed)
    groups = []
    for g in range(prompts):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randrange(28, 36))]
        groups.append([Example(prompt, [rng.randrange(3, vocab) for _ in range(rng.randrange(8, 17))], 0.0, 0.5,
                               rng.uniform(-1, 1), g) for _ in range(4)])  # fmt: skip
    return groups


def run_setup(module, batches: list) -> dict:
    """CPU seconds (and wall seconds) of the π_t pass and of the training pass over ``batches``."""
    from sppo_lightning.loss import sppo_target_loss

    policy = module.policy
    policy.eval()
    start, wall = time.process_time(), time.perf_counter()
    with torch.no_grad():
        refs = [module.token_logps(b) for b in batches]
    ref_s, ref_wall = time.process_time() - start, time.perf_counter() - wall
    policy.train()
    rows = sum(len(b) for b in batches)
    start, wall = time.process_time(), time.perf_counter()
    for b, ref in zip(batches, refs, strict=True):
        logps = module.token_logps(b).sum(-1)
        (sppo_target_loss(logps, ref.sum(-1), b.targets).sum() / rows).backward()
    train_s, train_wall = time.process_time() - start, time.perf_counter() - wall
    policy.zero_grad(set_to_none=True)
    return {"ref_s": ref_s, "train_s": train_s, "wall_s": ref_wall + train_wall}


def sent_tokens(batches: list, packed: bool, share: bool) -> int:
    """Tokens that go through the model: B x T padded, the real ones packed, each prompt once when shared."""
    total = 0
    for b in batches:
        if not packed and not share:
            total += b.input_ids.numel()
        elif not share:
            total += int(b.attention_mask.sum())
        else:
            prompts = {tuple(r[:p].tolist()) for r, p in zip(b.input_ids, b.prompt_lengths, strict=True)}
            responses = int(b.response_mask.sum())
            if packed:
                total += sum(map(len, prompts)) + responses
            else:  # prompts left-padded to the longest, responses right-padded to the longest
                width = int(b.response_mask.sum(1).max())
                total += len(prompts) * int(b.prompt_lengths.max()) + len(b.input_ids) * width
    return total


def main() -> None:
    from random_model import random_qwen2

    from sppo_lightning.data.batching import micro_batches
    from sppo_lightning.module import SPPOModule
    from sppo_lightning.toy import MODEL_DIR
    from sppo_lightning.toy.build import save_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["math", "demo"], default="math")
    parser.add_argument("--rows", type=at_least(1), default=32, help="math: rows (= prompts); demo: prompts (x 4 rows)")
    parser.add_argument("--hidden", type=at_least(1), default=512)
    parser.add_argument("--layers", type=at_least(1), default=4)
    parser.add_argument("--repeats", type=at_least(1), default=2)
    parser.add_argument("--budget", type=at_least(1), nargs="*", default=[1792], help="token budgets to measure")
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "packing.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    tmp = tempfile.TemporaryDirectory()
    if args.workload == "math":
        model, tok = random_qwen2(args.hidden, args.layers, heads=max(1, args.hidden // 64))
        model.save_pretrained(tmp.name, safe_serialization=True)
        save_tokenizer(tok, Path(tmp.name))
        path, groups = tmp.name, math_like_groups(args.rows, len(tok))
        n_params = sum(p.numel() for p in model.parameters())
        setups = {  # name: (module settings, micro-batching)
            "padded, 4 rows (today)": (dict(share_prompt=False), dict(micro_batch_size=4)),
            "padded, 4 rows, balance_tokens": (dict(share_prompt=False), dict(micro_batch_size=4, balance_tokens=True)),
            "packed, 4 rows": (dict(packed=True, share_prompt=False), dict(micro_batch_size=4)),
            **{f"packed, {b}-token budget": (dict(packed=True, share_prompt=False), dict(micro_batch_size=4,
                                             max_tokens=b)) for b in args.budget},
        }  # fmt: skip
    else:
        path, groups = str(MODEL_DIR), demo_groups(args.rows, 100)
        n_params = None
        setups = {
            "padded, shared prompt (today)": (dict(), dict(micro_batch_size=64)),
            "padded, rows whole": (dict(share_prompt=False), dict(micro_batch_size=64)),
            "packed, rows whole": (dict(packed=True, share_prompt=False), dict(micro_batch_size=64)),
            "packed, shared prompt": (dict(packed=True), dict(micro_batch_size=64)),
        }
    modules, batches = {}, {}
    for name, (module_kw, batch_kw) in setups.items():
        module = SPPOModule(path, loss_type="sppo_softmean", **module_kw)
        module.configure_model()
        if modules:  # one set of weights for all
            module.policy.load_state_dict(next(iter(modules.values())).policy.state_dict())
        modules[name] = module
        batches[name] = micro_batches(groups, pad_id=0, seed=0, **batch_kw)

    response_tokens = sum(len(r.response_ids) for g in groups for r in g)
    real_tokens = sum(len(r.prompt_ids) + len(r.response_ids) for g in groups for r in g)
    times = {name: [] for name in setups}
    run_setup(modules[next(iter(setups))], batches[next(iter(setups))][:1])  # warm-up
    for _ in range(args.repeats):
        for name in setups:
            times[name].append(run_setup(modules[name], batches[name]))

    results = {}
    base = None
    print(f"workload {args.workload}: {sum(map(len, groups))} rows, {real_tokens} tokens of which {response_tokens} "
          f"in responses" + (f"; random Qwen2 of {n_params / 1e6:.0f}M parameters" if n_params else ""))  # fmt: skip
    header = f"{'setup':34} {'micro-batches':>13} {'padding':>8} {'pi_t s':>7} {'train s':>8} {'s / 1k resp tok':>15}"
    print(header + f" {'speed-up':>8} {'wall s':>7}   (CPU seconds)")
    for name, (module_kw, _) in setups.items():
        best = min(times[name], key=lambda t: t["ref_s"] + t["train_s"])
        sent = sent_tokens(batches[name], module_kw.get("packed", False), module_kw.get("share_prompt", True))
        # padding = what went through the model beyond the rows' own tokens (a shared prompt counts as saved)
        padding = max(0.0, 1 - min(real_tokens, sent) / sent) if not module_kw.get("share_prompt", True) else None
        per_1k = (best["ref_s"] + best["train_s"]) / response_tokens * 1000
        base = base or per_1k
        results[name] = {**best, "micro_batches": len(batches[name]), "sent_tokens": sent, "padding_share": padding,
                         "s_per_1k_response_tokens": per_1k, "speedup": base / per_1k}  # fmt: skip
        pad = f"{100 * padding:7.1f}%" if padding is not None else f"{sent:>6} t"
        print(f"{name:34} {len(batches[name]):>13} {pad:>8} {best['ref_s']:7.2f} {best['train_s']:8.2f} "
              f"{per_1k:15.3f} {base / per_1k:7.2f}x {best['wall_s']:7.1f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"workload": args.workload, "results": results}, indent=2))


if __name__ == "__main__":
    main()
