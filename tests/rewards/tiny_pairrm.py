"""A tiny PairRM-architecture folder with random weights, built offline for tests.

Laid out like the hub's ``llm-blender/PairRM``: ``config.json`` holds LLM-Blender's ranker settings and names the
backbone, whose DeBERTa-v2 config sits in a sibling folder (``microsoft/deberta-v3-large`` for the real one). The
tokenizer is the toy model's byte-level one with DeBERTa's framing, ``[CLS] text [SEP]``, and without the four
markers, which the loader adds (as LLM-Blender's collator does to DeBERTa's tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SOURCE_MAX_LENGTH, CANDIDATE_MAX_LENGTH = 24, 12  # small, so that truncation happens in the tests


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    vocab = {tok: i for i, tok in enumerate([*specials, *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]",
        model_max_length=512, clean_up_tokenization_spaces=False,
    )  # fmt: skip


def encoder_config(vocab_size: int):
    from transformers import DebertaV2Config

    # DeBERTa-v3's attention (relative positions in buckets, shared keys, p2c + c2p), at toy size
    return DebertaV2Config(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=512, relative_attention=True, position_buckets=16, max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
        type_vocab_size=0, pad_token_id=0, initializer_range=0.2,  # wider than DeBERTa's 0.02: a less flat judge
    )  # fmt: skip


def build_tiny_pairrm(out: Path, seed: int = 0, safetensors: bool = True) -> Path:
    """Writes ``out/backbone`` and ``out/pairrm``; returns the latter (what ``PairRMOracle`` is given)."""
    from sppo_lightning.rewards.pairrm import MARKERS, PairRM

    tok = build_tokenizer()
    backbone, pairrm = out / "backbone", out / "pairrm"
    backbone.mkdir(parents=True, exist_ok=True)
    pairrm.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(pairrm)
    config = encoder_config(len(tok) + len(MARKERS))
    config.save_pretrained(backbone)
    settings = {
        "ranker_type": "pairranker", "model_type": "deberta", "model_name": str(backbone),
        "source_maxlength": SOURCE_MAX_LENGTH, "candidate_maxlength": CANDIDATE_MAX_LENGTH,
        "n_tasks": 1, "drop_out": 0.05,
    }  # fmt: skip
    (pairrm / "config.json").write_text(json.dumps(settings, indent=2))
    torch.manual_seed(seed)
    model = PairRM(config)
    with torch.no_grad():  # DeBERTa's init draws small weights; larger ones make the random judge less flat
        for p in model.head_layer.parameters():
            p.normal_(0.0, 0.5)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, pairrm / "model.safetensors")
    else:
        torch.save(state, pairrm / "pytorch_model.bin")
    return pairrm
