"""Leave the final policy as a Hugging Face folder under the run's ``default_root_dir`` at the end of fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from sppo_lightning.export import save_hf_folder


class HFExport(L.Callback):
    def __init__(self, dirname: str = "hf_model"):
        """
        Args:
            dirname: Folder under ``trainer.default_root_dir`` that receives config, safetensors and tokenizer.
        """
        self.dirname = dirname

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:  # stopped by SIGTERM/Ctrl-C: last.ckpt holds the state, nothing half-trained here
            return
        policy = pl_module.policy_handle()  # what the policy is and where it came from, not the module's settings
        state_dict = policy.full_state_dict()  # a collective under FSDP: every rank takes part
        if trainer.is_global_zero:
            out = save_hf_folder(
                policy.name_or_path,
                state_dict,
                policy.tokenizer,
                Path(trainer.default_root_dir) / self.dirname,
                trust_remote_code=policy.trust_remote_code,
            )
            print(f"Exported the policy to {out}")
        trainer.strategy.barrier("hf_export")
