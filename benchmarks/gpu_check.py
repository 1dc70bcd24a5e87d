"""The prepared GPU check: the seed recipe's training settings on one GPU, measured, in one table.

    python benchmarks/gpu_check.py              # one H100 (or any CUDA GPU); about 5 min (estimated), no network
    python benchmarks/gpu_check.py --dry-run    # the same code path on CPU at a tiny size (the suite runs this)

A random Qwen2 with Qwen2.5-0.5B's published shapes (``QWEN25_05B``; random weights, so its answers are noise and
every response runs to the length cap) is trained through the CLI, ``train.py fit`` exactly as a user runs it, on
``configs/qwen2.5-7b-math.yaml`` with only the model, the data (the MATH fixture), the devices (FSDP2 on 1 GPU:
ModelParallelStrategy, fp32 master weights, bf16 compute through ``model.fsdp_param_dtype``), the engine (the HF
engine: no SGLang on the lent machine), the logger (CSV) and the sizes swapped. One run per row of ``ROWS``: padded
and packed rows, packed through PyTorch's varlen attention and through per-row sdpa, checkpointing on and off.

Columns, per row:
- ``peak GiB``: ``torch.cuda.max_memory_allocated`` over the training phase (reset at each epoch's start, after the
  rollout and the π_t pass), against ``plan GiB``, ``python -m sppo_lightning.plan --json``'s ``training.peak`` for
  the same arguments (its 2 GiB CUDA-context allowance is not in the allocator's count: subtracted).
- ``train tok/s``: real (unpadded) tokens of the training micro-batches per second of training steps (CUDA
  synchronised at each step's start and end); ``MFU``: 6·N FLOPs a token (no recompute, no attention term; the
  usual MFU) over the GPU's dense bf16 peak (``PEAK_TFLOPS``; ``--peak-tflops`` for another GPU).
- ``rollout tok/s``: generated tokens (``rollout/response_length`` x rows) per second of ``time/rollout``.
- ``max Δ logp``: the largest difference of a response token's log-prob between the packed and the padded forward of
  the same rows, bf16 weights on the device (``packed_equals_padded``); at most ``LOGP_TOL`` passes.

``--dry-run``: the tiny model, 1 iteration per row, CPU processes; the CUDA-only columns print ``n/a``, and rows whose
backend exists only on CUDA (varlen_attn) print ``n/a: CUDA only``. The table is also written as JSON (``--out``).
Add a row by adding a ``Row`` (a LoRA row: ``extra=("--model.lora.r=16",)``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from argtypes import at_least  # noqa: E402

RECIPE = REPO / "configs" / "qwen2.5-7b-math.yaml"
# Qwen/Qwen2.5-0.5B(-Instruct) config.json: 24 layers, 14 query / 2 key-value heads, tied embeddings
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6)  # fmt: skip
TINY = dict(QWEN25_05B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=1024, max_position_embeddings=4096)  # fmt: skip
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 of the SXM parts
LOGP_TOL = 1e-2  # bf16: packed and padded forwards round differently; the bound #27 sets
GIB = 1024**3
ROW_TIMEOUT_S = 300  # a row on an H100: about a minute (estimated, not yet run); a hung one must not eat the lease


@dataclass(frozen=True)
class Row:
    """One run of the table: the recipe with these settings changed."""

    name: str
    packed: bool
    attention: str  # model.attn_implementation: "sdpa", "varlen_attn" (PyTorch's, CUDA only), "auto", ...
    checkpointing: bool
    extra: tuple[str, ...] = ()

    def overrides(self) -> list[str]:
        return [f"--model.packed={str(self.packed).lower()}",
                f"--model.gradient_checkpointing={str(self.checkpointing).lower()}",
                f"--model.attn_implementation={self.attention}", *self.extra]  # fmt: skip


ROWS = [
    Row(f"{layout} {attention}, ckpt {'on' if ckpt else 'off'}", layout == "packed", attention, ckpt)
    for layout, attention in (("padded", "sdpa"), ("packed", "sdpa"), ("packed", "varlen_attn"))
    for ckpt in (True, False)
]


# ----------------------------------------------------------------------------------------------- attention
def varlen_available(device: str) -> bool:
    """PyTorch's varlen attention runs here (a CUDA kernel, a signature we can call): the same detection as the
    training run's ``model.attn_implementation`` (``sppo_lightning.attention``)."""
    from sppo_lightning.attention import varlen_attn_usable

    return varlen_attn_usable(device)[0]


def backend(row: Row, device: str) -> str:
    """The attention that runs for the row, as the run resolves it before loading the model."""
    from sppo_lightning.attention import resolve_attention

    return resolve_attention(row.attention, row.packed, device)[0]


# ----------------------------------------------------------------------------------------------- the model
def build_model(out: Path, shape: dict) -> Path:
    """A random Qwen2 of ``shape`` with the toy tokenizer and its chat template, saved once (reused if present).

    The vocabulary stays the real one (151,936 rows of embedding, the logits' width): sampled ids beyond the toy
    tokenizer's 259 decode to nothing, which the rule oracle scores 0, as it would a wrong answer.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sppo_lightning.toy.build import build_tokenizer, save_tokenizer

    done = out / "model.safetensors"
    if done.is_file() and json.loads((out / "config.json").read_text())["hidden_size"] == shape["hidden_size"]:
        return out
    tok = build_tokenizer()
    config = Qwen2Config(**shape, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tok, out)
    return out


def prepare_data(out: Path) -> Path:
    from sppo_lightning.data.prepare_math import prepare

    if not (out / "train.parquet").is_file():
        prepare(str(REPO / "tests" / "fixtures" / "math"), out)
    return out


# ----------------------------------------------------------------------------------------------- one run
def common_overrides(model: Path, data: Path, dry_run: bool, prompts: int, response: int) -> list[str]:
    """Everything but the row's own settings: model, data, devices, engine, logger and sizes."""
    return [
        "--config", str(RECIPE), f"--model.model_name_or_path={model}",
        f"--data.train.init_args.paths={data / 'train.parquet'}", f"--data.val.init_args.paths={data / 'test.parquet'}",
        f"--trainer.accelerator={'cpu' if dry_run else 'gpu'}", "--trainer.devices=1",
        "--trainer.strategy.init_args.data_parallel_size=1",
        "--data.engine=sppo_lightning.rollout.HFEngine",      # no SGLang on the lent machine
        "--trainer.logger=sppo_lightning.loggers.CSVLogger",  # no wandb there either
        '--trainer.callbacks=[{"class_path": "gpu_check.TrainingProbe"}]', "--trainer.enable_checkpointing=false",
        "--trainer.limit_val_batches=0",                      # training is measured, not the policy
        "--trainer.max_epochs=1", f"--data.prompts_per_epoch={prompts}", f"--data.max_response_length={response}",
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip


def child_env() -> dict:
    """The runs import ``gpu_check.TrainingProbe``: benchmarks/ on the path, beside the repository."""
    path = [str(REPO), str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def plan_peak(args: list[str]) -> float | None:
    """``python -m sppo_lightning.plan --json``'s ``training.peak`` for the same arguments (its functions, called
    here), GiB, without its CUDA-context allowance, which the allocator does not count."""
    from sppo_lightning.plan import model_config, model_shape, parse_config, run_shape, training_memory

    try:
        config = parse_config(args)
    except Exception as e:  # noqa: BLE001 - the table says n/a; the run itself reports a bad setting
        print(f"plan: {e}", file=sys.stderr)
        return None
    training = training_memory(model_shape(*model_config(config.model.model_name_or_path)), run_shape(config))
    return (training["peak"] - training["overhead"]) / GIB


def run_row(row: Row, common: list[str], work: Path, timeout: int = ROW_TIMEOUT_S) -> dict:
    """``train.py fit`` for one row; what its probe and its metrics.csv recorded."""
    root = work / row.name.replace(" ", "_").replace(",", "")
    if root.exists():
        import shutil

        shutil.rmtree(root)
    args = [*common, *row.overrides(), f"--trainer.default_root_dir={root}"]
    env = child_env()
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), "fit", *args], capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"seconds": timeout, "plan_gib": None, "error": f"no end after {timeout} s"}
    out = {"seconds": time.monotonic() - start, "plan_gib": plan_peak(args)}
    if proc.returncode != 0:  # the exception's line, else the last one
        lines = proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
        errors = [line for line in lines if re.search(r"\w+(Error|Exception)\b", line)]
        return {**out, "error": (errors or lines)[-1].split("]: ", 1)[-1][:100]}
    probe = json.loads((root / "gpu_probe.json").read_text())
    return {**out, **probe, **rollout_throughput(root)}


def rollout_throughput(root: Path) -> dict:
    import csv

    rows = [r for path in root.glob("**/metrics.csv") for r in csv.DictReader(path.open())]
    seconds = sum(float(r["time/rollout"]) for r in rows if r.get("time/rollout"))
    lengths = [float(r["rollout/response_length"]) for r in rows if r.get("rollout/response_length")]
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    return {"rollout_seconds": seconds, "response_length": sum(lengths) / max(len(lengths), 1),
            "losses_finite": bool(losses) and all(math.isfinite(v) for v in losses)}  # fmt: skip


class TrainingProbe(Callback):
    """Given to the run as ``gpu_check.TrainingProbe``: the training phase's peak CUDA memory, its real tokens and its
    seconds, written to ``<default_root_dir>/gpu_probe.json`` at the end of fit."""

    def __init__(self):
        self.tokens, self.seconds, self.peak, self.micro_batches, self._start = 0, 0.0, 0, 0, 0.0

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":  # kernels run asynchronously: time what they did, not their launch
            torch.cuda.synchronize()

    def on_train_epoch_start(self, trainer, pl_module):
        if pl_module.device.type == "cuda":  # the rollout and the π_t pass are done: the training phase starts
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        self.seconds += time.perf_counter() - self._start
        self.tokens += int(batch.attention_mask.sum())
        self.micro_batches += 1

    def on_train_epoch_end(self, trainer, pl_module):
        if pl_module.device.type == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())

    def on_fit_end(self, trainer, pl_module):
        if trainer.global_rank != 0:
            return
        record = {
            "train_tokens": self.tokens, "train_seconds": self.seconds, "micro_batches": self.micro_batches,
            "optimizer_steps": trainer.global_step, "peak_gib": self.peak / GIB if self.peak else None,
            "params": sum(p.numel() for p in pl_module.policy.parameters()),
            "attn": getattr(pl_module.policy.config, "_attn_implementation", None),
        }  # fmt: skip
        Path(trainer.default_root_dir, "gpu_probe.json").write_text(json.dumps(record))


# ------------------------------------------------------------------------------------- packed equals padded
def packed_equals_padded(model: Path, attention: str, device: str, rows: int = 8, seed: int = 0) -> float | None:
    """Largest |log π(packed) − log π(padded)| over the response tokens of the same rows, bf16 weights on
    ``device``; None where the backend does not exist there."""
    import random

    from sppo_lightning.data.batching import micro_batches
    from sppo_lightning.data.examples import Example
    from sppo_lightning.module import SPPOModule

    if attention == "varlen_attn" and not varlen_available(device):
        return None
    rng = random.Random(seed)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    groups = [[Example([rng.randrange(3, vocab) for _ in range(rng.randrange(20, 200))],
                       [rng.randrange(3, vocab) for _ in range(rng.randrange(10, 120))], 0.0, 0.5, 0.0, g)]
              for g in range(rows)]  # fmt: skip
    [batch] = micro_batches(groups, pad_id=0, seed=0, micro_batch_size=rows)
    batch = replace(batch, **{k: v.to(device) for k, v in vars(batch).items() if isinstance(v, torch.Tensor)})
    out = {}
    for packed in (False, True):
        impl = attention if packed else "sdpa"
        module = SPPOModule(str(model), dtype="bfloat16", attn_implementation=impl, packed=packed, share_prompt=False)
        module.to(device)  # the attention is resolved for the module's device, before the weights load
        module.configure_model()
        module.policy.to(device).eval()
        with torch.no_grad():
            out[packed] = module.token_logps(batch).float()
        del module
    lengths = batch.response_mask.sum(-1, keepdim=True)  # [B, 1]; log-probs are [B, R], responses left-aligned
    mask = torch.arange(out[True].shape[1], device=lengths.device) < lengths
    return float((out[True] - out[False])[mask].abs().max())


# ----------------------------------------------------------------------------------------------- the table
COLUMNS = ["row", "attn", "peak GiB", "plan GiB", "train tok/s", "MFU", "rollout tok/s", "max Δ logp", "ok"]


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def table_row(row: Row, result: dict, delta: float | None, rows_per_epoch: int, tflops: float | None) -> list[str]:
    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    if "skipped" in result:
        return [row.name, row.attention, *["n/a"] * 5, fmt(delta, ".1e"), result["skipped"]]
    if "error" in result:
        return [row.name, row.attention, *["n/a"] * 5, fmt(delta, ".1e"), f"FAILED: {result['error']}"]
    tok_s = result["train_tokens"] / result["train_seconds"] if result["train_seconds"] else None
    mfu = 6 * result["params"] * tok_s / (tflops * 1e12) if tok_s and tflops and result["peak_gib"] else None
    generated = result["response_length"] * rows_per_epoch
    roll = generated / result["rollout_seconds"] if result["rollout_seconds"] else None
    cuda = result["peak_gib"] is not None
    ok = result["losses_finite"] and result["optimizer_steps"] >= 1 and (delta is None or delta <= LOGP_TOL)
    return [row.name, backend(row, "cuda" if cuda else "cpu"), fmt(result["peak_gib"], ".2f"),
            fmt(result["plan_gib"], ".2f") if cuda else "n/a", fmt(tok_s, ",.0f"), fmt(mfu, ".1%"), fmt(roll, ",.0f"),
            fmt(delta, ".1e"), "yes" if ok else "NO"]  # fmt: skip


def format_table(cells: list[list[str]]) -> str:
    widths = [max(len(c[i]) for c in [COLUMNS, *cells]) for i in range(len(COLUMNS))]
    line = lambda cs: "| " + " | ".join(c.ljust(w) for c, w in zip(cs, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 1 iteration per row, n/a for CUDA")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "gpu_check", help="models, data, runs")
    parser.add_argument("--out", type=Path, default=None, help="the table as JSON (default <work>/table.json)")
    parser.add_argument("--prompts", type=at_least(1), default=None, help="prompts per iteration (64; dry run 2)")
    parser.add_argument(
        "--response-length", type=at_least(1), default=None, help="max response tokens (512; dry run 8)"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--rows", nargs="*", default=None, help="names of the rows to run (default all)")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU here; --dry-run runs the same path on CPU", file=sys.stderr)
        return 2
    prompts = args.prompts or (2 if args.dry_run else 64)
    response = args.response_length or (8 if args.dry_run else 512)
    args.work.mkdir(parents=True, exist_ok=True)
    model = build_model(args.work / ("tiny_qwen2" if args.dry_run else "qwen2.5-0.5b-random"),
                        TINY if args.dry_run else QWEN25_05B)  # fmt: skip
    data = prepare_data(args.work / "math")
    common = common_overrides(model, data, args.dry_run, prompts, response)
    tflops = peak_tflops(args.peak_tflops)
    rows = [r for r in ROWS if args.rows is None or r.name in args.rows]

    gpu = torch.cuda.get_device_name() if device == "cuda" else "none (dry run on CPU)"
    out = args.out or args.work / "table.json"
    cells, records, deltas = [], [], {}
    started = time.monotonic()
    for row in rows:
        if row.attention == "varlen_attn" and not varlen_available(device):
            result = {"skipped": "n/a: CUDA only" if device == "cpu" else "n/a: no varlen_attn in this torch"}
        else:
            result = run_row(row, common, args.work, 900 if args.dry_run else ROW_TIMEOUT_S)  # CPU: shared machines
        if row.packed and row.attention not in deltas:
            deltas[row.attention] = packed_equals_padded(model, row.attention, device)
        delta = deltas.get(row.attention) if row.packed else None
        cells.append(table_row(row, result, delta, prompts, tflops))
        records.append({"row": asdict(row), **result, "logp_delta": delta})
        print(f"{row.name}: {cells[-1][-1]} ({time.monotonic() - started:.0f} s so far)", flush=True)
        out.write_text(json.dumps({"device": gpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                   "columns": COLUMNS, "cells": cells, "records": records}, indent=1))  # fmt: skip
    print(f"gpu_check: {gpu}; torch {torch.__version__}; {prompts} prompts x 1 sample, responses up to {response} "
          f"tokens; {time.monotonic() - started:.0f} s")  # fmt: skip
    print(format_table(cells))
    return 0 if all(c[-1] == "yes" or c[-1].startswith("n/a") for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
