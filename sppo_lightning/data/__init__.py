from sppo_lightning.data.prompts import DataError, PromptFiles, PromptRecord, PromptSource, read_prompts

__all__ = ["DataError", "PromptFiles", "PromptRecord", "PromptSource", "read_prompts"]
