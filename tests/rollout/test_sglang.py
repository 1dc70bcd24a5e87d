"""The SGLang engines against stand-ins that behave as the released SGLang does (sglang itself cannot be installed
here: GPU-only dependencies, half a gigabyte).

Colocated: ``sglang_standin.StandInEngine`` keeps weights, weight-update sessions and released memory as SGLang
0.5.23 does and samples with the weights it holds (see its docstring), so these tests see whether the trainer's
weights really reach it, after every optimizer step and every memory release. Server: a local HTTP stand-in with
SGLang's native endpoints that checks each request against SGLang's request schema, loads the folder it is told to
and generates with it. What the stand-ins know of SGLang's interface is read from the released wheel
(``sglang_source``); ``test_sglang_contract.py`` checks our calls against that source.

Not exercised: a real ``sglang.Engine`` or server (scheduling, CUDA graphs, the memory saver, CUDA IPC of pushed
tensors), FSDP shards gathered across GPUs into the engine. ``tests/test_gpu.py`` runs a real SGLang demo where
sglang and a GPU exist.
"""

import json
import sys
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from sppo_lightning.data.datamodule import RolloutDataModule
from sppo_lightning.errors import ConfigError, UserInputError
from sppo_lightning.module import SPPOModule
from sppo_lightning.rollout.base import PolicyHandle, SamplingParams
from sppo_lightning.rollout.hf import hf_generate
from sppo_lightning.rollout.sglang import (
    SGLangEngine,
    SGLangError,
    SGLangServerEngine,
    buckets,
    check_result,
    group_outputs,
    repeat_prompts,
    sglang_sampling_params,
)
from sppo_lightning.rollout.sglang.requests import per_request_sampling_params
from sppo_lightning.rollout.sglang.weights import hf_name, named_full_tensors
from sppo_lightning.toy import AdditionPrompts
from tests.rollout import sglang_standin


# ------------------------------------------------------------------------------------- request and response
def test_sampling_params_map_to_sglang_names_and_top_k_off_is_minus_one():
    params = SamplingParams(n=4, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=32, stop_token_ids=(5, 9))
    assert sglang_sampling_params(params, eos_id=2) == {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        # neutral, stated: a server's --preferred-sampling-params would otherwise fill them in under ours
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "max_new_tokens": 32,
        "stop_token_ids": [2, 5, 9],
    }
    for off in (0, -1, -5):  # SGLang refuses top_k 0; every "off" becomes its -1
        assert sglang_sampling_params(SamplingParams(top_k=off), eos_id=2)["top_k"] == -1


def test_request_seeds_differ_per_request_and_repeat_per_seed():
    params = SamplingParams(n=2)
    a = per_request_sampling_params(params, 2, num_requests=4, seed=7)
    b = per_request_sampling_params(params, 2, num_requests=4, seed=7)
    c = per_request_sampling_params(params, 2, num_requests=4, seed=8)
    seeds = [sp["sampling_seed"] for sp in a]
    assert seeds == [sp["sampling_seed"] for sp in b] and len(set(seeds)) == 4  # K copies of a prompt differ
    assert not set(seeds) & {sp["sampling_seed"] for sp in c}
    assert all(0 <= s < 2**63 for s in seeds)
    assert per_request_sampling_params(params, 2, num_requests=4, seed=None) == sglang_sampling_params(params, 2)


def test_each_prompt_is_repeated_k_times_and_outputs_come_back_grouped():
    assert repeat_prompts([[1, 2], [3]], 2) == [[1, 2], [1, 2], [3], [3]]
    outputs = [{"output_ids": ids, "meta_info": {}} for ids in ([7, 2, 0], [8], [9, 9, 2], [2])]
    assert group_outputs(outputs, num_prompts=2, n=2, stop={2}, pad_id=0) == [[[7, 2], [8]], [[9, 9, 2], [2]]]


def test_malformed_or_aborted_outputs_are_named():
    with pytest.raises(SGLangError, match="3 outputs for 4 requests"):
        group_outputs([{"output_ids": [1]}] * 3, num_prompts=2, n=2, stop={2}, pad_id=0)
    with pytest.raises(SGLangError, match="without 'output_ids'"):
        group_outputs([{"text": "hi"}], num_prompts=1, n=1, stop={2}, pad_id=0)
    aborted = {"output_ids": [5], "meta_info": {"finish_reason": {"type": "abort", "message": "out of memory"}}}
    with pytest.raises(SGLangError, match="aborted a request: out of memory"):
        group_outputs([aborted], num_prompts=1, n=1, stop={2}, pad_id=0)


def test_every_shape_of_sglang_answer_is_checked():
    for ok in [(True, "Success"), SimpleNamespace(success=True, message=""), {"success": True}, None]:
        check_result(ok, "x")
    refusals = [(False, "busy"), SimpleNamespace(success=False, message="busy"), {"success": False, "message": "busy"}]
    for refused in refusals:
        with pytest.raises(SGLangError, match="SGLang refused update_weights_from_tensor: busy"):
            check_result(refused, "update_weights_from_tensor")


def test_buckets_respect_the_size_and_keep_every_tensor_once_in_order():
    named = [(f"p{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]  # float32: 4 bytes each
    got = list(buckets(named, max_bytes=80))
    assert [[name for name, _ in b] for b in got] == [["p0", "p1"], ["p2"], ["p3"], ["p4"], ["p5"]]
    assert all(sum(t.numel() * 4 for _, t in b) <= 80 for b in got if len(b) > 1)


def test_wrapper_modules_are_removed_from_parameter_names():
    assert (
        hf_name("model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.self_attn.q_proj.weight")
        == "model.layers.0.self_attn.q_proj.weight"
    )
    assert hf_name("_orig_mod.model.norm.weight") == "model.norm.weight"


def test_fsdp1_parameter_names_reach_sglang_as_hugging_face_names(toy_model_dir, tmp_path):
    """Inside FSDP1's summon_full_params the policy's names carry ``_fsdp_wrapped_module``; what is pushed must be
    the Hugging Face names SGLang's loader knows (one process, gloo)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        layer = type(model.model.layers[0])
        root = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({layer}), device_id=torch.device("cpu"))
        with FSDP.summon_full_params(root, writeback=False):
            raw = [name for name, _ in root.module.named_parameters()]
            pushed = dict(named_full_tensors(root.module, torch.float32))
    finally:
        dist.destroy_process_group()
    assert any("_fsdp_wrapped_module" in name for name in raw)  # what SGLang would have skipped
    assert pushed.keys() == expected.keys()
    for name, tensor in pushed.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- colocated
def fit(module, engine, epochs=2, **data):
    datamodule = RolloutDataModule(
        train=AdditionPrompts("train", num_prompts=32),
        val=AdditionPrompts("val", num_prompts=8),
        engine=engine,
        prompts_per_epoch=4,
        samples_per_prompt=2,
        max_response_length=8,
        micro_batch_size=4,
        val_batch_size=8,
        **data,
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        reload_dataloaders_every_n_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer


def names(engine) -> list[str]:
    return [c.name for c in engine.calls]


def test_colocated_engine_call_order_around_training(standin, toy_model_dir):
    """Around every generation, in SGLang's order: resume the weights, push them in a session, resume the KV cache
    and CUDA graphs, flush; after it, release everything. Weights are pushed after every release, whatever the
    step, and the engine ends up holding the trained weights."""
    L.seed_everything(0)
    module = SPPOModule(str(toy_model_dir), learning_rate=1e-3, loss_type="sppo_softmean")
    engine = SGLangEngine(bucket_mb=1, mem_fraction_static=0.4, engine_kwargs={"log_level": "error"})
    fit(module, engine, loss_type="sppo_softmean")
    sgl = standin.instances[0]
    calls = names(sgl)

    init = sgl.calls[0].kwargs
    assert init["skip_tokenizer_init"] is True and init["enable_memory_saver"] is True
    assert init["model_path"] == str(toy_model_dir) and init["log_level"] == "error"
    assert init["random_seed"] == 0 and init["base_gpu_id"] == 0

    n = calls.index("end_weight_update") - calls.index("begin_weight_update") - 1  # buckets of <= 1 MiB
    assert n >= 2  # the toy model has 2.5 MB
    push = ["begin_weight_update", *["update_weights_from_tensor"] * n, "end_weight_update"]
    after_release = ["resume_memory_occupation", *push, "resume_memory_occupation", "flush_cache"]
    generation = ["generate", "release_memory_occupation"]
    assert calls == [
        "__init__", *push, "flush_cache", *generation,  # epoch 0 rollout: a fresh engine
        *after_release, *generation,  # validation before training: same step, but the weights were released
        *after_release, *generation,  # validation after epoch 0
        *after_release, *generation,  # epoch 1 rollout: same step as that validation, released since
        *after_release, *generation,  # validation after epoch 1
    ]  # fmt: skip
    tags = [c.kwargs.get("tags") for c in sgl.calls if c.name.endswith("_memory_occupation")]
    assert tags[:3] == [["kv_cache", "weights", "cuda_graph"], ["weights"], ["kv_cache", "cuda_graph"]]
    assert all(c.kwargs["flush_cache"] is False for c in sgl.calls if c.name == "update_weights_from_tensor")
    assert {len(c.kwargs["input_ids"]) for c in sgl.calls if c.name == "generate"} == {8}  # 4 x K=2, 8 val

    final = dict(module.policy.named_parameters())
    assert sgl.loaded.keys() == final.keys()
    for name, tensor in sgl.loaded.items():  # the last push holds the trained weights, in SGLang's bf16
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(tensor, final[name].detach().to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.slow
def test_demo_learns_through_the_colocated_engine(standin, tmp_path):
    """The demo's config with SGLang rollouts and validation (the stand-in sampling with the weights it holds):
    +10 points in 10 iterations, as with the HF engine (measured 31.2 % -> 46.2 %). Without the
    weight-update session SGLang refuses every push; without the re-push after a release the first validation
    (after the first rollout's release) and every later rollout (after a validation's release at the same step)
    sample noise: measured 0.0 % at the start, rewards 0 from the second rollout on, 18.5 % at the end."""
    from sppo_lightning.cli import main
    from tests.test_cli import DEMO, read_metrics, val_accuracies

    main([
        "fit", "--config", DEMO, "--data.engine=sppo_lightning.rollout.sglang.SGLangEngine",
        "--data.engine.init_args.mem_fraction_static=0.3", "--trainer.max_epochs=10",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    acc = val_accuracies(tmp_path)
    assert len(acc) == 11
    assert 0.15 <= acc[0] <= 0.60, acc  # the starting policy's accuracy (noise weights score 0)
    gaps = [float(r["rollout/logprob_gap_mean"]) for r in read_metrics(tmp_path) if r.get("rollout/logprob_gap_mean")]
    assert len(gaps) == 10 and max(gaps) < 0.01, gaps  # bf16 rounding (measured 0.00087 on the first iteration)
    assert acc[-1] - acc[0] >= 0.10, acc
    (sgl,) = standin.instances
    assert names(sgl).count("end_weight_update") == 21  # a push before each of 11 validations and 10 rollouts


def greedy(module, prompts, max_new_tokens=8):
    tok = module.tokenizer
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    return hf_generate(module.policy, prompts, params, tok.pad_token_id, tok.eos_token_id, batch_size=64)


def test_generation_after_a_release_samples_the_policy(standin, toy_model_dir):
    """Released weights come back as noise in SGLang without a CPU backup; the engine re-pushes them, so greedy
    answers equal the policy's own greedy answers before and after a release at the same step."""
    module = SPPOModule(str(toy_model_dir))
    module.configure_model()
    policy = module.policy_handle()
    prompts = [module.tokenizer.encode(f"{a}+{b}=") for a, b in [(12, 34), (5, 77), (40, 41), (9, 9)]]
    engine = SGLangEngine(dtype="float32")
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    expected = greedy(module, prompts)
    assert engine.generate(policy, prompts, params, seed=0).response_ids == expected
    engine.after_rollout(policy)
    assert engine.generate(policy, prompts, params, seed=0).response_ids == expected
    with torch.no_grad():  # a new policy: the engine must now answer with it
        for p in module.policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine.after_rollout(policy)
    assert engine.generate(policy, prompts, params, seed=0).response_ids == greedy(module, prompts)


def bare_policy(model_dir, step=0) -> PolicyHandle:
    """A handle on a policy loaded without any LightningModule or Trainer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    return PolicyHandle(policy, tok, str(model_dir), trust_remote_code=False, step=step, device=torch.device("cpu"))


def test_a_handle_without_any_lightning_module_is_all_the_colocated_engine_needs(standin, toy_model_dir):
    policy = bare_policy(toy_model_dir)
    with torch.no_grad():  # not the folder's weights: the engine must answer with the ones it is handed
        for p in policy.policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    prompts = [policy.tokenizer.encode(f"{a}+{b}=") for a, b in [(12, 34), (5, 77)]]
    engine = SGLangEngine(dtype="float32")
    samples = engine.generate(policy, prompts, SamplingParams(temperature=0.0, max_new_tokens=8), seed=0)
    assert samples.response_ids == greedy(policy, prompts) and samples.logprobs is None


def test_a_refused_weight_update_stops_with_sglangs_message(standin, toy_model_dir, monkeypatch):
    monkeypatch.setattr(standin, "begin_weight_update", lambda self, selector="all": (False, "scheduler is busy"))
    module = SPPOModule(str(toy_model_dir))
    module.configure_model()
    policy = module.policy_handle()
    engine = SGLangEngine()
    with pytest.raises(SGLangError, match="SGLang refused begin_weight_update: scheduler is busy"):
        engine.generate(policy, [[1, 2]], SamplingParams(max_new_tokens=2), seed=0)


def test_pushes_outside_a_session_are_refused_by_sglang(standin, toy_model_dir, release):
    """What the engine before the fix did (push without a session) gets SGLang's refusal, now an error."""
    module = SPPOModule(str(toy_model_dir))
    module.configure_model()
    sgl = standin(model_path=str(toy_model_dir))
    named = [("model.norm.weight", torch.zeros(module.policy.config.hidden_size))]
    assert sgl.update_weights_from_tensor(named_tensors=named) == (False, release.session_refusal)
    with pytest.raises(SGLangError, match="must run between begin_weight_update"):
        check_result(sgl.update_weights_from_tensor(named_tensors=named), "update_weights_from_tensor")


def test_an_sglang_without_sessions_still_gets_the_weights(monkeypatch, release, toy_model_dir):
    old = sglang_standin.install(monkeypatch, release, sessions=False, version="0.5.21")
    module = SPPOModule(str(toy_model_dir))
    module.configure_model()
    policy = module.policy_handle()
    prompts = [module.tokenizer.encode("12+34=")]
    engine = SGLangEngine(dtype="float32")
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    engine.after_rollout(policy)  # nothing started yet: nothing to release
    assert engine.generate(policy, prompts, params, seed=0).response_ids == greedy(module, prompts)
    engine.after_rollout(policy)
    assert engine.generate(policy, prompts, params, seed=0).response_ids == greedy(module, prompts)
    calls = names(old.instances[0])
    assert "update_weights_from_tensor" in calls and "begin_weight_update" not in calls


def test_an_sglang_without_memory_tags_resumes_everything_then_gets_the_weights(standin, monkeypatch, toy_model_dir):
    monkeypatch.delitem(sys.modules, "sglang.srt.constants")  # no GPU_MEMORY_ALL_TYPES: release/resume all at once
    module = SPPOModule(str(toy_model_dir))
    module.configure_model()
    policy = module.policy_handle()
    prompts = [module.tokenizer.encode("12+34=")]
    engine = SGLangEngine(dtype="float32")
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    engine.generate(policy, prompts, params, seed=0)
    engine.after_rollout(policy)
    assert engine.generate(policy, prompts, params, seed=0).response_ids == greedy(module, prompts)
    memory = [(c.name, c.kwargs) for c in standin.instances[0].calls if c.name.endswith("_memory_occupation")]
    assert memory == [("release_memory_occupation", {}), ("resume_memory_occupation", {})]


def test_dtype_auto_holds_a_float32_model_in_float16(standin, toy_model_dir):
    module = SPPOModule(str(toy_model_dir))
    module.configure_model()
    policy = module.policy_handle()
    engine = SGLangEngine(dtype="auto")
    engine.generate(policy, [[1, 2]], SamplingParams(max_new_tokens=2), seed=0)
    sgl = standin.instances[0]
    assert sgl.calls[0].kwargs["dtype"] == "auto" and sgl.dtype == torch.float16
    assert {t.dtype for t in sgl.loaded.values()} == {torch.float16}
    with pytest.raises(ConfigError, match="data.engine.init_args.dtype must be one of auto, half"):
        SGLangEngine(dtype="fp8")


def test_sampling_is_reproducible_with_the_same_seed_and_top_k_zero_is_accepted(monkeypatch, release, toy_model_dir):
    """random_seed is the run's seed plus the rank; per-request seeds (under SGLang's deterministic inference)
    make a rollout a function of its seed; top_k 0 (off) passes SGLang's verification."""
    sglang_standin.install(monkeypatch, release)
    module = SPPOModule(str(toy_model_dir))
    module.configure_model()
    policy = module.policy_handle()
    prompts = [module.tokenizer.encode(f"{a}+{a}=") for a in range(10, 18)]
    params = SamplingParams(n=4, temperature=1.0, top_k=0, max_new_tokens=8)

    def rollout(seed):
        engine = SGLangEngine(dtype="float32", seed=3, engine_kwargs={"enable_deterministic_inference": True})
        return engine.generate(policy, prompts, params, seed=seed).response_ids, engine

    first, engine = rollout(5)
    assert engine.engine.calls[0].kwargs["random_seed"] == 3  # seed 3 + rank 0
    assert rollout(5)[0] == first
    assert rollout(6)[0] != first
    assert len({tuple(r) for group in first for r in group}) > len(prompts)  # the K samples of a prompt differ


def bare_handle(**fields) -> PolicyHandle:
    """A handle with no policy behind it: enough for what the engine decides before it starts."""
    return PolicyHandle(None, None, "m", trust_remote_code=False, step=0, device=torch.device("cpu"), **fields)


def test_rank_offsets_the_engine_seed(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "11")
    policy = bare_handle(rank=3, world_size=4)
    assert SGLangEngine().engine_args(policy)["random_seed"] == 14
    assert SGLangEngine(seed=0).engine_args(policy)["random_seed"] == 3
    assert SGLangEngine().engine_args(policy)["model_path"] == "m"


def test_settings_that_cannot_work_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"data.engine.init_args.tp_size=2 with 4 training processes"):
        SGLangEngine(tp_size=2).check_placement(bare_handle(world_size=4))
    SGLangEngine(tp_size=1).check_placement(bare_handle(world_size=4))
    SGLangEngine(tp_size=2).check_placement(bare_handle())  # one process: the engine may take several GPUs
    with pytest.raises(ConfigError, match=r"trainer.strategy=FSDPStrategy \(FSDP1\) with data.engine=SGLangEngine"):
        SGLangEngine().check_placement(bare_handle(world_size=2, fsdp1=True))
    with pytest.raises(ConfigError, match="data.engine.init_args.tp_size must be >= 1"):
        SGLangEngine(tp_size=0)


def test_the_modules_handle_says_what_the_trainer_runs(toy_model_dir, tmp_path):
    """What placement and engine arguments are decided from: the trainer's rank, world size, folder and strategy
    (FSDP1 refused), and one unsharded process in the working folder without a trainer."""
    from pathlib import Path

    from tests.cpu_fsdp1 import CPUFSDPStrategy

    module = SPPOModule(str(toy_model_dir))
    alone = module.policy_handle()
    assert (alone.rank, alone.world_size, alone.fsdp1, alone.output_dir, alone.step) == (0, 1, False, Path("."), 0)
    assert alone.name_or_path == str(toy_model_dir) and alone.tokenizer is module.tokenizer
    for strategy, fsdp1 in (("ddp", False), (CPUFSDPStrategy(), True)):
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, default_root_dir=tmp_path, logger=False)
        module.trainer = trainer
        policy = module.policy_handle()
        assert (policy.rank, policy.world_size, policy.fsdp1, policy.output_dir) == (0, 2, fsdp1, tmp_path)
        assert policy.device == trainer.strategy.root_device
    with pytest.raises(ConfigError, match=r"trainer.strategy=FSDPStrategy \(FSDP1\)"):
        SGLangEngine().check_placement(policy)


def test_an_sglang_outside_the_checked_range_warns_once_naming_both(monkeypatch, release, toy_model_dir):
    from sppo_lightning.rollout.sglang import CHECKED

    sglang_standin.install(monkeypatch, release, version="0.4.6.post1")
    module = SPPOModule(str(toy_model_dir))
    module.configure_model()
    policy = module.policy_handle()
    with pytest.warns(UserWarning, match=rf"SGLang 0.4.6.post1 is installed.*checked against SGLang {CHECKED[0]} to"):
        SGLangEngine().generate(policy, [[1, 2]], SamplingParams(max_new_tokens=2), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        SGLangEngine().generate(policy, [[1, 2]], SamplingParams(max_new_tokens=2), seed=0)  # once per process


def test_sglang_missing_names_the_extra(tmp_path):
    from tests.test_cli import DEMO, run

    proc = run(
        "fit",
        "--config",
        DEMO,
        "--data.engine=sppo_lightning.rollout.sglang.SGLangEngine",
        f"--trainer.default_root_dir={tmp_path}",
        check=False,
    )
    assert proc.returncode == 2
    assert 'pip install "sppo-lightning[sglang]"' in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------- server
class StandInServer:
    """A local HTTP server with SGLang's native endpoints (``/generate`` with ``input_ids``,
    ``/update_weights_from_disk``). Each body is checked against SGLang's request schema (unknown fields and bad
    sampling settings: 400, as SGLang answers them); it really loads the folder it is given and generates with the
    stand-in engine, so the test sees whether the trainer's weights reach the server. ``fail_first`` answers 503
    that many times; ``refuse_load`` answers the weight load with ``success: false`` (400)."""

    def __init__(self, model_dir, release, fail_first=0, refuse_load=False):
        self.release = release
        self.engine_cls = sglang_standin.StandInEngine.for_release(release)
        self.engine = self.engine_cls(model_path=str(model_dir), dtype="float32", random_seed=0)
        self.requests: list[tuple[str, dict]] = []
        self.fail_first, self.refuse_load = fail_first, refuse_load
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                if outer.fail_first > 0:
                    outer.fail_first -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
                status, payload = outer.answer(self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, path, body):
        schema = {"/generate": "GenerateReqInput", "/update_weights_from_disk": "UpdateWeightFromDiskReqInput"}
        if path not in schema:
            return 404, {"detail": "Not Found"}
        unknown = set(body) - set(self.release.request_fields(schema[path]))
        if unknown:
            return 400, {"error": {"message": f"unexpected fields {sorted(unknown)}"}}
        if path == "/update_weights_from_disk":
            if self.refuse_load:
                return 400, {"success": False, "message": "Failed to get weights iterator", "num_paused_requests": 0}
            self.engine = self.engine_cls(model_path=body["model_path"], dtype="float32", random_seed=0)
            return 200, {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}
        try:
            return 200, self.engine.generate(
                input_ids=body["input_ids"],
                sampling_params=body["sampling_params"],
                return_logprob=body.get("return_logprob", False),
            )
        except (TypeError, ValueError) as e:
            return 400, {"error": {"message": str(e)}}

    def close(self):
        self.httpd.shutdown()


def test_server_client_refreshes_weights_and_generates(toy_model_dir, tmp_path, release):
    server = StandInServer(toy_model_dir, release)
    try:
        L.seed_everything(0)
        module = SPPOModule(str(toy_model_dir), learning_rate=1e-3)
        engine = SGLangServerEngine(url=server.url, weights_dir=str(tmp_path / "w"), batch_size=4)
        fit(module, engine, epochs=1)
    finally:
        server.close()
    paths = [p for p, _ in server.requests]
    # the starting policy is loaded before the first generation (load_initial_weights), whatever the server was
    # started with; after the epoch the trained one
    assert paths[0] == "/update_weights_from_disk"
    assert paths[1:5] == ["/generate"] * 4  # 4 x K=2 rollout requests, then 8 validation prompts, 4 per call
    assert paths[5] == "/update_weights_from_disk" and set(paths[6:]) == {"/generate"}
    assert server.requests[5][1]["model_path"] == str((tmp_path / "w").resolve())
    body = server.requests[1][1]
    assert isinstance(body["input_ids"][0], list) and len(body["sampling_params"]) == 4
    assert body["sampling_params"][0]["max_new_tokens"] == 8 and body["sampling_params"][0]["top_k"] == -1
    for name, p in module.policy.named_parameters():  # the server now holds the trained policy
        torch.testing.assert_close(server.engine.params[name], p.detach())


def test_a_handle_without_any_lightning_module_is_all_the_server_client_needs(toy_model_dir, tmp_path, release):
    """Weights written from a bare handle (its own state dict: no FSDP) reach the server, at the handle's step."""
    server = StandInServer(toy_model_dir, release)
    policy = bare_policy(toy_model_dir, step=3)
    with torch.no_grad():
        for p in policy.policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    try:
        engine = SGLangServerEngine(url=server.url, weights_dir=str(tmp_path / "w"))
        prompts = [policy.tokenizer.encode("12+34=")]
        samples = engine.generate(policy, prompts, SamplingParams(temperature=0.0, max_new_tokens=8), seed=0)
    finally:
        server.close()
    assert [p for p, _ in server.requests] == ["/update_weights_from_disk", "/generate"]
    assert samples.response_ids == greedy(policy, prompts)
    for name, p in policy.policy.named_parameters():
        torch.testing.assert_close(server.engine.params[name], p.detach())


def test_server_refusals_stop_with_the_servers_message(toy_model_dir, release):
    server = StandInServer(toy_model_dir, release, refuse_load=True)
    try:
        engine = SGLangServerEngine(url=server.url, retries=1)
        with pytest.raises(SGLangError, match=r"refused the request \(400\).*Failed to get weights iterator"):
            engine.post("/update_weights_from_disk", {"model_path": "/nowhere"})
        with pytest.raises(SGLangError, match="top_k must be -1 .disable. or at least 1, got 0"):
            engine.post("/generate", {"input_ids": [[1, 2]], "sampling_params": {"top_k": 0}})
    finally:
        server.close()


def test_server_client_retries_then_succeeds(toy_model_dir, release):
    server = StandInServer(toy_model_dir, release, fail_first=2)
    try:
        engine = SGLangServerEngine(url=server.url, retries=3, backoff=0.01)
        result = engine.post(
            "/generate", {"input_ids": [[1, 2]], "sampling_params": {"max_new_tokens": 2, "stop_token_ids": [2]}}
        )
    finally:
        server.close()
    assert len(server.requests) == 3 and len(result) == 1


def test_unreachable_server_gives_one_clear_error():
    engine = SGLangServerEngine(url="http://127.0.0.1:9", retries=2, backoff=0.01, timeout=2)
    with pytest.raises(UserInputError, match=r"unreachable \(/generate\) after 2 attempts"):
        engine.post("/generate", {"input_ids": [[1]], "sampling_params": {}})
