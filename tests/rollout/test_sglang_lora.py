"""LoRA runs through the SGLang engines' stand-ins: the engines get the merged weights under the base model's names
(``lora.merged_tensors``), never PEFT's names, which SGLang's loaders would drop without a word."""

import lightning as L
import pytest
import torch

from sppo_lightning import lora
from sppo_lightning.module import SPPOModule
from sppo_lightning.rollout.base import SamplingParams
from sppo_lightning.rollout.sglang import SGLangEngine, SGLangServerEngine
from tests.rollout.test_sglang import StandInServer, fit, greedy, names


def lora_module(model_dir, **kwargs) -> SPPOModule:
    """The toy policy with rank-4 adapters whose B is not 0 (PEFT starts it at 0: a merge would change nothing)."""
    module = SPPOModule(str(model_dir), lora=lora.LoRA(r=4), **kwargs)
    module.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if ".lora_B." in name:
                p.add_(torch.randn_like(p) * 0.1)
    return module


def merged(module) -> dict[str, torch.Tensor]:
    state = {k: v.detach() for k, v in module.policy.state_dict().items()}
    return lora.merged_state_dict(module.policy, state)


def test_the_colocated_engine_gets_the_merged_weights_under_the_base_names(standin, toy_model_dir):
    module = lora_module(toy_model_dir)
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    prompts = [module.tokenizer.encode(f"{a}+{b}=") for a, b in [(12, 34), (5, 77), (40, 41), (9, 9)]]
    engine = SGLangEngine(dtype="float32")
    samples = engine.generate(module.policy_handle(), prompts, SamplingParams(temperature=0.0, max_new_tokens=8), 0)
    (sgl,) = standin.instances
    expected = merged(module)
    assert sgl.skipped == set() and sgl.loaded.keys() == sgl.params.keys()  # every weight, once (the head is tied)
    for name, tensor in sgl.loaded.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    assert samples.response_ids == greedy(module, prompts)  # the engine samples the adapter policy
    assert all(torch.equal(v, before[k]) for k, v in module.policy.state_dict().items())  # the policy is unmerged


def test_a_lora_run_leaves_the_trained_merged_policy_in_the_engine_and_the_server(standin, toy_model_dir, tmp_path,
                                                                                 release):  # fmt: skip
    # adapters whose B is not 0, so the merged weights differ from the base's whether or not this short run's
    # rollout (8-token answers, often all tied) gives the step a gradient
    L.seed_everything(0)
    module = lora_module(toy_model_dir, learning_rate=1e-2)
    trainer = fit(module, SGLangEngine(bucket_mb=1), epochs=1)
    (sgl,) = standin.instances
    assert names(sgl).count("end_weight_update") == 3  # first validation, rollout, validation after the step
    assert trainer.global_step > 0
    trained = merged(module)
    assert sgl.skipped == set() and sgl.loaded.keys() == sgl.params.keys()
    for name, tensor in sgl.loaded.items():  # the trained merged weights, in SGLang's bf16
        torch.testing.assert_close(tensor, trained[name].to(torch.bfloat16), rtol=0, atol=0, msg=name)

    server = StandInServer(toy_model_dir, release)
    try:
        L.seed_everything(0)
        module = lora_module(toy_model_dir, learning_rate=1e-2)
        fit(module, SGLangServerEngine(url=server.url, weights_dir=str(tmp_path / "w"), batch_size=4), epochs=1)
    finally:
        server.close()
    assert "/update_weights_from_disk" in [p for p, _ in server.requests]
    trained = merged(module)
    for name, p in server.engine.params.items():  # the folder the server loaded is the merged policy
        torch.testing.assert_close(p, trained[name], msg=name)


@pytest.mark.slow
def test_the_lora_demo_learns_through_the_colocated_engine(standin, tmp_path):
    """``--model.lora.r=16`` with SGLang rollouts and validation (the stand-in sampling with the merged weights it
    was pushed, in bf16): +10 points in 10 iterations (the HF engine: 31.5 % -> 45.8 % in 10)."""
    from sppo_lightning.cli import main
    from tests.test_cli import DEMO, val_accuracies

    main([
        "fit", "--config", DEMO, "--model.lora.r=16", "--data.engine=sppo_lightning.rollout.sglang.SGLangEngine",
        "--data.engine.init_args.mem_fraction_static=0.3", "--trainer.max_epochs=10",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    acc = val_accuracies(tmp_path)
    assert len(acc) == 11 and acc[-1] - acc[0] >= 0.10, acc
    (sgl,) = standin.instances
    assert sgl.skipped == set() and names(sgl).count("end_weight_update") == 21
