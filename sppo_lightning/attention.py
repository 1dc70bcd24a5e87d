"""Which attention kernel runs the policy, decided once before the weights are fetched, and the attention functions
packed rows need (see ``logprobs.packed_token_logps``).

``model.attn_implementation`` takes a backend name; ``resolve_attention`` turns it into the one that runs:

- ``flash_attention_2``: the ``flash-attn`` package's kernels, padded rows and packed rows alike (transformers finds
  the row boundaries in the position ids). Usable where transformers' ``is_flash_attn_2_available()`` says so: a
  ``find_spec("flash_attn")`` is fooled by sglang's ``flash-attn-4``, a namespace package holding only
  ``flash_attn.cute``.
- ``varlen_attn``: PyTorch's own variable-length attention (``torch.nn.attention.varlen.varlen_attn``, the
  FlashAttention-2 kernel bundled with torch, CUDA and bf16/fp16 only) for packed rows, sdpa for padded ones. No
  extra package.
- ``sdpa`` / ``eager``: transformers' implementations for padded rows; packed rows run one scaled-dot-product
  attention per row (``_segment_attention``).
- ``auto`` (the default): for packed rows ``flash_attention_2`` if usable, else ``varlen_attn`` on CUDA, else
  ``sdpa``; for padded rows ``sdpa``. It never fails.

Packed forwards pass their row layout to the attention as a ``segments`` keyword. Gradient checkpointing recomputes
each layer in backward with the same arguments but reads the model's attention implementation again, at that time:
so the implementation the policy keeps is a dispatching twin of sdpa/eager (``sppo_sdpa``, ``sppo_eager``,
``sppo_varlen``) that runs the per-row attention when it is given segments and the plain one otherwise, and the
recomputation sees what the forward saw.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

import torch

from sppo_lightning.errors import ConfigError

BACKENDS = ("auto", "flash_attention_2", "varlen_attn", "sdpa", "eager")
KEY = "model.attn_implementation"

# Names registered with transformers. The twins keep the masks of their base implementation (padded rows); the two
# names used during a packed forward have no mask function, so that transformers builds no (N, N) mask of the whole
# packed sequence (each row's attention makes its own, of the row's size).
TWINS = {"sdpa": "sppo_sdpa", "eager": "sppo_eager", "varlen_attn": "sppo_varlen"}
SEGMENT_ATTENTION = "sppo_segments"  # packed forward, one scaled-dot-product attention per row
VARLEN_ATTENTION = "sppo_varlen_rows"  # packed forward, torch's varlen_attn


# --------------------------------------------------------------------------------------------------- detection
def flash_attn_2_usable() -> tuple[bool, str]:
    """(usable, why): FlashAttention-2 as transformers sees it, from the ``flash-attn`` distribution (not
    ``flash-attn-4``, whose ``flash_attn.cute`` shares the import name), with CUDA."""
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return False, "transformers' is_flash_attn_2_available() is false (no flash-attn>=2.3.3 or no CUDA)"
    # Older transformers (5.17 on the lent GPU machine) do not check which distribution owns ``flash_attn``.
    owners = {d.lower().replace("_", "-") for d in importlib.metadata.packages_distributions().get("flash_attn", [])}
    if "flash-attn" not in owners:
        return False, f"flash_attn comes from {', '.join(sorted(owners)) or 'no distribution'}, not flash-attn"
    return True, f"flash-attn {importlib.metadata.version('flash-attn')}"


def _torch_varlen() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


_VARLEN_POSITIONAL = ("query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k")


def varlen_signature_problem(parameters: Mapping[str, inspect.Parameter]) -> str | None:
    """What keeps ``varlen_attn`` with these parameters from running causal rows, or None. Its signature moved between
    releases (torch 2.13 takes ``window_size=(-1, 0)`` for causal; an ``is_causal`` flag is accepted too)."""
    names = list(parameters)
    if names[: len(_VARLEN_POSITIONAL)] != list(_VARLEN_POSITIONAL):
        return f"varlen_attn takes ({', '.join(names)}), not (query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, ...)"
    if "window_size" not in parameters and "is_causal" not in parameters:
        return "varlen_attn has neither window_size nor is_causal: no causal attention"
    return None


def varlen_call_kwargs(
    parameters: Mapping[str, inspect.Parameter], scale: float, sliding_window: int | None, gqa: bool
) -> dict | None:
    """The keywords of a causal ``varlen_attn`` call for this signature, or None if it cannot do what is asked (a
    sliding window without ``window_size``). Flash's window ``(left, right)`` lets query i see keys [i − left, i +
    right]; transformers' sliding window W lets it see the W keys (i − W, i] (``masking_utils.sliding_window_overlay``):
    left = W − 1, right = 0."""
    kwargs = {}
    if "window_size" in parameters:
        kwargs["window_size"] = (sliding_window - 1 if sliding_window else -1, 0)
    elif sliding_window:
        return None
    else:
        kwargs["is_causal"] = True
    if "scale" in parameters:
        kwargs["scale"] = scale
    if gqa and "enable_gqa" in parameters:
        kwargs["enable_gqa"] = True
    return kwargs


def varlen_attn_usable(device: torch.device | str) -> tuple[bool, str]:
    """(usable, why): PyTorch's ``varlen_attn`` exists in this torch, has a signature we can call, and the device is
    CUDA (it has no CPU kernel)."""
    fn = _torch_varlen()
    if fn is None:
        return False, f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    problem = varlen_signature_problem(inspect.signature(fn).parameters)
    if problem:
        return False, f"torch {torch.__version__}: {problem}"
    if torch.device(device).type != "cuda":
        return False, f"varlen_attn runs on CUDA only, the device is {torch.device(device).type}"
    return True, f"torch {torch.__version__}'s varlen_attn"


def resolve_attention(requested: str | None, packed: bool, device: torch.device | str) -> tuple[str, str]:
    """(backend, why) for ``model.attn_implementation=requested`` (None = ``auto``), rows packed or padded, on this
    device. An explicit backend that cannot run raises ``ConfigError`` naming the key, the reason and what can."""
    requested = requested or "auto"
    if requested not in BACKENDS:
        raise ConfigError(f"{KEY}={requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "auto":
        if not packed:
            return "sdpa", "padded rows"
        for name, usable in (("flash_attention_2", flash_attn_2_usable), ("varlen_attn", varlen_attn_usable)):
            ok, why = usable(device) if name == "varlen_attn" else usable()
            if ok:
                return name, f"packed rows: {why}"
        return "sdpa", "packed rows, one sdpa call per row: no flash-attn 2, no CUDA varlen_attn"
    checks = {"flash_attention_2": flash_attn_2_usable, "varlen_attn": lambda: varlen_attn_usable(device)}
    if requested in checks:
        ok, why = checks[requested]()
        if not ok:
            others = ", ".join(b for b in BACKENDS if b != requested and (b not in checks or checks[b]()[0]))
            raise ConfigError(f"{KEY}={requested} is not usable here: {why}; use one of {others}")
        return requested, why
    return requested, "as requested"


def load_implementation(backend: str) -> str:
    """What ``from_pretrained(attn_implementation=...)`` gets for a backend (padded rows under varlen_attn: sdpa)."""
    return "sdpa" if backend == "varlen_attn" else backend


def install(model, backend: str) -> None:
    """Give a loaded model the implementation under which packed rows survive gradient checkpointing (the twin of
    its implementation, same values on padded rows); nothing for ``flash_attention_2``."""
    if backend in TWINS:
        model.config._attn_implementation = TWINS[backend]


# ----------------------------------------------------------------------------------------- packed attention
def cu_seqlens(lengths: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Cumulative row boundaries ``[0, l0, l0 + l1, ...]`` (int32), as FlashAttention's varlen kernels take them."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(list(lengths), dtype=torch.int32).cumsum(0)
    return out.to(device)


def segment_mask(length: int, n_prefix: int, sliding_window: int | None, device) -> torch.Tensor | None:
    """Which keys each query of a segment sees, ``(length, n_prefix + length)`` bool, None for plain causal. The keys
    are a shared prompt's ``n_prefix`` then the segment's own: query i sits at n_prefix + i, key j at j; it sees j ≤
    n_prefix + i, and with a sliding window W only j > n_prefix + i − W (``masking_utils.sliding_window_overlay``)."""
    if not n_prefix and not sliding_window:
        return None
    q = torch.arange(length, device=device)[:, None] + n_prefix
    k = torch.arange(n_prefix + length, device=device)[None, :]
    mask = k <= q
    if sliding_window:
        mask &= k > q - sliding_window
    return mask


def _model_eager(module) -> Callable:
    """The eager attention of the model file that defines ``module`` (it knows the model's soft-capping and sinks);
    the MRO is walked because FSDP2 subclasses the modules it shards."""
    for cls in type(module).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
    raise ConfigError(
        f"{type(module).__name__}'s model file has no eager_attention_forward, which eager attention and packed rows "
        "with soft-capping or sinks run: use model.attn_implementation=sdpa, or model.packed=false"
    )


def _segment_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    segments=(),
    sliding_window=None,
    softcap=None,
    s_aux=None,
    **kwargs,
):
    """``query`` (1, H, N, D), ``key``/``value`` (1, Hkv, N, D); ``segments``: (length, prefix) tiling [0, N) in
    order, ``prefix`` the index of an earlier segment (a shared prompt) or -1. A segment's queries see its own
    earlier keys and, with a prefix, every key of it, within the layer's sliding window if it has one. Soft-capped
    or sink attention runs through the model's own eager function with the segment's mask, the rest through
    scaled-dot-product attention, one call per segment (no query pays for keys it may not see: Σ n² instead of N²).
    Split, not sliced: a slice's backward writes a zero tensor of the whole sequence per segment, a split's is one
    concatenation."""
    import torch.nn.functional as F

    sizes = [length for length, _ in segments]
    queries, keys, values = (t.split(sizes, dim=2) for t in (query, key, value))
    p = dropout if module.training else 0.0
    outs = []
    for s, (length, prefix) in enumerate(segments):
        k, v, n_prefix = keys[s], values[s], 0
        if prefix >= 0:  # a response after its shared prompt: every prompt key, then causal
            k, v, n_prefix = torch.cat([keys[prefix], k], dim=2), torch.cat([values[prefix], v], dim=2), sizes[prefix]
        mask = segment_mask(length, n_prefix, sliding_window, query.device)
        if softcap is None and s_aux is None:
            out = F.scaled_dot_product_attention(
                queries[s], k, v, attn_mask=mask, is_causal=mask is None, scale=scaling, dropout_p=p,
                enable_gqa=k.shape[1] != query.shape[1],
            )  # fmt: skip
            outs.append(out.transpose(1, 2))  # (1, n, H, D)
            continue
        if mask is None:  # plain causal: eager needs it written out
            mask = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
        additive = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
        additive = additive.masked_fill(~mask, torch.finfo(query.dtype).min)[None, None]  # eager adds its mask
        extra = {"softcap": softcap} if softcap is not None else {}
        if s_aux is not None:
            extra["s_aux"] = s_aux
        out, _ = _model_eager(module)(
            module, queries[s], k, v, additive, dropout=p, scaling=scaling, sliding_window=sliding_window,
            **extra, **kwargs,
        )  # fmt: skip
        outs.append(out)  # eager returns (1, n, H, D) already
    return torch.cat(outs, dim=1).contiguous(), None  # (1, N, H, D), as transformers' sdpa returns


_varlen_warned = False


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, segments=(), **kwargs):
    """Packed rows through torch's ``varlen_attn``: ``query`` (1, H, N, D) -> (N, H, D), row boundaries from
    ``cu_seqlens``, causal. Whatever its kernel cannot do exactly (CPU or float32 tensors, dropout, soft-capping,
    sinks, shared prompts) goes through ``_segment_attention`` instead."""
    global _varlen_warned
    fn = _torch_varlen()
    params = inspect.signature(fn).parameters if fn is not None else {}
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    gqa = key.shape[1] != query.shape[1]
    call = varlen_call_kwargs(params, scale, kwargs.get("sliding_window"), gqa) if fn is not None else None
    exact = (
        call is not None
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and not (dropout and module.training)
        and kwargs.get("softcap") is None
        and kwargs.get("s_aux") is None
        and all(prefix < 0 for _, prefix in segments)
    )
    if not exact:
        if not _varlen_warned:
            _varlen_warned = True
            warnings.warn(
                f"varlen_attn cannot run this call exactly ({query.device.type}, {query.dtype}, window/softcap/sinks/"
                "shared prompt/dropout): packed rows fall back to one attention call per row",
                stacklevel=2,
            )
        return _segment_attention(module, query, key, value, attention_mask, scaling, dropout, segments, **kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, H, D)
    if gqa and "enable_gqa" not in params:  # older signature: repeat the key/value heads
        k, v = (t.repeat_interleave(query.shape[1] // key.shape[1], dim=1) for t in (k, v))
    if "scale" not in params:  # older signature: the kernel scales by D^-1/2
        q = q * (scale * query.shape[-1] ** 0.5)
    lengths = [length for length, _ in segments]
    cu, longest = cu_seqlens(lengths, query.device), max(lengths)
    out = fn(q, k, v, cu, cu, longest, longest, **call)
    return out[None], None  # (1, N, H, D)


def _twin(base: str) -> Callable:
    """The implementation a policy keeps: ``base`` for padded rows, the per-row attention when given segments."""

    def attention(module, query, key, value, attention_mask, *args, segments=None, **kwargs):
        if segments is not None:
            packed = _varlen_attention if base == "varlen_attn" else _segment_attention
            return packed(module, query, key, value, attention_mask, *args, segments=segments, **kwargs)
        if base == "eager":
            return _model_eager(module)(module, query, key, value, attention_mask, *args, **kwargs)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__name__ = f"{TWINS[base]}_attention"
    return attention


def packed_forward_name(model) -> str:
    """The implementation a packed forward runs under (no mask built), after ``install`` made the model's own the
    right twin (a model loaded as plain sdpa/eager is given its twin here: same values on padded rows)."""
    impl = model.config._attn_implementation
    for backend, twin in TWINS.items():
        if impl == backend:
            model.config._attn_implementation = impl = twin
    return VARLEN_ATTENTION if impl == TWINS["varlen_attn"] else SEGMENT_ATTENTION


@contextmanager
def attention(model, name: str):
    """The model's attention implementation set to ``name`` for the duration (the config is read at each forward)."""
    before = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = before


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    for base, twin in TWINS.items():
        AttentionInterface.register(twin, _twin(base))
        AttentionMaskInterface.register(twin, eager_mask if base == "eager" else sdpa_mask)
    AttentionInterface.register(SEGMENT_ATTENTION, _twin("sdpa"))
    AttentionInterface.register(VARLEN_ATTENTION, _twin("varlen_attn"))


_register()
