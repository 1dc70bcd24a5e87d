"""The attention backend (``model.attn_implementation``): resolved before the weights are fetched, refused in one line
when it cannot run; packed rows under sliding-window and soft-capped attention give the padded rows' values."""

import inspect
import shutil
import subprocess
import sys

import pytest
import torch

from sppo_lightning import attention
from sppo_lightning.attention import (
    cu_seqlens,
    resolve_attention,
    segment_mask,
    varlen_call_kwargs,
    varlen_signature_problem,
)
from sppo_lightning.data.batching import collate
from sppo_lightning.errors import ConfigError
from sppo_lightning.logprobs import packed_token_logps, response_token_logps
from tests.test_cli import DEMO, run
from tests.test_logprobs import ROWS, logps_and_grads

CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------- resolution
def test_auto_resolves_on_cpu_to_sdpa_for_padded_and_per_row_sdpa_for_packed():
    assert resolve_attention("auto", packed=False, device="cpu") == ("sdpa", "padded rows")
    name, why = resolve_attention(None, packed=True, device="cpu")  # None is auto
    assert name == "sdpa" and "one sdpa call per row" in why


@pytest.mark.skipif(CUDA, reason="on a GPU machine flash-attn or varlen_attn may be usable")
@pytest.mark.parametrize("backend", ["flash_attention_2", "varlen_attn"])
def test_a_backend_that_cannot_run_is_refused_by_name_with_the_alternatives(backend):
    with pytest.raises(ConfigError) as e:
        resolve_attention(backend, packed=True, device="cpu")
    message = str(e.value)
    assert message.startswith(f"model.attn_implementation={backend} is not usable here: ")
    assert "\n" not in message and "CUDA" in message  # the reason: neither runs without CUDA
    assert message.endswith("; use one of auto, sdpa, eager")  # the other one cannot run here either: not offered


def test_an_unknown_backend_lists_the_known_ones():
    with pytest.raises(ConfigError, match="model.attn_implementation='flex' is not one of auto, flash_attention_2"):
        resolve_attention("flex", packed=False, device="cpu")


def test_sdpa_and_eager_resolve_as_asked():
    assert resolve_attention("eager", packed=True, device="cpu")[0] == "eager"
    assert resolve_attention("sdpa", packed=False, device="cpu")[0] == "sdpa"


def test_sglangs_flash_attn_4_namespace_package_does_not_pass_for_flash_attention_2(tmp_path):
    """sglang installs ``flash-attn-4``, whose ``flash_attn`` holds only ``flash_attn.cute``: ``find_spec`` finds it,
    the detection does not."""
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    info = tmp_path / "flash_attn_4-4.0.0b4.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flash-attn-4\nVersion: 4.0.0b4\n")
    (info / "top_level.txt").write_text("flash_attn\n")
    code = (
        "import importlib.util; from sppo_lightning.attention import flash_attn_2_usable; "
        "print(importlib.util.find_spec('flash_attn') is not None, flash_attn_2_usable()[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); {code}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.split() == ["True", "False"]


# ------------------------------------------------------------------------------------ torch's varlen_attn, guarded
def test_varlen_call_for_the_installed_torch_signature_is_causal_with_flash_window_semantics():
    """torch 2.13's ``varlen_attn`` is causal only with ``window_size=(-1, 0)``; a sliding window W of transformers
    (the W keys (i - W, i]) is ``(W - 1, 0)``."""
    fn = attention._torch_varlen()
    if fn is None:
        pytest.skip(f"torch {torch.__version__} has no varlen_attn")
    params = inspect.signature(fn).parameters
    assert varlen_signature_problem(params) is None
    assert varlen_call_kwargs(params, 0.125, None, gqa=True) == {"window_size": (-1, 0), "scale": 0.125,
                                                                 "enable_gqa": True}  # fmt: skip
    assert varlen_call_kwargs(params, 0.125, 4, gqa=False)["window_size"] == (3, 0)


def test_varlen_guard_reads_older_and_foreign_signatures():
    def with_is_causal(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None): ...

    def foreign(q, k, v, cu_seqlens, max_seqlen): ...

    def no_causal(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=None): ...

    old = inspect.signature(with_is_causal).parameters
    assert varlen_signature_problem(old) is None
    assert varlen_call_kwargs(old, 0.125, None, gqa=True) == {"is_causal": True}  # scale, GQA done by the caller
    assert varlen_call_kwargs(old, 0.125, 4, gqa=False) is None  # a window it cannot express: per-row sdpa instead
    assert "not (query, key, value" in varlen_signature_problem(inspect.signature(foreign).parameters)
    assert "no causal" in varlen_signature_problem(inspect.signature(no_causal).parameters)


def test_cu_seqlens_are_the_row_boundaries():
    out = cu_seqlens([3, 1, 4])
    assert out.dtype == torch.int32 and out.tolist() == [0, 3, 4, 8]


def test_segment_mask_keeps_the_shared_prompt_and_the_window():
    """A 3-token response after a 2-token prompt, window 3: query i (at 2 + i) sees keys 2 + i - 2 .. 2 + i."""
    assert segment_mask(3, 0, None, "cpu") is None  # plain causal: sdpa's is_causal
    assert segment_mask(3, 2, 3, "cpu").int().tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert segment_mask(3, 2, None, "cpu").int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


# ----------------------------------------------------------------------- sliding window and soft-capping, packed
def tiny(kind: str, attn: str, checkpointing: bool, **overrides):
    """A random 2-layer model of the family, one full and one sliding-window layer, window 3 (the rows are 3 to 9
    tokens long, so it cuts), Gemma-2's soft-capping strong enough to matter."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Qwen2Config

    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, sliding_window=3, pad_token_id=0)  # fmt: skip
    if kind == "qwen2":  # layers from max_window_layers on use the window
        config = Qwen2Config(**sizes, **{"use_sliding_window": True, "max_window_layers": 1, **overrides})
    else:
        config = Gemma2Config(**sizes, head_dim=8, attn_logit_softcapping=2.0, final_logit_softcapping=5.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    return model


def padded_and_packed(model, share_prompt):
    b = collate(ROWS, pad_id=0)
    rows = (b.input_ids, b.attention_mask, b.response_mask)
    padded = logps_and_grads(model, lambda: response_token_logps(model, *rows))
    packed = logps_and_grads(model, lambda: packed_token_logps(model, *rows, b.prompt_lengths, share_prompt))
    return padded, packed


MODELS = {"qwen2-sdpa": ("qwen2", "sdpa"), "qwen2-eager": ("qwen2", "eager"), "gemma2": ("gemma2", "eager")}


@pytest.mark.parametrize("kind,attn", list(MODELS.values()), ids=list(MODELS))
@pytest.mark.parametrize("share_prompt", [False, True], ids=["rows", "shared-prompt"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
def test_sliding_window_and_softcapped_models_pack_exactly(kind, attn, share_prompt, checkpointing):
    """Qwen2 with ``use_sliding_window`` and Gemma-2 (window on alternate layers, attention soft-capped at 2): the
    packed rows (whole, or each prompt once) give the padded rows' log-probs and gradients (errors up to 0.45 when
    the packed attention dropped the window and the cap)."""
    model = tiny(kind, attn, checkpointing)
    (padded, padded_grads), (packed, packed_grads) = padded_and_packed(model, share_prompt)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    assert packed_grads.keys() == padded_grads.keys() and padded_grads
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5 * max(float(grad.abs().max()), 1), rtol=1e-4)


def test_the_window_changes_the_log_probs_it_is_tested_on():
    """Without it the test above would pass with the window dropped."""
    (windowed, _), _ = padded_and_packed(tiny("qwen2", "sdpa", False), False)
    (full, _), _ = padded_and_packed(tiny("qwen2", "sdpa", False, use_sliding_window=False), False)
    assert (windowed - full).abs().max() > 1e-2


# -------------------------------------------------------------------------------------------------- through the CLI
def test_flash_attention_2_without_it_stops_in_one_line_before_the_weights_are_read(tmp_path):
    """The model folder has its tokenizer and config but no weights: reaching ``from_pretrained`` would fail on
    them, the attention check comes first."""
    if CUDA:
        pytest.skip("flash-attn may be usable on a GPU machine")
    from sppo_lightning.toy import MODEL_DIR

    folder = tmp_path / "model"
    shutil.copytree(MODEL_DIR, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    proc = run(
        "fit", "--config", DEMO, f"--model.model_name_or_path={folder}",
        "--model.attn_implementation=flash_attention_2", f"--trainer.default_root_dir={tmp_path / 'run'}", check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "model.attn_implementation" in line]
    assert len(errors) == 1 and "is not usable here" in errors[0] and "use one of auto, sdpa, eager" in errors[0]
    assert "Traceback" not in proc.stderr and "safetensors" not in proc.stderr
