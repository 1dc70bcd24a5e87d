"""Leave the final policy as a Hugging Face folder under the run's ``default_root_dir`` at the end of fit; for a LoRA
run (``model.lora``) the merged model there and the PEFT adapter beside it."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from sppo_lightning.export import save_hf_folder
from sppo_lightning.lora import save_adapter


class HFExport(L.Callback):
    def __init__(self, dirname: str = "hf_model", adapter_dirname: str = "hf_adapter"):
        """
        Args:
            dirname: Folder under ``trainer.default_root_dir`` that receives config, safetensors and tokenizer (for a
                LoRA run: the merged model).
            adapter_dirname: For a LoRA run, the folder under ``trainer.default_root_dir`` that receives the PEFT
                adapter (``PeftModel.from_pretrained(base, folder)``).
        """
        self.dirname = dirname
        self.adapter_dirname = adapter_dirname

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:  # stopped by SIGTERM/Ctrl-C: last.ckpt holds the state, nothing half-trained here
            return
        policy = pl_module.policy_handle()  # what the policy is and where it came from, not the module's settings
        state_dict, adapter = pl_module.export_state_dicts()  # a collective under FSDP: every rank takes part
        if trainer.is_global_zero:
            out = save_hf_folder(
                policy.name_or_path,
                state_dict,
                policy.tokenizer,
                Path(trainer.default_root_dir) / self.dirname,
                trust_remote_code=policy.trust_remote_code,
            )
            print(f"Exported the policy to {out}")
            if adapter is not None:
                root = Path(trainer.default_root_dir)
                out = save_adapter(policy.policy, adapter, policy.name_or_path, root / self.adapter_dirname)
                print(f"Exported the LoRA adapter to {out}")
        trainer.strategy.barrier("hf_export")
