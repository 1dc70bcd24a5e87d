"""Measured peak memory of SPPO training steps on CPU, for tests/test_plan.py to hold the plan's estimate against.

    python tests/plan_peak.py MODEL_DIR --rows 8 --prompt 96 --response 160 [--checkpointing] [--dtype bfloat16]

Builds the model of MODEL_DIR/config.json (random weights in ``--dtype``, float32 by default), then runs optimizer
steps as SPPOModule does:
response-token log-probs of rows of prompt + response tokens (``response_token_logps``), a squared loss on their
sums, backward, AdamW on ``optim.decay_groups``, gradients set to None. Prints JSON: the process's peak resident
memory from the model's build on (``VmHWM``, reset at that point through ``/proc/self/clear_refs``) minus its resident
memory then, in bytes: a peak reached earlier, while importing, does not count.

So that resident memory follows the tensors alive, glibc is told to serve every allocation over 64 KiB by ``mmap``
(returned to the system when freed: no heap that only grows), and the model's code is imported (by building it on
the meta device) before the baseline is read.
"""

import argparse
import ctypes
import json
import resource

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sppo_lightning.logprobs import response_token_logps
from sppo_lightning.optim import decay_groups


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: the peak resident set size (VmHWM) starts again from the current one


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=96)
    parser.add_argument("--response", type=int, default=160)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    M_MMAP_THRESHOLD = -3
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = AutoConfig.from_pretrained(args.model_dir)
    with torch.device("meta"):  # imports the modeling code (~150 MB of it) before the baseline
        AutoModelForCausalLM.from_config(config)
    rows, width = args.rows, args.prompt + args.response
    ids = torch.randint(3, config.vocab_size, (rows, width))
    attention = torch.ones_like(ids)
    response = torch.zeros_like(ids)
    response[:, args.prompt :] = 1

    before = rss_bytes()
    reset_peak()
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype), attn_implementation="sdpa")
    model.train()
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    groups = decay_groups(model.named_parameters(), 0.01)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=1e-5)
    for _ in range(2):
        for _ in range(args.accumulate):
            logps = response_token_logps(model, ids, attention, response).sum(-1)
            loss = ((logps - logps.detach() - 0.1) ** 2).mean() / args.accumulate
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = peak_bytes() - before
    print(json.dumps({"peak_bytes": peak, "params": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
