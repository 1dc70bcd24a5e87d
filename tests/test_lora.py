"""LoRA through PEFT (``model.lora``): the settings from the CLI, the merged weights, the step's parameters, the
checkpoint's contents, export, resume and the refusals, end to end on the demo."""

import json

import pytest
import torch

from sppo_lightning import lora
from sppo_lightning.checkpoints import check_lora
from sppo_lightning.errors import ConfigError
from sppo_lightning.module import SPPOModule
from tests import forked
from tests.test_cli import DEMO, REPO, SHORT, read_metrics, run, val_accuracies


def peft_toy(toy_model_dir, **settings):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float32)
    model = lora.apply_lora(model, lora.LoRA(**settings), torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():  # PEFT starts B at 0 (a no-op adapter): give it values so the merge has something to do
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.slow
def test_dotted_override_turns_lora_on_with_the_other_fields_defaulted():
    """``--model.lora.r=16`` on the demo, whose model.lora is null (the default): jsonargparse builds the dataclass."""
    import inspect

    assert inspect.signature(SPPOModule).parameters["lora"].default is None
    proc = run("fit", "--config", DEMO, "--model.lora.r=16", "--print_config")
    assert "lora:\n    r: 16\n    alpha: 32" in proc.stdout and "target_modules: all-linear" in proc.stdout


@pytest.mark.parametrize(
    "settings",
    [
        {"r": 4},
        {"r": 4, "use_rslora": True, "alpha": 8},
        {"r": 2, "bias": "all", "target_modules": ["q_proj", "up_proj"]},
    ],
    ids=["all-linear", "rslora", "bias+named targets"],
)
def test_merged_weights_are_peft_merge_and_unload_under_the_base_names(toy_model_dir, settings):
    """``W + s·B·A`` layer by layer equals PEFT's own merge, in any order of the tensors, and the policy itself is
    left unmerged (its outputs unchanged)."""
    import copy

    from transformers import AutoModelForCausalLM

    model = peft_toy(toy_model_dir, **settings)
    ids = torch.tensor([[3, 14, 15, 9, 2, 6]])
    before = model(input_ids=ids).logits
    state = {k: v.detach() for k, v in model.state_dict().items()}
    merged = lora.merged_state_dict(model, state)
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    base_names = AutoModelForCausalLM.from_pretrained(toy_model_dir).state_dict().keys()
    assert merged.keys() == reference.keys() == base_names
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-7, msg=name)
    shuffled = dict(lora.merged_tensors(reversed(list(state.items())), lora.scalings(model)))
    assert all(torch.equal(shuffled[k], merged[k]) for k in merged)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)  # never merged in place


def test_the_optimizer_holds_the_adapters_only_and_a_checkpoint_keeps_them_only(toy_model_dir):
    """Only ``lora_A``/``lora_B`` train (fp32 adapters on a bf16 base with ``base_dtype``), decayed as matrices;
    the module's state dict (what checkpoints save) has exactly them; LoRA dropout follows ``disable_dropout``."""
    module = SPPOModule(str(toy_model_dir), lora=lora.LoRA(r=4, dropout=0.3), base_dtype="bfloat16")
    module.configure_model()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    dtypes = {n: p.dtype for n, p in module.named_parameters()}
    assert {dtypes[n] for n in trainable} == {torch.float32}
    assert {d for n, d in dtypes.items() if n not in trainable} == {torch.bfloat16}
    optimizer = module.configure_optimizers()["optimizer"]
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in module.parameters() if p.requires_grad}
    assert len(module.decay_names[0]) == len(trainable) and module.decay_names[1] == []
    assert set(module.state_dict()) == trainable
    module.policy(input_ids=torch.tensor([[3, 14, 15, 9]])).logits.float().sum().backward()  # bf16 base, fp32 adapters
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert grads.keys() == trainable and {g.dtype for g in grads.values()} == {torch.float32}
    dropouts = [m for n, m in module.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)

    kept = SPPOModule(str(toy_model_dir), lora=lora.LoRA(r=4, dropout=0.3), disable_dropout=False)
    kept.configure_model()
    assert {m.p for n, m in kept.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)} == {0.3}


def test_bad_lora_settings_name_the_key(toy_model_dir):
    with pytest.raises(ConfigError, match="model.lora.r must be >= 1"):
        lora.LoRA(r=0)
    with pytest.raises(ConfigError, match="model.base_dtype"):
        SPPOModule(str(toy_model_dir), base_dtype="bfloat16")
    module = SPPOModule(str(toy_model_dir), lora=lora.LoRA(target_modules=["embed_tokens"]))
    with pytest.raises(ConfigError, match="model.lora.target_modules reaches model.embed_tokens"):
        module.configure_model()


def test_a_lora_checkpoint_refuses_a_full_run_and_vice_versa():
    adapters = {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "all-linear", "bias": "none"}
    check_lora("x.ckpt", adapters, {**adapters, "dropout": 0.1})  # dropout may change
    with pytest.raises(ConfigError, match=r"trained LoRA adapters \(model.lora set\); this run is full fine-tuning"):
        check_lora("x.ckpt", adapters, None)
    with pytest.raises(ConfigError, match=r"trained the full model \(model.lora null\); this run is LoRA"):
        check_lora("x.ckpt", None, adapters)
    with pytest.raises(ConfigError, match=r"other adapters \(model.lora.r 16 -> 8\)"):
        check_lora("x.ckpt", adapters, {**adapters, "r": 8})


def greedy_answers(model, tok, prompts):
    from sppo_lightning.records import SamplingParams
    from sppo_lightning.rollout.hf import hf_generate

    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    ids = [list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x) for x in ids]
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    return hf_generate(model.eval(), ids, params, tok.pad_token_id, tok.eos_token_id, batch_size=64)


LORA_SHORT = ["--model.lora.r=16", "--trainer.enable_progress_bar=false", *SHORT]


@pytest.mark.slow
def test_lora_demo_exports_resumes_exactly_and_refuses_a_full_resume(tmp_path, toy_model_dir):
    """Two iterations with ``--model.lora.r=16``: ``hf_model/`` (merged) and ``hf_adapter/`` (PEFT, on the base)
    give the trained policy's greedy answers; the checkpoint holds the adapters and their AdamW moments only; a run
    stopped after 1 iteration and resumed equals the uninterrupted one; a full fine-tuning resume of it is one line."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full = tmp_path / "full"
    run("fit", "--config", DEMO, *LORA_SHORT, f"--trainer.default_root_dir={full}")
    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    prompts = [f"What is {a}+{b}?" for a, b in [(12, 30), (45, 17), (8, 81), (66, 6)]]
    policy = SPPOModule.load_from_checkpoint(full / "checkpoints" / "last.ckpt", map_location="cpu").policy
    expected = greedy_answers(policy, tok, prompts)
    merged = AutoModelForCausalLM.from_pretrained(full / "hf_model")
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy_model_dir), full / "hf_adapter")
    assert greedy_answers(merged, tok, prompts) == expected == greedy_answers(adapter, tok, prompts)
    ids = torch.tensor([[3, 14, 15, 9, 2, 6]])
    base = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    assert not torch.allclose(merged(input_ids=ids).logits, base(input_ids=ids).logits)  # it is the trained policy
    assert json.loads((full / "hf_adapter" / "adapter_config.json").read_text())["r"] == 16

    ckpt = torch.load(full / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    weights = ckpt["state_dict"]
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    [state] = ckpt["optimizer_states"]
    assert len(state["state"]) == len(weights)  # AdamW moments of the adapters, nothing else

    # the export command gives the same two folders from the checkpoint
    proc = forked.run(["-m", "sppo_lightning.export", str(full / "checkpoints" / "last.ckpt"), str(tmp_path / "e")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert greedy_answers(AutoModelForCausalLM.from_pretrained(tmp_path / "e"), tok, prompts) == expected
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy_model_dir), tmp_path / "e_adapter")
    assert greedy_answers(again, tok, prompts) == expected

    part = tmp_path / "part"
    run("fit", "--config", DEMO, *LORA_SHORT, f"--trainer.default_root_dir={part}", "--trainer.max_epochs=1")
    run("fit", "--config", DEMO, *LORA_SHORT, f"--trainer.default_root_dir={part}", "--ckpt_path=last")

    def losses(root):
        return [(r["step"], r["train/loss"]) for r in read_metrics(root) if r.get("train/loss")]

    assert val_accuracies(part) == val_accuracies(full) and losses(part) == losses(full)

    refused = run(
        "fit", "--config", DEMO, *SHORT, f"--trainer.default_root_dir={part}", "--ckpt_path=last", check=False
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "trained LoRA adapters (model.lora set); this run is full fine-tuning" in refused.stderr


@pytest.mark.slow
def test_a_full_checkpoint_refuses_a_lora_resume(tmp_path):
    run("fit", "--config", DEMO, *SHORT, "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}")
    proc = run("fit", "--config", DEMO, *LORA_SHORT, f"--trainer.default_root_dir={tmp_path}", "--ckpt_path=last",
               check=False)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "trained the full model (model.lora null); this run is LoRA" in proc.stderr


@pytest.mark.slow
def test_lora_under_fsdp2_on_two_processes_trains_resumes_exactly_and_exports(tmp_path):
    """FSDP2 over 2 CPU processes, frozen base and adapters in the same units: the sharded checkpoint holds the
    adapters and their optimizer state only, and a resume continues the uninterrupted run exactly."""
    import torch.distributed.checkpoint as dcp

    fsdp = ["--config", str(REPO / "configs" / "fsdp_cpu.yaml"), *LORA_SHORT]
    full, part = tmp_path / "full", tmp_path / "part"
    proc = run("fit", "--config", DEMO, *fsdp, f"--trainer.default_root_dir={full}", ranks=2)
    assert "sharded over data_parallel=2" in proc.stdout + proc.stderr
    run("fit", "--config", DEMO, *fsdp, f"--trainer.default_root_dir={part}", "--trainer.max_epochs=1", ranks=2)
    run("fit", "--config", DEMO, *fsdp, f"--trainer.default_root_dir={part}", "--ckpt_path=last", ranks=2)

    def losses(root):
        return [(r["step"], r["train/loss"]) for r in read_metrics(root) if r.get("train/loss")]

    assert len(losses(full)) == 2 and losses(part) == losses(full) and val_accuracies(part) == val_accuracies(full)
    saved = dcp.FileSystemReader(str(full / "checkpoints" / "last.ckpt")).read_metadata().state_dict_metadata
    weights = [k for k in saved if k.startswith("state_dict.")]
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert (full / "hf_model" / "model.safetensors").is_file()
    assert (full / "hf_adapter" / "adapter_model.safetensors").is_file()


LORA_7B = str(REPO / "configs" / "qwen2.5-7b-math-lora.yaml")


def test_plan_says_the_lora_recipe_fits_one_80_gib_gpu_with_the_breakdown(capsys):
    """Frozen bf16 base + fp32 adapters with their gradients and AdamW moments, by hand; the same run without LoRA
    (full fine-tuning on the one GPU) does not fit."""
    from sppo_lightning.plan import GIB, main

    main(["--config", LORA_7B])
    out = capsys.readouterr().out
    assert "single over 1 GPU(s)" in out and "LoRA: 80.7 M adapter parameters" in out
    assert "frozen base in bfloat16" in out and "fits on a 80 GiB GPU" in out
    main(["--config", LORA_7B, "--json"])
    plan = json.loads(capsys.readouterr().out)
    n, a = plan["model"]["params"], plan["run"]["lora_params"]
    assert a == 80_740_352  # r=32 on every linear layer of the 28 decoder layers: r x (in + out) each
    train = plan["training"]
    assert train["parameters"] == n * 2 + a * 4 and train["gradients"] == a * 4 and train["optimizer"] == 2 * a * 4
    assert train["gathered"] == 0  # the base computes in its own bf16: no autocast copies
    assert plan["rollout"]["training_state"] == n * 2 + 3 * a * 4
    assert max(train["peak"], plan["rollout"]["peak"]) <= 80 * GIB
    main(["--config", LORA_7B, "--model.lora=null", "--model.base_dtype=null"])
    assert "does NOT fit on a 80 GiB GPU" in capsys.readouterr().out


@pytest.mark.slow
def test_lora_vs_full_benchmark_smoke():
    """``benchmarks/lora_vs_full.py --smoke``: both setups run the module's step in their own process; LoRA's
    trainable parameters and AdamW state are a fraction of full fine-tuning's."""
    proc = forked.run([str(REPO / "benchmarks" / "lora_vs_full.py"), "--smoke", "--json"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, adapters = json.loads(proc.stdout[proc.stdout.index("[") :])
    assert (full["mode"], adapters["mode"]) == ("full", "lora")
    assert full["trainable"] == full["params"] and 0 < adapters["trainable"] < full["trainable"]
    # AdamW keeps two float32 moments per trainable parameter
    assert full["optimizer_bytes"] == 8 * full["trainable"] and adapters["optimizer_bytes"] == 8 * adapters["trainable"]
    assert full["peak_bytes"] > 0 and adapters["cpu_s_per_step"] > 0


def test_every_log_prob_path_gives_the_same_values_through_the_adapters(toy_model_dir):
    """Whole rows, the shared prompt and packed rows run the PEFT model as they run the plain one: same log-probs."""
    from sppo_lightning.records import TrainBatch

    torch.manual_seed(0)
    rows, prompt, width = 4, 6, 10
    ids = torch.randint(3, 60, (rows, width))
    ids[2:, :prompt] = ids[0, :prompt]  # rows 0-1 and 2-3: two groups of one prompt each
    ids[1, :prompt] = ids[0, :prompt]
    response = torch.zeros(rows, width)
    response[:, prompt:] = 1.0
    batch = TrainBatch(
        input_ids=ids, attention_mask=torch.ones_like(ids), response_mask=response,
        prompt_lengths=torch.full((rows,), prompt), group=torch.tensor([0, 0, 1, 1]), targets=torch.zeros(rows),
        win_rates=torch.full((rows,), 0.5), row_weight=torch.ones(rows),
    )  # fmt: skip
    values = []
    for flags in ({"share_prompt": False}, {"share_prompt": True}, {"packed": True, "attn_implementation": "sdpa"}):
        module = SPPOModule(str(toy_model_dir), lora=lora.LoRA(r=4), **flags)
        torch.manual_seed(1)  # PEFT draws A at random: the same adapters in every module
        module.configure_model()
        with torch.no_grad():
            for name, p in module.policy.named_parameters():
                if ".lora_B." in name:
                    p.add_(torch.randn_like(p) * 0.1)
        with torch.no_grad():
            values.append(module.token_logps(batch))
    for other in values[1:]:
        torch.testing.assert_close(other, values[0], rtol=1e-5, atol=1e-5)
