"""LoRA against full fine-tuning on CPU: peak memory and seconds per training step of the same SPPO step.

    python benchmarks/lora_vs_full.py [--hidden 768] [--layers 12] [--rows 8] [--prompt 96] [--response 160] [--r 16]
    python benchmarks/lora_vs_full.py --smoke      # a tiny model, one step each: what the suite runs

A random Qwen2 (``benchmarks/random_model.py``: 103 M parameters, 413 MB in float32 at the defaults) is saved once;
then each setup runs in its own process (so that one's peak cannot hide in the other's): ``SPPOModule`` loads the
folder (``model.lora`` null, or ``r`` on all-linear, alpha 2r), builds its optimizer (``configure_optimizers``) and
takes ``--steps`` optimizer steps as ``training_step`` does: response-token log-probs of ``--rows`` rows of
prompt + response tokens through ``token_logps``, the SPPO regression onto fixed targets, backward, AdamW.

Measured per process: the peak resident memory from before the model is loaded (``VmHWM`` reset through
``/proc/self/clear_refs``; glibc serves allocations over 64 KiB by ``mmap`` so that freed tensors leave the count),
the AdamW state's bytes, and the CPU time per step after the first (``time.process_time`` on ``--threads`` threads:
on a shared machine the wall clock mostly measures the neighbours). The rollout and the π_t pass are not timed:
they are forward passes of the same model either way.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from argtypes import at_least  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def worker(args) -> dict:
    """One setup in this process: load, build the optimizer, take the steps; the figures as a dict."""
    from sppo_lightning.lora import LoRA
    from sppo_lightning.module import SPPOModule
    from sppo_lightning.records import TrainBatch

    M_MMAP_THRESHOLD = -3
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lora = LoRA(r=args.r, alpha=2 * args.r) if args.mode == "lora" else None
    module = SPPOModule(args.model, lora=lora, learning_rate=1e-5, share_prompt=False)
    vocab = len(module.tokenizer)
    rows, width = args.rows, args.prompt + args.response
    ids = torch.randint(3, vocab, (rows, width))
    response = torch.zeros(rows, width)
    response[:, args.prompt :] = 1.0
    batch = TrainBatch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        response_mask=response,
        prompt_lengths=torch.full((rows,), args.prompt),
        group=torch.arange(rows),
        targets=torch.full((rows,), 0.1),
        win_rates=torch.full((rows,), 0.5),
        row_weight=torch.ones(rows),
    )

    before = rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from here
    module.configure_model()
    optimizer = module.configure_optimizers()["optimizer"]
    times = []
    for _ in range(args.steps + 1):
        start = time.process_time()
        logps = module.token_logps(batch)  # (B, R)
        loss = ((logps.sum(-1) - batch.targets) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.process_time() - start)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    return {
        "mode": args.mode,
        "params": sum(p.numel() for p in module.parameters()),
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "optimizer_bytes": state,
        "peak_bytes": peak_bytes() - before,
        "cpu_s_per_step": sum(times[1:]) / max(1, len(times) - 1),  # the first step also allocates AdamW's state
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=at_least(1), default=768)
    parser.add_argument("--layers", type=at_least(1), default=12)
    parser.add_argument("--heads", type=at_least(1), default=12)
    parser.add_argument("--rows", type=at_least(1), default=8)
    parser.add_argument("--prompt", type=at_least(1), default=96)
    parser.add_argument("--response", type=at_least(1), default=160)
    parser.add_argument("--r", type=at_least(1), default=16)
    parser.add_argument("--steps", type=at_least(1), default=2, help="timed steps after a first, untimed one")
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--smoke", action="store_true", help="a tiny model and one timed step: the suite's run")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)  # a worker process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.hidden, args.layers, args.heads, args.rows, args.prompt, args.response, args.steps = 64, 2, 4, 2, 16, 8, 1
    if args.mode:
        print(json.dumps(worker(args)))
        return

    from random_model import random_qwen2

    from sppo_lightning.toy.build import save_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model, tok = random_qwen2(args.hidden, args.layers, args.heads)
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tok, Path(tmp))
        del model
        common = [f"--{k}={getattr(args, k)}" for k in ("rows", "prompt", "response", "r", "steps", "threads")]
        results = []
        for mode in ("full", "lora"):
            proc = subprocess.run(
                [sys.executable, __file__, f"--mode={mode}", f"--model={tmp}", *common],
                capture_output=True, text=True, cwd=REPO, check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(results, indent=1))
        return
    mb = 2**20
    print(
        f"random Qwen2, hidden {args.hidden}, {args.layers} layers, {results[0]['params'] / 1e6:.0f} M parameters "
        f"(float32); {args.rows} rows of {args.prompt} + {args.response} tokens; LoRA r={args.r} alpha={2 * args.r} "
        f"all-linear; {args.threads} thread(s)"
    )
    print(f"{'':6} {'trainable':>12} {'AdamW state':>12} {'peak memory':>12} {'CPU s/step':>11}")
    for r in results:
        print(
            f"{r['mode']:6} {r['trainable'] / 1e6:>10.2f} M {r['optimizer_bytes'] / mb:>9.1f} MB "
            f"{r['peak_bytes'] / mb:>9.0f} MB {r['cpu_s_per_step']:>11.2f}"
        )
    full, lora = results
    print(
        f"LoRA / full: peak memory {lora['peak_bytes'] / full['peak_bytes']:.2f}x, "
        f"time per step {lora['cpu_s_per_step'] / full['cpu_s_per_step']:.2f}x"
    )


if __name__ == "__main__":
    main()
