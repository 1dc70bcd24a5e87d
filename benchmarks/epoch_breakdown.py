"""Where an SPPO iteration's time goes, and what the framework costs over doing the same work by hand.

    python benchmarks/epoch_breakdown.py --config configs/demo.yaml --epochs 3 [--out runs/breakdown] [overrides...]

Runs N epochs of the config through the real CLI classes and prints, per phase (rollout, scoring, π_t log-probs,
training, validation: off unless an override such as --trainer.limit_val_batches=1.0 turns it on): seconds, share,
tokens/s and peak memory. Then it does the same work raw, with no framework: bare
``model.generate`` on the same prompts with the same sampling settings and lengths, and bare forward/backward +
AdamW on the very micro-batches training saw. ``framework_overhead`` is (rollout + training) / (raw generate + raw
forward/backward): scoring and the π_t forward are SPPO's own work, shown apart. A JSON file is written next to the
table.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from argtypes import at_least  # noqa: E402

PHASES = ("time/rollout", "time/scoring", "time/ref_logprobs", "time/train", "time/validation")


class Recorder(L.Callback):
    """Per epoch: the phases' seconds, tokens generated and trained, and the micro-batches themselves."""

    def __init__(self):
        self.epochs: list[dict] = []
        self.batches: list[dict] = []
        self.prompt_ids: list[list[int]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()
        self._train_tokens = 0
        self._val_seconds = 0.0

    def on_validation_epoch_start(self, trainer, pl_module):
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module):
        self._val_seconds += time.perf_counter() - self._val_start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._train_tokens += int(batch.attention_mask.sum())
        self.batches.append((trainer.current_epoch, move_data_to_device(batch, "cpu")))

    def on_train_epoch_end(self, trainer, pl_module):
        dm = trainer.datamodule
        m = dict(dm.rollout_metrics)
        m["time/train"] = time.perf_counter() - self._start - self._val_seconds  # validation runs inside the epoch
        m["time/validation"] = self._val_seconds  # 0 unless an override turns validation back on
        h = dm.hparams
        n_prompts = h.prompts_per_epoch or len(dm.train_prompts)
        m["generated_tokens"] = m["rollout/response_length"] * n_prompts * h.samples_per_prompt
        m["train_tokens"] = self._train_tokens
        self.epochs.append(m)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def framework_run(args) -> tuple[Recorder, object]:
    from cli_run import build_run, fit

    cli_args = ["--config", args.config, f"--trainer.max_epochs={args.epochs}", "--trainer.logger=false"]
    cli_args += ["--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--trainer.limit_val_batches=0"]
    cli_args += [f"--trainer.default_root_dir={args.out}", *args.overrides]
    cli = build_run(cli_args)
    recorder = Recorder()
    cli.trainer.callbacks.append(recorder)
    fit(cli)
    return recorder, cli


def raw_run(cli, recorder: Recorder, warmup: int) -> dict:
    """The same generate and forward/backward work on a fresh copy of the model, no Lightning, no pipeline; one
    untimed round first, as the framework's first ``warmup`` epochs are left out of its figures."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    module, dm = cli.model, cli.datamodule
    h, tok = dm.hparams, module.tokenizer
    device = cli.trainer.strategy.root_device  # the module itself is back on CPU after fit
    model = AutoModelForCausalLM.from_pretrained(module.policy_handle().name_or_path, dtype=module.policy.dtype)
    model.to(device)
    n_prompts = h.prompts_per_epoch or len(dm.train_prompts)
    prompts = dm.train_prompt_ids[:n_prompts]
    gen = GenerationConfig(
        do_sample=h.temperature > 0, temperature=h.temperature or None, top_p=h.top_p, top_k=0,
        max_new_tokens=h.max_response_length, num_return_sequences=h.samples_per_prompt,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    per_call = max(1, 256 // h.samples_per_prompt)  # the HF engine's default batching
    model.eval()
    measured = len(recorder.epochs) - warmup
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(measured + 1):
            if i == 1:  # the first round warms up kernels and allocators, as the framework's first epoch does
                start = time.perf_counter()
            for s in range(0, len(prompts), per_call):
                model.generate(input_ids=ids[s : s + per_call], attention_mask=mask[s : s + per_call],
                               generation_config=gen)  # fmt: skip
    generate_s = time.perf_counter() - start

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batches = [b for epoch, b in recorder.batches if epoch >= warmup]
    for i, batch in enumerate([batches[0], *batches]):
        if i == 1:
            start = time.perf_counter()
        input_ids, attn = batch.input_ids.to(device), batch.attention_mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
        logp = logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)
        loss = ((logp * batch.response_mask[:, 1:].to(device)).sum(-1) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    fwd_bwd_s = time.perf_counter() - start
    return {"raw/generate": generate_s, "raw/forward_backward": fwd_bwd_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--epochs", type=at_least(1), default=3)
    parser.add_argument("--warmup", type=at_least(0), default=1, help="first epochs left out of the figures (warm-up)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "breakdown")
    parser.add_argument("overrides", nargs="*", help="CLI overrides such as --data.samples_per_prompt=8")
    args = parser.parse_args()
    if args.warmup >= args.epochs:
        parser.error(f"--warmup {args.warmup} leaves none of the {args.epochs} epochs to measure")
    torch.set_num_threads(torch.get_num_threads())

    recorder, cli = framework_run(args)
    peak_framework = peak_rss_mib()
    raw = raw_run(cli, recorder, args.warmup)

    epochs = recorder.epochs[args.warmup :]
    total = {p: sum(e[p] for e in epochs) for p in PHASES}
    generated = sum(e["generated_tokens"] for e in epochs)
    trained = sum(e["train_tokens"] for e in epochs)
    tokens = {"time/rollout": generated, "time/scoring": generated, "time/ref_logprobs": trained, "time/train": trained}
    tokens["time/validation"] = 0  # not counted
    all_s = sum(total.values())
    where = f"{cli.trainer.strategy.root_device} ({torch.get_num_threads()} threads)"
    print(f"{len(epochs)} iterations (after {args.warmup} warm-up) of {args.config} on {where}")
    print(f"{'phase':<20}{'seconds':>10}{'share':>8}{'tokens/s':>12}")
    for p in PHASES:
        # a phase that took no measurable time (π_t taken from the rollout's logits) has no meaningful rate
        rate = f"{tokens[p] / total[p]:>12.0f}" if tokens[p] and total[p] >= 0.01 * all_s else f"{'-':>12}"
        print(f"{p:<20}{total[p]:>10.2f}{total[p] / all_s:>8.0%}{rate}")
    print(f"{'raw/generate':<20}{raw['raw/generate']:>10.2f}{'':>8}{generated / raw['raw/generate']:>12.0f}")
    fb = raw["raw/forward_backward"]
    print(f"{'raw/forward_backward':<20}{fb:>10.2f}{'':>8}{trained / fb:>12.0f}")
    overhead = (total["time/rollout"] + total["time/train"]) / (raw["raw/generate"] + fb)
    params = sum(p.numel() for p in cli.model.policy.parameters())
    print(f"peak RSS {peak_framework:.0f} MiB (policy {params * 4 / 2**20:.1f} MiB fp32 + AdamW x2)")
    if torch.cuda.is_available():
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"framework_overhead={overhead:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"config": args.config, "epochs": recorder.epochs, "total": total, **raw, "framework_overhead": overhead,
              "peak_rss_mib": peak_framework, "generated_tokens": generated, "train_tokens": trained}  # fmt: skip
    (args.out / "epoch_breakdown.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'epoch_breakdown.json'}")


if __name__ == "__main__":
    main()
