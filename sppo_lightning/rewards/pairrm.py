"""PairRM (``llm-blender/PairRM``), the judge of the SPPO paper, written here: no ``llm-blender`` import.

The architecture is LLM-Blender's pairwise ranker (``CrossCompareReranker``, Jiang et al., 2023): a DeBERTa-v3
encoder reads one sequence

    [CLS] <|source|> prompt [SEP] [CLS] <|candidate1|> response A [SEP] [CLS] <|candidate2|> response B [SEP]

and a head ``Linear(2h → h) → tanh → Linear(h → 1)`` scores the concatenated encodings of the source marker with
each candidate marker; the pair's logit is L(A, B) = head(src, cand1) − head(src, cand2). Each part is truncated
on its own: the prompt to ``source_max_length`` tokens (1,224 for PairRM), each response to
``candidate_max_length`` (412) plus half of what the prompt left unused. Texts lose any literal [SEP] (it becomes a
space), as in LLM-Blender's collator.

Both orders are always asked and combined as LLM-Blender does: P(A ≻ B) = σ(L(A, B) − L(B, A)), which is what
``Blender.compare`` thresholds at 0 and what the SPPO authors' pipeline gives for K = 2. For K responses the
authors (``scripts/rank.py`` + ``compute_prob.py`` of uclaml/SPPO) first score each response by its mean margin
over all K, s_i = mean_j (L(i, j) − L(j, i)) (``Blender.rank(return_scores=True)``), then take P(i ≻ j) =
σ(s_i − s_j); ``from_scores: true`` reproduces that, the default keeps each pair's own comparison (so
intransitive judgements survive).

Weights load only as tensors: ``model.safetensors``, or ``pytorch_model.bin`` through
``torch.load(weights_only=True)`` (the file LLM-Blender's loader looks for first); never by unpickling arbitrary
objects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from sppo_lightning.errors import ConfigError
from sppo_lightning.records import Rollout
from sppo_lightning.rewards.pairwise import PairwiseOracle, prompt_text

SOURCE, CANDIDATE1, CANDIDATE2, CANDIDATE = "<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>"
MARKERS = (SOURCE, CANDIDATE1, CANDIDATE2, CANDIDATE)  # the order LLM-Blender adds them to the tokenizer
DEFAULT_BACKBONE = "microsoft/deberta-v3-large"
SOURCE_MAX_LENGTH, CANDIDATE_MAX_LENGTH = 1224, 412  # PairRM's model card; config.json's values win when present
EMBEDDINGS = "pretrained_model.embeddings.word_embeddings.weight"


class PairRM(nn.Module):
    """DeBERTa-v2/v3 encoder + the pairwise head; parameter names match PairRM's checkpoint."""

    def __init__(self, encoder_config, n_tasks: int = 1, dropout: float = 0.05):
        super().__init__()
        from transformers import DebertaV2Model

        self.pretrained_model = DebertaV2Model(encoder_config)
        h = encoder_config.hidden_size
        self.head_layer = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(2 * h, h), nn.Tanh(), nn.Dropout(dropout), nn.Linear(h, n_tasks)
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, marker_ids: tuple[int, int, int]):
        """``[B]`` logits L(cand1, cand2) for right-padded rows holding each marker once."""
        hidden = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        src, c1, c2 = (hidden[input_ids == m] for m in marker_ids)  # (B, h) each: one marker per row
        if not src.shape[0] == c1.shape[0] == c2.shape[0] == input_ids.shape[0]:
            raise ValueError("every PairRM row needs exactly one source and one of each candidate marker")
        left = self.head_layer(torch.cat([src, c1], dim=-1))  # (B, n_tasks)
        right = self.head_layer(torch.cat([src, c2], dim=-1))
        return (left - right).mean(dim=-1)


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, or a ``.bin`` read with ``weights_only=True``."""
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        try:
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # pickle refused: something other than tensors is inside
            raise ConfigError(f"{folder / 'pytorch_model.bin'}: not a plain tensor state dict ({e})") from None
    raise ConfigError(f"{folder}: no model.safetensors or pytorch_model.bin (data.oracle.init_args.model_name_or_path)")


def resolve_folder(name_or_path: str) -> Path:
    """A local folder as is; a hub id is downloaded (config, weights, tokenizer files only)."""
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "pytorch_model.bin", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - the hub client raises many types (offline, unknown repo, bad id)
        raise ConfigError(
            f"data.oracle.init_args.model_name_or_path={name_or_path!r}: neither a folder nor a hub repo that could "
            f"be downloaded ({type(e).__name__})"
        ) from None


class PairRMTokens:
    """Turns (prompt, response A, response B) into PairRM's id sequence, truncating each part on its own."""

    def __init__(self, tokenizer, source_max_length: int, candidate_max_length: int):
        self.tokenizer = tokenizer
        self.sep = tokenizer.sep_token if tokenizer.sep_token is not None else tokenizer.eos_token
        self.sep_id = tokenizer.convert_tokens_to_ids(self.sep)
        missing = [m for m in MARKERS if m not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing)
        self.source_id, self.cand1_id, self.cand2_id, self.cand_id = tokenizer.convert_tokens_to_ids(list(MARKERS))
        self.source_max_length, self.candidate_max_length = source_max_length, candidate_max_length

    def _ids(self, text: str, max_length: int) -> list[int]:
        ids = self.tokenizer(text.replace(self.sep, " "), max_length=max_length, truncation=True)["input_ids"]
        if self.sep_id not in ids:
            raise ConfigError(f"the PairRM tokenizer must end each text with its separator {self.sep!r} (as DeBERTa)")
        last = len(ids) - 1 - ids[::-1].index(self.sep_id)
        return ids[: last + 1]

    @staticmethod
    def _clean(text: str) -> str:
        """A marker written inside a text would be read as a second marker (LLM-Blender fails on it): a space."""
        for m in MARKERS:
            text = text.replace(m, " ")
        return text

    def source(self, prompt: str) -> list[int]:
        return self._ids(SOURCE + self._clean(prompt), self.source_max_length)

    def candidate(self, response: str, source_len: int, marker: int) -> list[int]:
        budget = self.candidate_max_length + (self.source_max_length - source_len) // 2  # what the prompt left
        return [marker if t == self.cand_id else t for t in self._ids(CANDIDATE + self._clean(response), budget)]

    def pair(self, prompt: str, first: str, second: str) -> list[int]:
        src = self.source(prompt)
        return src + self.candidate(first, len(src), self.cand1_id) + self.candidate(second, len(src), self.cand2_id)


class PairRMOracle(PairwiseOracle):
    """``llm-blender/PairRM`` (or any checkpoint of its architecture) as the pairwise judge.

    Example (YAML)::

        data:
          oracle:
            class_path: sppo_lightning.rewards.PairRMOracle
            init_args: {model_name_or_path: llm-blender/PairRM, from_scores: true}
    """

    def __init__(
        self,
        model_name_or_path: str = "llm-blender/PairRM",
        backbone: str | None = None,
        source_max_length: int | None = None,
        candidate_max_length: int | None = None,
        from_scores: bool = False,
        batch_size: int = 16,
        dtype: str | None = None,
        offload: bool = True,
        include_self: bool = True,
    ):
        """
        Args:
            model_name_or_path: A folder or hub id holding PairRM's ``config.json`` (LLM-Blender's ranker
                settings) and weights (``model.safetensors`` or ``pytorch_model.bin``).
            backbone: Where the DeBERTa config (and the tokenizer, when the folder has none) come from; None = the
                ``model_name`` in ``config.json`` (``microsoft/deberta-v3-large`` for PairRM).
            source_max_length: Prompt tokens kept; None = ``config.json``'s ``source_maxlength`` (1,224).
            candidate_max_length: Response tokens kept, plus half of what the prompt leaves; None = 412.
            from_scores: The SPPO authors' pipeline: P(i ≻ j) = σ(s_i − s_j) from each response's mean margin
                over the whole group; False = each pair's own σ(L(i, j) − L(j, i)).
            batch_size: Ordered pairs per forward pass.
            dtype: Judge weights' dtype; None = LLM-Blender's choice, float16 on CUDA and float32 elsewhere.
            offload: Keep the judge in CPU memory between scorings.
            include_self: Count each response against itself (½) in its win-rate, as the SPPO authors do.
        """
        super().__init__(batch_size=batch_size, include_self=include_self)
        self.model_name_or_path, self.backbone = model_name_or_path, backbone
        self.source_max_length, self.candidate_max_length = source_max_length, candidate_max_length
        self.from_scores, self.dtype, self.offload = from_scores, dtype, offload
        self.model: PairRM | None = None
        self.tokens: PairRMTokens | None = None

    # ------------------------------------------------------------------------------------------------ loading
    def load(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoConfig, AutoTokenizer

        folder = resolve_folder(self.model_name_or_path)
        settings = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        backbone = self.backbone or settings.get("model_name") or DEFAULT_BACKBONE
        encoder_config = AutoConfig.from_pretrained(backbone)
        if encoder_config.model_type != "deberta-v2":
            raise ConfigError(f"PairRM's encoder is DeBERTa-v2/v3; {backbone} is {encoder_config.model_type}")
        has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "spm.model"))
        tokenizer = AutoTokenizer.from_pretrained(folder if has_tokenizer else backbone)
        self.tokens = PairRMTokens(
            tokenizer,
            self.source_max_length or settings.get("source_maxlength") or SOURCE_MAX_LENGTH,
            self.candidate_max_length or settings.get("candidate_maxlength") or CANDIDATE_MAX_LENGTH,
        )
        state = load_state_dict(folder)
        if EMBEDDINGS not in state:
            raise ConfigError(f"{folder}: no {EMBEDDINGS}; not a PairRM (CrossCompareReranker) checkpoint")
        encoder_config.vocab_size = state[EMBEDDINGS].shape[0]  # the backbone's vocabulary + the 4 markers
        if len(tokenizer) > encoder_config.vocab_size:
            raise ConfigError(
                f"{folder}: the tokenizer has {len(tokenizer)} tokens, the weights only {encoder_config.vocab_size}"
            )
        model = PairRM(encoder_config, settings.get("n_tasks", 1), settings.get("drop_out", 0.05))
        result = model.load_state_dict(state, strict=False)
        unexpected = [k for k in result.unexpected_keys if not k.endswith("position_ids")]  # old buffers
        if result.missing_keys or unexpected:
            raise ConfigError(
                f"{folder}: weights do not fit PairRM (missing {result.missing_keys}, unexpected {unexpected})"
            )
        self.model = model.eval()

    # ------------------------------------------------------------------------------------------------ judging
    @torch.no_grad()
    def logits(
        self, prompts: list[str], first: list[str], second: list[str], device: torch.device | None = None
    ) -> torch.Tensor:
        """``[N]`` float32 L(first, second) on CPU, one order only (PairRM's position-dependent logit)."""
        self.load()
        device = torch.device(device or "cpu")
        dtype = (
            getattr(torch, self.dtype) if self.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
        )
        self.model.to(device=device, dtype=dtype)
        rows = [self.tokens.pair(p, a, b) for p, a, b in zip(prompts, first, second, strict=True)]
        markers = (self.tokens.source_id, self.tokens.cand1_id, self.tokens.cand2_id)
        pad = self.tokens.tokenizer.pad_token_id or 0
        order = sorted(range(len(rows)), key=lambda n: len(rows[n]))  # batches of similar length: little padding
        out = torch.zeros(len(rows))
        try:
            for start in range(0, len(rows), self.batch_size):
                idx = order[start : start + self.batch_size]
                chunk = [rows[n] for n in idx]
                width = max(map(len, chunk))
                ids = torch.tensor([r + [pad] * (width - len(r)) for r in chunk], device=device)  # (B, T) right-padded
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=device)
                out[idx] = self.model(ids, mask, markers).float().cpu()
        finally:
            if self.offload:
                self.model.to("cpu")
        return out

    def prefer(self, prompts, first, second, device):
        """σ(L(A, B) − L(B, A)): both orders, in one batch."""
        both = self.logits(prompts + prompts, first + second, second + first, device)
        n = len(prompts)
        return torch.sigmoid(both[:n] - both[n:])

    def margins(self, rollout: Rollout, device: torch.device | None = None) -> torch.Tensor:
        """``[P, K, K]`` L(y_i, y_j) − L(y_j, y_i), each ordered pair run once; 0 on the diagonal."""
        k = rollout.group_size
        pairs = [(p, i, j) for p in range(rollout.num_prompts) for i in range(k) for j in range(k) if i != j]
        texts = [prompt_text(r.messages) for r in rollout.prompts]
        got = self.logits(
            [texts[p] for p, _, _ in pairs],
            [rollout.response_text[p][i] for p, i, _ in pairs],
            [rollout.response_text[p][j] for p, _, j in pairs],
            device,
        )
        logits = torch.zeros(rollout.num_prompts, k, k)
        for (p, i, j), value in zip(pairs, got.tolist(), strict=True):
            logits[p, i, j] = value
        return logits - logits.transpose(1, 2)

    def preference_matrix(self, rollout: Rollout, device: torch.device | None = None) -> torch.Tensor:
        margins = self.margins(rollout, device)
        if self.from_scores:  # the authors' pipeline: s_i = mean_j margin(i, j), then Bradley-Terry on s
            scores = margins.mean(dim=-1)
            return torch.sigmoid(scores[:, :, None] - scores[:, None, :])
        return torch.sigmoid(margins)
