"""The Hugging Face export: what the demo leaves loads with from_pretrained and computes the trained logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sppo_lightning.export import export_checkpoint
from sppo_lightning.module import SPPOModule
from tests import forked
from tests.test_cli import DEMO, REPO, SHORT, run


def trained_module(ckpt) -> SPPOModule:
    module = SPPOModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    return module.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
def test_demo_exports_a_folder_with_the_trained_logits(tmp_path):
    run("fit", "--config", DEMO, f"--trainer.default_root_dir={tmp_path}", *SHORT)
    folder = tmp_path / "hf_model"
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.architectures == ["Qwen2ForCausalLM"]
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 12+30?"}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])

    module = trained_module(tmp_path / "checkpoints" / "last.ckpt")
    torch.testing.assert_close(logits(model, ids), logits(module.policy, ids), rtol=0, atol=0)
    base = AutoModelForCausalLM.from_pretrained(REPO / "sppo_lightning/toy/model").eval()
    assert not torch.equal(logits(base, ids), logits(model, ids))  # it is the trained policy, not the start
    answer = tok.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :])
    assert answer  # generates

    # The command exports any checkpoint the same way.
    again = export_checkpoint(tmp_path / "checkpoints" / "last.ckpt", tmp_path / "again")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(again).eval(), ids), logits(model, ids))


def test_export_command_reports_a_missing_checkpoint(tmp_path):
    proc = forked.run(["-m", "sppo_lightning.export", str(tmp_path / "nope.ckpt"), str(tmp_path / "out")])
    assert proc.returncode == 2
    assert "checkpoint not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
