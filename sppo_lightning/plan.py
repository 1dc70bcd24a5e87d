"""A plan before the GPU hours: per-GPU memory and time of one SPPO iteration of a config, no weights loaded.

    python -m sppo_lightning.plan --config configs/qwen2.5-7b-math.yaml [--config OVERLAY ...] [--gpu-memory-gib 80]

The config is parsed by the same parser as ``train.py`` (overlays and dotted overrides work), nothing is
instantiated: the model is built on the meta device from its ``config.json`` (a local folder's, or the published
values shipped below for hub ids this machine cannot read), which gives its exact parameter count and shapes.

The arithmetic is in pure functions (``training_memory``, ``rollout_memory``, ``iteration_time``). Per GPU:

1. parameters, gradients and AdamW's two moments, in the policy's dtype, divided by the FSDP shard count;
2. the layers FSDP gathers whole for compute (the root unit: embeddings, head, final norm, plus two decoder
   layers in flight), in the compute dtype;
3. activations of one micro-batch of rows at the longest prompt + response, from per-token coefficients measured
   with ``torch.autograd.graph.saved_tensors_hooks`` on Qwen2 decoder layers (flash / SDPA attention: nothing
   quadratic in length is kept), plus the head's logits over the response positions, which are kept in float32 and
   whose gradients are formed at the start of the backward;
4. SGLang while it generates: ``mem_fraction_static`` of the GPU, i.e. its weights (bf16) and a KV cache filling the
   rest, next to the training state, which stays on the GPU (unless ``fsdp_cpu_offload``);
5. a fixed allowance for the CUDA context and communication buffers (GPU only).

A LoRA run (``model.lora``) keeps the frozen base in ``model.base_dtype`` and the adapters (counted exactly: PEFT
applied to the meta-device model) in ``model.dtype``; gradients and AdamW moments exist for the adapters only.
Activations are counted as for full fine-tuning: each adapted layer's input, which the adapter keeps, is what the
layer would keep for its own weight gradient. Training FLOPs are 4N a token (forward 2N, input gradients 2N; no weight
gradients for the frozen base), 6N with gradient checkpointing.

Host memory (``host_memory``): per rank and for the first node, while the weights load (under FSDP2 rank 0 alone holds
the whole model, see ``sppo_lightning.loading``; elsewhere every rank does) and while training (CPU offload).

Gradients exist during the forward of a micro-batch when gradients accumulate over several micro-batches; with one
micro-batch per optimizer step they are only formed while activations are released, so the peak counts the larger
of the two. The time is an estimate from stated throughput assumptions (printed with it), not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from sppo_lightning.errors import ConfigError
from sppo_lightning.loss import PAIR_LOSSES

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Published config.json values of the hub models our configs name, so that a plan needs no download.
KNOWN_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen2.5-7B-Instruct": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
    },
}

# Activations a decoder layer keeps for its backward, per token, in bytes: b·(8h + 4i + 2·kv) + (4h if the compute
# dtype is narrower than float32: the norms' float32 copies) + 24 (norm statistics). Measured on Qwen2 layers with
# saved_tensors_hooks for h, i, kv in {64..256} x float32 / bfloat16; exact to the byte there.
LAYER_H, LAYER_I, LAYER_KV, LAYER_CONST = 8, 4, 2, 24
# Embedding output and final norm, per token: (4 + 2.25·b)·h.
# The head: float32 logits kept per response position (4·V), and at the start of the backward their gradient and
# softmax, about three more float32 copies; the compute-dtype logits when narrower.
LOGIT_COPIES_FP32 = 4


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a decoder-only model."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # key/value width: num_key_value_heads x head_dim
    vocab: int
    layer_params: int  # one decoder layer
    root_params: int  # outside the decoder layers: embeddings, head (if untied), final norm
    source: str = ""


@dataclass(frozen=True)
class RunShape:
    """The settings of a run that decide its memory and time, read from a parsed config."""

    accelerator: str = "gpu"
    devices: int = 1  # per node
    nodes: int = 1
    strategy: str = "single"  # single | ddp | fsdp2 | fsdp1
    shards: int = 1  # processes each parameter is split over
    param_dtype: str = "float32"  # stored parameters, gradients and optimizer state
    compute_dtype: str = "float32"
    cpu_offload: bool = False
    micro_batch: int = 1  # rows per micro-batch per GPU
    max_tokens: int | None = None  # data.max_tokens_per_micro_batch: a token budget instead of the row count
    group_rows: int = 1  # rows a prompt contributes (K, or 2 for the pair losses): a micro-batch holds whole groups
    prompt_len: int = 512
    response_len: int = 256
    checkpointing: bool = False
    accumulate: int = 1
    prompts_per_epoch: int = 64
    samples_per_prompt: int = 4
    passes: int = 1
    engine: str = "hf"  # hf | sglang | sglang_server
    mem_fraction_static: float = 0.0
    engine_tp: int = 1
    engine_resident: bool = False  # SGLang keeps its memory during training (release_memory: false)
    lora_params: int = 0  # trainable adapter parameters of a LoRA run (0: full fine-tuning)
    base_dtype: str | None = None  # a LoRA run's frozen base (None: param_dtype)

    @property
    def world(self) -> int:
        return self.devices * self.nodes


# ------------------------------------------------------------------------------------------------ the model
def model_config(name_or_path: str, trust_remote_code: bool = False):
    """The transformers config of a local folder, of the HF cache, or shipped above; never downloads."""
    from transformers import AutoConfig

    folder = Path(name_or_path)
    if (folder / "config.json").is_file():
        values = json.loads((folder / "config.json").read_text())
        if values.get("auto_map") and not trust_remote_code:
            raise ConfigError(f"{folder}/config.json needs the repository's own code: set model.trust_remote_code")
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code), f"{folder}/config.json"
    if name_or_path in KNOWN_CONFIGS:
        values = dict(KNOWN_CONFIGS[name_or_path])
        cls = type(AutoConfig.for_model(values["model_type"]))
        return cls(**values), f"published config of {name_or_path}, shipped in sppo_lightning.plan"
    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
        return config, f"{name_or_path} from the local Hugging Face cache"
    except (OSError, ValueError) as e:
        known = ", ".join(KNOWN_CONFIGS)
        raise ConfigError(
            f"model.model_name_or_path {name_or_path!r}: no config.json here or in the local cache, and not one of "
            f"the shipped configs ({known}); give a folder holding its config.json"
        ) from e


def model_shape(config, source: str = "") -> ModelShape:
    """Parameter counts from the model built on the meta device (no memory, no weights), widths from its config."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    layers = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))
    layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return ModelShape(
        params=params,
        layers=len(layers),
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        heads=heads,
        kv_dim=kv_heads * head_dim,
        vocab=text.vocab_size,
        layer_params=layer_params,
        root_params=params - len(layers) * layer_params,
        source=source,
    )


def lora_params(config, settings) -> int:
    """Trainable parameters of ``model.lora`` on this model: PEFT applied to the model on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from sppo_lightning.lora import LoRA, apply_lora

    values = {k: v for k, v in (vars(settings) if hasattr(settings, "__dict__") else dict(settings)).items()}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        model = apply_lora(model, LoRA(**values), torch.float32)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------- the arithmetic
def activation_bytes(model: ModelShape, run: RunShape, checkpointing: bool) -> dict[str, float]:
    """Activations of one micro-batch at the longest rows: ``{"layers", "logits", "total"}`` in bytes."""
    b = DTYPE_BYTES[run.compute_dtype]
    h, i, kv = model.hidden, model.intermediate, model.kv_dim
    tokens = run.micro_batch * (run.prompt_len + run.response_len)
    if run.max_tokens:  # the budget bounds a micro-batch, except a group longer than it, which goes alone
        tokens = max(run.max_tokens, run.group_rows * (run.prompt_len + run.response_len))
    per_layer = b * (LAYER_H * h + LAYER_I * i + LAYER_KV * kv) + (4 * h if b < 4 else 0) + LAYER_CONST
    base = (4 + 2.25 * b) * h
    if checkpointing:  # each layer keeps its input; one layer's activations are rebuilt at a time in backward
        layers = tokens * (model.layers * b * h + per_layer + base)
    else:
        layers = tokens * (model.layers * per_layer + base)
    # the head runs on the response positions only: at the longest rows, their share of the micro-batch's tokens
    logit_tokens = tokens * (run.response_len + 1) / (run.prompt_len + run.response_len)
    logits = logit_tokens * model.vocab * (4 * LOGIT_COPIES_FP32 + (b if b < 4 else 0))
    return {"layers": layers, "logits": logits, "total": layers + logits}


def training_memory(model: ModelShape, run: RunShape) -> dict[str, float]:
    """Per-GPU bytes of the training phase (SGLang released), by part, with ``peak`` and ``peak_no_checkpointing``."""
    p = DTYPE_BYTES[run.param_dtype]
    c = DTYPE_BYTES[run.compute_dtype]
    on_gpu = 0 if run.cpu_offload else 1
    shards = run.shards
    trained = run.lora_params or model.params  # what has gradients and AdamW moments
    base = DTYPE_BYTES[run.base_dtype or run.param_dtype] if run.lora_params else p
    out = {
        "parameters": on_gpu * (model.params * base + run.lora_params * p) / shards,
        "gradients": on_gpu * trained * p / shards,
        "optimizer": on_gpu * 2 * trained * p / shards,  # AdamW: exp_avg and exp_avg_sq, in the param dtype
    }
    if run.lora_params and run.strategy not in ("fsdp2", "fsdp1"):
        out["gathered"] = model.params * c if c != base else 0.0  # autocast copies of a base stored wider
    elif run.strategy == "fsdp2":  # whole units in compute dtype while they run: root + 2 layers in flight
        out["gathered"] = (model.root_params + 2 * model.layer_params) * c
    elif run.strategy == "fsdp1":  # gathered in the stored dtype, plus autocast's compute-dtype copies
        out["gathered"] = (model.root_params + 2 * model.layer_params) * (p + (c if c != p else 0))
    elif run.compute_dtype != run.param_dtype:  # autocast keeps compute-dtype copies of the weights
        out["gathered"] = model.params * c
    else:
        out["gathered"] = 0.0
    for key, ckpt in (("activations", run.checkpointing), ("activations_no_checkpointing", False)):
        out[key] = activation_bytes(model, run, ckpt)["total"]
    out["overhead"] = 2 * GIB if run.accelerator == "gpu" else 0.0
    static = out["parameters"] + out["optimizer"] + out["gathered"] + out["overhead"]

    def peak(act: float) -> float:
        if run.accumulate > 1:  # earlier micro-batches' gradients are held while this one's activations are
            return static + out["gradients"] + act
        return static + max(out["gradients"], act)

    out["peak"] = peak(out["activations"])
    out["peak_no_checkpointing"] = peak(out["activations_no_checkpointing"])
    return out


def host_memory(model: ModelShape, run: RunShape) -> dict[str, float]:
    """Host (CPU) memory per rank and per node beyond the libraries, while the weights load and while training.

    Under FSDP2 (``sppo_lightning.loading``) rank 0 alone reads the whole checkpoint; the other ranks receive their
    shards one tensor at a time, on the GPU under NCCL (nothing in host memory) or in host memory on CPU processes
    (the largest tensor in flight). Every other strategy loads the whole model in each process. CPU offload keeps the
    shards, their gradients and AdamW's two moments in host memory while training; on CPU processes all the training
    state is host memory (the per-process table above).
    """
    p = DTYPE_BYTES[run.param_dtype]
    whole = model.params * p
    largest = max(model.vocab, model.intermediate) * model.hidden * p  # an embedding, or an MLP matrix
    if run.strategy == "fsdp2":
        rank0, other = whole, (largest if run.accelerator == "cpu" else 0.0)
    else:
        rank0 = other = whole
    if run.accelerator == "cpu" or run.cpu_offload:
        training = 4 * model.params * p / run.shards  # parameters, gradients, two moments: this rank's shards
    else:
        training = 0.0
    out = {"load_rank0": rank0 + training, "load_other_rank": other + training, "training_per_rank": training}
    out["load_node0"] = out["load_rank0"] + (run.devices - 1) * out["load_other_rank"]
    return out


def rollout_memory(model: ModelShape, run: RunShape, gpu_bytes: float) -> dict[str, float]:
    """Per-GPU bytes while SGLang (colocated) generates: its share, split into weights and KV cache, and the training
    state that stays on the GPU (parameters and optimizer moments; gradients are freed after each step)."""
    if run.engine != "sglang":
        return {}
    share = run.mem_fraction_static * gpu_bytes
    weights = model.params * 2 / run.engine_tp  # SGLang serves bf16
    kv_per_token = 2 * model.layers * model.kv_dim * 2 / run.engine_tp  # keys and values, bf16
    kv = max(share - weights, 0.0)
    train = training_memory(model, run)
    state = train["parameters"] + train["optimizer"]  # gradients are freed after each step
    overhead = 2 * GIB if run.accelerator == "gpu" else 0.0
    rows_per_engine = math.ceil(run.prompts_per_epoch * run.samples_per_prompt / run.world) * run.engine_tp
    needed = rows_per_engine * (run.prompt_len + run.response_len)
    kv_tokens = kv / kv_per_token
    return {
        "sglang_weights": weights,
        "sglang_kv_cache": kv,
        "kv_tokens": kv_tokens,
        "kv_tokens_needed": needed,  # every row of the engine's share at once, at the longest lengths
        "waves": math.ceil(needed / kv_tokens) if kv_tokens >= 1 else math.inf,
        "training_state": state,
        "peak": share + state + overhead,
    }


@dataclass(frozen=True)
class Throughput:
    """Assumptions the time estimate rests on, printed with it."""

    peak_tflops: float = 989.0  # dense bf16 of an H100 SXM
    mfu: float = 0.35  # share of it training reaches (forward + backward + recompute)
    memory_tb_s: float = 3.35  # HBM bandwidth of an H100 SXM: decode reads the weights and the KV cache per step
    decode_efficiency: float = 0.5  # share of that bandwidth decoding reaches

    @classmethod
    def cpu(cls) -> Throughput:
        return cls(peak_tflops=0.2, mfu=0.5, memory_tb_s=0.02, decode_efficiency=0.5)


def iteration_time(
    model: ModelShape, run: RunShape, tp: Throughput, kv_tokens: float | None = None
) -> dict[str, float]:
    """Seconds of one iteration per phase, at the longest rows (an upper bound on tokens). ``kv_tokens``: what the
    engine's KV cache holds; rows beyond it are generated in further waves."""
    rows = run.prompts_per_epoch * run.samples_per_prompt
    seq = run.prompt_len + run.response_len
    tokens = rows * seq
    flops_per_s = tp.peak_tflops * 1e12 * tp.mfu * run.world
    train_mult = 8 if run.checkpointing else 6  # forward 2N, backward 4N, recompute 2N per token
    if run.lora_params:  # a frozen base needs no weight gradients: backward 2N (the adapters' FLOPs are negligible)
        train_mult -= 2
    train = run.passes * train_mult * model.params * tokens / flops_per_s
    ref = 2 * model.params * tokens / flops_per_s  # the π_t pass: one forward
    # decode: each of response_len steps reads the weights once and the batch's KV cache (half full on average)
    rows_per_gpu = math.ceil(rows / run.world)
    wave = rows_per_gpu if kv_tokens is None else max(1, min(rows_per_gpu, int(kv_tokens // seq)))
    waves = math.ceil(rows_per_gpu / wave)
    kv_bytes = wave * (run.prompt_len + run.response_len / 2) * 2 * model.layers * model.kv_dim * 2
    step = (model.params * 2 + kv_bytes) / (tp.memory_tb_s * 1e12 * tp.decode_efficiency)
    prefill = 2 * model.params * rows * run.prompt_len / flops_per_s
    rollout = waves * run.response_len * step + prefill
    return {
        "tokens": tokens,
        "waves": waves,
        "rollout": rollout,
        "ref_logprobs": ref,
        "train": train,
        "total": rollout + ref + train,
    }


# --------------------------------------------------------------------------------------------- the config
def _init_args(value) -> tuple[str, dict]:
    """(class path, init args) of a config entry that is a class path string or a ``class_path``/``init_args``."""
    if value is None:
        return "", {}
    if isinstance(value, str):
        return value, {}
    get = value.get if hasattr(value, "get") else lambda k, d=None: getattr(value, k, d)
    args = get("init_args") or {}
    return str(get("class_path") or ""), dict(vars(args)) if hasattr(args, "__dict__") else dict(args)


def _count(devices) -> int:
    if isinstance(devices, int):
        return devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip("-").isdigit():
        return int(devices) if int(devices) > 0 else 1
    return 1


def run_shape(config) -> RunShape:
    """The settings of a parsed ``train.py`` config (the namespace jsonargparse returns)."""
    t, m, d = config.trainer, config.model, config.data
    accelerator = "cpu" if str(t.accelerator) == "cpu" else "gpu"
    devices, nodes = _count(t.devices), _count(t.num_nodes)
    strategy_path, strategy_args = _init_args(t.strategy)
    precision = str(t.precision or "32-true")
    compute = m.dtype
    if "ModelParallelStrategy" in strategy_path:
        strategy, shards = "fsdp2", int(strategy_args.get("data_parallel_size") or devices * nodes)
        compute = m.fsdp_param_dtype or ("bfloat16" if accelerator == "gpu" else m.dtype)
    elif "FSDP" in strategy_path or strategy_path == "fsdp":
        strategy, shards = "fsdp1", devices * nodes
    elif devices * nodes > 1:
        strategy, shards = "ddp", 1
    else:
        strategy, shards = "single", 1
    base_dtype = getattr(m, "base_dtype", None) if getattr(m, "lora", None) is not None else None
    if base_dtype is not None and strategy in ("single", "ddp"):  # the frozen base computes in its own dtype
        compute = base_dtype
    if precision.startswith("bf16"):
        compute = "bfloat16"
    elif precision.startswith("16"):
        compute = "float16"
    engine_path, engine_args = _init_args(d.engine)
    engine, fraction, tp, resident = "hf", 0.0, 1, False
    if engine_path.endswith("SGLangServerEngine"):
        engine = "sglang_server"
    elif engine_path.endswith("SGLangEngine"):
        engine = "sglang"
        fraction = float(engine_args.get("mem_fraction_static", 0.5))
        tp = int(engine_args.get("tp_size", 1))
        resident = not engine_args.get("release_memory", True)
    return RunShape(
        accelerator=accelerator,
        devices=devices,
        nodes=nodes,
        strategy=strategy,
        shards=shards,
        param_dtype=m.dtype,
        compute_dtype=compute,
        cpu_offload=bool(m.fsdp_cpu_offload) and strategy == "fsdp2",
        micro_batch=d.micro_batch_size,
        max_tokens=getattr(d, "max_tokens_per_micro_batch", None),
        group_rows=2 if m.loss_type in PAIR_LOSSES else d.samples_per_prompt,
        prompt_len=d.max_prompt_length,
        response_len=d.max_response_length,
        checkpointing=bool(m.gradient_checkpointing),
        accumulate=_accumulate(t, d, devices * nodes),
        prompts_per_epoch=int(d.prompts_per_epoch or 0),
        samples_per_prompt=d.samples_per_prompt,
        passes=int(getattr(d, "passes_per_rollout", 1) or 1),
        engine=engine,
        mem_fraction_static=fraction,
        engine_tp=tp,
        engine_resident=resident,
        base_dtype=base_dtype,
    )


def _accumulate(t, d, world: int) -> int:
    """Micro-batches per optimizer step: derived from ``data.rows_per_step`` when set (its rows per process cut by
    ``micro_batch_size``; a token budget cuts the same rows into about as many), else the trainer's setting."""
    rows = getattr(d, "rows_per_step", None)
    if rows:
        return max(1, math.ceil(rows / (world * d.micro_batch_size)))
    return int(t.accumulate_grad_batches or 1)


def parse_config(args: list[str]):
    """``train.py fit``'s config from ``--config`` files and dotted overrides, parsed and checked, not instantiated."""
    from lightning.pytorch.cli import LightningCLI

    from sppo_lightning.cli import SPPOArgumentParser
    from sppo_lightning.data.datamodule import RolloutDataModule
    from sppo_lightning.module import SPPOModule

    class ParseOnly(LightningCLI):
        def instantiate_classes(self) -> None:  # no model, no data, no trainer: only the values
            pass

        def _set_seed(self) -> None:  # nor a global seed
            pass

    saved_argv = sys.argv
    sys.argv = [saved_argv[0]]  # LightningCLI(args=...) warns when the process's own arguments are also set
    try:
        cli = ParseOnly(
            SPPOModule,
            RolloutDataModule,
            run=False,
            args=args,
            parser_kwargs={"parser_mode": "omegaconf+"},
            parser_class=SPPOArgumentParser,  # a typo is one line with a "did you mean", as in train.py
        )
    finally:
        sys.argv = saved_argv
    return cli.config


# ------------------------------------------------------------------------------------------------ the table
def _gib(x: float) -> str:
    return f"{x / GIB:8.2f} GiB"


def _micro_batch(run: RunShape) -> str:
    rows = f"{run.prompt_len} + {run.response_len} tokens"
    if run.max_tokens:
        return f"of up to {run.max_tokens:,} tokens (rows of {rows})"
    return f"{run.micro_batch} rows of {rows}"


def format_plan(model: ModelShape, run: RunShape, gpu_gib: float, tp: Throughput) -> str:
    gpu = gpu_gib * GIB
    train = training_memory(model, run)
    roll = rollout_memory(model, run, gpu)
    times = iteration_time(model, run, tp, roll.get("kv_tokens"))
    device = "GPU" if run.accelerator == "gpu" else "process (CPU)"
    lines = [
        f"model: {model.params / 1e9:.3f} B parameters, {model.layers} layers, hidden {model.hidden}, intermediate "
        f"{model.intermediate}, kv width {model.kv_dim}, vocab {model.vocab} ({model.source})",
        f"run: {run.strategy} over {run.world} {run.accelerator.upper()}(s) ({run.shards} shard(s)), parameters "
        f"{run.param_dtype}, compute {run.compute_dtype}, micro-batch {_micro_batch(run)}, accumulate "
        f"{run.accumulate}, gradient checkpointing "
        f"{'on' if run.checkpointing else 'off'}",
        *(
            [
                f"LoRA: {run.lora_params / 1e6:.1f} M adapter parameters ({run.lora_params / model.params:.2%} of the "
                f"model) in {run.param_dtype}, frozen base in {run.base_dtype or run.param_dtype}; gradients and AdamW "
                "moments for the adapters only"
            ]
            if run.lora_params
            else []
        ),
        "",
        f"memory per {device}, training (SGLang released):",
        f"  parameters                 {_gib(train['parameters'])}",
        f"  gradients                  {_gib(train['gradients'])}",
        f"  optimizer (AdamW moments)  {_gib(train['optimizer'])}",
        f"  whole units while running {_gib(train['gathered'])}",
        f"  activations, checkpointing {_gib(activation_bytes(model, run, True)['total'])}",
        f"  activations, none          {_gib(train['activations_no_checkpointing'])}",
        f"  CUDA context, buffers      {_gib(train['overhead'])}",
        f"  peak as configured         {_gib(train['peak'])}",
        f"  peak without checkpointing {_gib(train['peak_no_checkpointing'])}",
    ]
    if roll:
        lines += [
            f"memory per {device}, rollout (SGLang mem_fraction_static {run.mem_fraction_static}):",
            f"  SGLang weights (bf16)      {_gib(roll['sglang_weights'])}",
            f"  SGLang KV cache            {_gib(roll['sglang_kv_cache'])}  ({roll['kv_tokens']:,.0f} tokens; the "
            f"rollout's {roll['kv_tokens_needed']:,} at most: {roll['waves']} wave(s))",
            f"  training state kept        {_gib(roll['training_state'])}",
            f"  peak                       {_gib(roll['peak'])}",
        ]
        if roll["sglang_kv_cache"] <= 0:
            lines.append("  SGLang's share does not even hold its weights: raise mem_fraction_static")
    elif run.engine == "sglang_server":
        lines.append("rollout: an SGLang server on its own GPUs (not counted here)")
    if run.engine_resident:  # release_memory: false keeps SGLang's share during training too
        lines.append(f"  + SGLang resident          {_gib(run.mem_fraction_static * gpu)}")
        train["peak"] += run.mem_fraction_static * gpu
    peak = max(train["peak"], roll.get("peak", 0.0))
    if run.accelerator == "gpu":
        # SGLang's fixed share must hold its weights and some KV cache, whatever the peak
        starved = run.engine == "sglang" and roll["sglang_kv_cache"] <= 0
        verdict = "fits" if peak <= gpu and not starved else "does NOT fit"
        lines.append(f"peak {peak / GIB:.1f} GiB per GPU: {verdict} on a {gpu_gib:g} GiB GPU")
    else:
        lines.append(f"peak {peak / GIB:.2f} GiB of process memory (model state and activations, not the libraries)")
    host = host_memory(model, run)
    once = "read once by rank 0, the others receive their shards" if run.strategy == "fsdp2" else "whole in every rank"
    lines += [
        f"host memory (CPU RAM) while the weights load ({once}), beyond the libraries:",
        f"  rank 0                     {_gib(host['load_rank0'])}",
        f"  each other rank            {_gib(host['load_other_rank'])}",
        f"  {f'node 0 ({run.devices} rank(s))':<27}{_gib(host['load_node0'])}",
        f"  per rank while training    {_gib(host['training_per_rank'])}"
        + ("  (CPU offload)" if run.cpu_offload and run.accelerator == "gpu" else ""),
    ]
    rows = run.prompts_per_epoch * run.samples_per_prompt
    lines += [
        "",
        f"tokens per iteration: {times['tokens']:,} at most ({rows} rows x {run.prompt_len + run.response_len})",
        f"time per iteration (estimate): {times['total']:,.0f} s = rollout {times['rollout']:,.0f} s + pi_t "
        f"log-probs {times['ref_logprobs']:,.0f} s + training {times['train']:,.0f} s",
        f"  assuming {tp.peak_tflops:g} TFLOP/s x {tp.mfu:g} MFU per device for training "
        f"({'4N FLOPs a token (frozen base), 6N' if run.lora_params else '6N FLOPs a token, 8N'} with "
        f"checkpointing, x{run.passes} passes), decoding at {tp.decode_efficiency:g} x {tp.memory_tb_s:g} TB/s "
        "(weights and KV cache read per step), every row at the longest lengths",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sppo_lightning.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    parser.add_argument("--tflops", type=float, default=None, help="peak TFLOP/s per device (H100 bf16: 989)")
    parser.add_argument("--mfu", type=float, default=None, help="share of peak training reaches (0.35)")
    parser.add_argument("--memory-tb-s", type=float, default=None, help="memory bandwidth per device (3.35)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON instead of the table")
    own, rest = parser.parse_known_args(argv)
    from sppo_lightning.errors import UserInputError

    try:
        config = parse_config(rest)
        run = run_shape(config)
        hf_config, source = model_config(config.model.model_name_or_path, bool(config.model.trust_remote_code))
        model = model_shape(hf_config, source)
        if getattr(config.model, "lora", None) is not None:
            run = replace(
                run, lora_params=lora_params(hf_config, config.model.lora), base_dtype=config.model.base_dtype
            )
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    tp = Throughput() if run.accelerator == "gpu" else Throughput.cpu()
    overrides = {"peak_tflops": own.tflops, "mfu": own.mfu, "memory_tb_s": own.memory_tb_s}
    tp = Throughput(**{**asdict(tp), **{k: v for k, v in overrides.items() if v is not None}})
    if own.json:
        gpu = own.gpu_memory_gib * GIB
        out = {
            "model": asdict(model),
            "run": asdict(run),
            "training": training_memory(model, run),
            "rollout": rollout_memory(model, run, gpu),
            "host": host_memory(model, run),
            "time": iteration_time(model, run, tp, rollout_memory(model, run, gpu).get("kv_tokens")),
        }
        print(json.dumps(out, indent=1))
        return
    print(format_plan(model, run, own.gpu_memory_gib, tp))


if __name__ == "__main__":
    main()
