"""LoRA adapters on the policy, through PEFT: the settings, applying them, and the merged weights.

``model.lora`` (``LoRA``, null = full fine-tuning) is applied by ``apply_lora`` once, in ``configure_model``, right
after loading and before any sharding wrapper. Everything downstream sees a PEFT model whose only trainable
parameters are the adapters (``lora_A``/``lora_B``, and biases when ``bias`` says so).

What leaves the trainer as *weights* (the colocated SGLang engine, the server's folder, ``hf_model/``) is the merged
model under the base model's names, ``W + s·B·A`` with PEFT's scaling ``s`` (α/r, or α/√r with rsLoRA), computed from
whole tensors one layer at a time (``merged_tensors``): the training model is never merged in place, so no merge /
unmerge rounding ever reaches the weights that train.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from sppo_lightning.errors import ConfigError

ADAPTER = "default"  # PEFT's adapter name: one adapter per run
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the base model's names


@dataclass
class LoRA:
    """``model.lora``: the LoRA adapters (PEFT's ``LoraConfig`` fields under shorter names)."""

    r: int = 16
    """Rank of each adapter (``LoraConfig.r``)."""
    alpha: float = 32
    """Scale numerator (``lora_alpha``): the update is (alpha / r)·B·A, or (alpha / √r)·B·A with ``use_rslora``."""
    dropout: float = 0.0
    """Dropout on the adapter's input (``lora_dropout``); off anyway under ``model.disable_dropout`` (the default)."""
    target_modules: str | list[str] = "all-linear"
    """Which linear layers get an adapter: ``all-linear`` (every linear layer but the output head, as QLoRA and
    verl's ``target_modules: all-linear``), or module names (``[q_proj, v_proj]``)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train too: none, all of them, or those of the adapted layers."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / √r (Kalajdzievski 2023) instead of alpha / r."""

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"model.lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"model.lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("model.lora.target_modules is empty: name the layers to adapt, or all-linear")

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            bias=self.bias,
            use_rslora=self.use_rslora,
            task_type="CAUSAL_LM",
        )


def as_lora(value: LoRA | dict | None) -> LoRA | None:
    """``model.lora`` as given (a ``LoRA``) or as a checkpoint's hyper-parameters store it (a plain dict)."""
    return LoRA(**value) if isinstance(value, dict) else value


def as_record(value: LoRA | dict | None) -> dict | None:
    """``model.lora`` as plain data, for the hyper-parameters a checkpoint stores (loadable with weights_only)."""
    return asdict(value) if isinstance(value, LoRA) else value


def is_peft(model: torch.nn.Module) -> bool:
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT model (``model`` itself otherwise)."""
    return model.get_base_model() if is_peft(model) else model


def apply_lora(model: torch.nn.Module, settings: LoRA, trainable_dtype: torch.dtype) -> torch.nn.Module:
    """``model`` with LoRA adapters (a PEFT model): every base parameter frozen, the adapters in ``trainable_dtype``
    (float32 while a bfloat16 base stays bfloat16: ``model.base_dtype``)."""
    from peft import get_peft_model
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    try:
        peft_model = get_peft_model(model, settings.peft_config(), autocast_adapter_dtype=False)
    except ValueError as e:  # target modules not found, unsupported layer types
        raise ConfigError(f"model.lora: {e}") from None
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and (not isinstance(module, LoraLinear) or module.fan_in_fan_out):
            raise ConfigError(
                f"model.lora.target_modules reaches {base_name(name)} ({type(module.base_layer).__name__}): only "
                "linear layers (nn.Linear) are supported; name linear layers or use all-linear"
            )
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.to(trainable_dtype)
    return peft_model


def scalings(model: torch.nn.Module) -> dict[str, float]:
    """PEFT's scale ``s`` of each adapted layer, by the layer's name as the base model spells it."""
    from peft.tuners.lora import LoraLayer

    return {
        base_name(name): module.scaling[ADAPTER]
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.scaling
    }


def base_name(name: str) -> str:
    """``base_model.model.model.layers.0.mlp.up_proj.base_layer.weight`` -> ``model.layers.0.mlp.up_proj.weight``."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def merged_tensors(
    named: Iterable[tuple[str, torch.Tensor]], scale: dict[str, float]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged model's ``(base name, tensor)`` from a PEFT model's whole tensors, in any order.

    ``W' = W + s·(B @ A)`` for each adapted layer (PEFT's ``get_delta_weight`` for ``nn.Linear``), computed in
    float32 and returned in W's dtype; every other tensor passes through under its base name. A layer's pieces are
    held until all three arrived (they come one after another in ``named_parameters`` order), so at most one layer is
    held at a time.
    """
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in named:
        name = name.removeprefix(PEFT_PREFIX)
        for piece in (".lora_A.", ".lora_B."):
            if piece in name:
                layer = name.split(piece)[0]
                pending.setdefault(layer, {})[piece[1:-1]] = tensor
                break
        else:
            if ".base_layer.weight" in name and name.endswith(".base_layer.weight"):
                layer = name.removesuffix(".base_layer.weight")
                pending.setdefault(layer, {})["W"] = tensor
            else:
                yield base_name(name), tensor
                continue
        parts = pending[layer]
        if len(parts) == 3:
            del pending[layer]
            w, a, b = parts["W"], parts["lora_A"], parts["lora_B"]
            yield f"{layer}.weight", (w.float() + scale[layer] * (b.float() @ a.float())).to(w.dtype)
    if pending:
        raise ValueError(f"incomplete LoRA layers (no base weight or adapter): {sorted(pending)[:3]}")


def merged_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The merged model's state dict (base names) from a PEFT model's whole ``state_dict``."""
    return dict(merged_tensors(state_dict.items(), scalings(model)))


def adapter_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What PEFT writes to ``adapter_model.safetensors``, from a PEFT model's whole ``state_dict``."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=ADAPTER)


def save_adapter(model: torch.nn.Module, adapter: dict[str, torch.Tensor], base: str, out: str | Path) -> Path:
    """An adapter folder that ``PeftModel.from_pretrained(base_model, out)`` loads (``adapter_config.json`` and
    ``adapter_model.safetensors``, as ``PeftModel.save_pretrained`` writes them)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = model.peft_config[ADAPTER]
    config.base_model_name_or_path = base
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in adapter.items()}, out / "adapter_model.safetensors", {"format": "pt"})
    return out


def trainable_keys(module: torch.nn.Module, prefix: str = "") -> set[str]:
    """State-dict keys of the parameters that train: what a LoRA checkpoint keeps."""
    return {prefix + name for name, p in module.named_parameters() if p.requires_grad}
