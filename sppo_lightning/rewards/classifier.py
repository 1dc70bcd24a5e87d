"""A Hugging Face sequence classifier used as a judge: loaded once, batched, and off the accelerator when idle.

Shared by the scalar reward model and the pairwise classifier: both turn texts into one logit each.
"""

from __future__ import annotations

import torch

from sppo_lightning.errors import refusing_remote_code


class SequenceClassifier:
    def __init__(
        self,
        model_name_or_path: str,
        batch_size: int = 16,
        max_length: int = 2048,
        dtype: str = "bfloat16",
        offload: bool = True,
        trust_remote_code: bool = False,
    ):
        self.model_name_or_path = model_name_or_path
        self.batch_size, self.max_length, self.dtype = batch_size, max_length, dtype
        self.offload, self.trust_remote_code = offload, trust_remote_code
        self.model = None
        self.tokenizer = None

    def load(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        with refusing_remote_code(self.model_name_or_path, "data.oracle.init_args.trust_remote_code"):
            tok = AutoTokenizer.from_pretrained(self.model_name_or_path, trust_remote_code=self.trust_remote_code)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
        tok.truncation_side = "left"  # an overlong input loses the start of the prompt, never the response's end
        with refusing_remote_code(self.model_name_or_path, "data.oracle.init_args.trust_remote_code"):
            model = AutoModelForSequenceClassification.from_pretrained(
                self.model_name_or_path,
                dtype=getattr(torch, self.dtype),
                trust_remote_code=self.trust_remote_code,
                use_safetensors=True,
            )
        model.config.pad_token_id = tok.pad_token_id  # the classifier reads the last non-pad token
        self.model, self.tokenizer = model.eval(), tok

    @torch.no_grad()
    def logits(self, texts: list[str], device: torch.device | None = None) -> torch.Tensor:
        """The first logit of each text, ``[N]`` float32 on CPU; the model visits ``device`` only for this call."""
        self.load()
        device = torch.device(device or "cpu")
        self.model.to(device)
        out = []
        try:
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    add_special_tokens=False,
                    return_tensors="pt",
                ).to(device)
                out.append(self.model(**enc).logits[:, 0].float().cpu())
        finally:
            if self.offload:
                self.model.to("cpu")  # give the accelerator back to training
        return torch.cat(out) if out else torch.zeros(0)
