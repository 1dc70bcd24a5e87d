"""The SGLang adapters at their boundary (sglang itself cannot be installed here).

Exercised: request building and response parsing, bucketing of the weights, the call order of the colocated
engine around training steps (through a real Lightning fit), the server client against a local HTTP stand-in that
really loads the pushed weights and generates with them, retries and error paths, and the missing-extra message.

Not exercised: a real ``sglang.Engine`` or server (its scheduling, CUDA graphs, memory saver), FSDP shards gathered
across several GPUs into the engine, tensor parallelism. ``tests/test_gpu.py`` runs a real SGLang demo where
sglang and a GPU exist.
"""

import inspect
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import lightning as L
import pytest
import torch

from sppo_lightning.data.datamodule import RolloutDataModule
from sppo_lightning.errors import UserInputError
from sppo_lightning.module import SPPOModule
from sppo_lightning.rollout.base import SamplingParams
from sppo_lightning.rollout.hf import hf_generate
from sppo_lightning.rollout.sglang import (
    SGLangEngine,
    SGLangServerEngine,
    buckets,
    group_outputs,
    repeat_prompts,
    sglang_sampling_params,
)
from sppo_lightning.toy import AdditionPrompts


# ------------------------------------------------------------------------------------- request and response
def test_sampling_params_map_one_to_one_to_sglang_names():
    params = SamplingParams(n=4, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=32, stop_token_ids=(5, 9))
    assert sglang_sampling_params(params, eos_id=2) == {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "max_new_tokens": 32,
        "stop_token_ids": [2, 5, 9],
    }


def test_each_prompt_is_repeated_k_times_and_outputs_come_back_grouped():
    assert repeat_prompts([[1, 2], [3]], 2) == [[1, 2], [1, 2], [3], [3]]
    outputs = [{"output_ids": ids, "meta_info": {}} for ids in ([7, 2, 0], [8], [9, 9, 2], [2])]
    assert group_outputs(outputs, num_prompts=2, n=2, stop={2}, pad_id=0) == [[[7, 2], [8]], [[9, 9, 2], [2]]]


def test_malformed_outputs_are_named():
    with pytest.raises(RuntimeError, match="3 outputs for 4 requests"):
        group_outputs([{"output_ids": [1]}] * 3, num_prompts=2, n=2, stop={2}, pad_id=0)
    with pytest.raises(RuntimeError, match="without 'output_ids'"):
        group_outputs([{"text": "hi"}], num_prompts=1, n=1, stop={2}, pad_id=0)


def test_buckets_respect_the_size_and_keep_every_tensor_once_in_order():
    named = [(f"p{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]  # float32: 4 bytes each
    got = list(buckets(named, max_bytes=80))
    assert [[name for name, _ in b] for b in got] == [["p0", "p1"], ["p2"], ["p3"], ["p4"], ["p5"]]
    assert all(sum(t.numel() * 4 for _, t in b) <= 80 for b in got if len(b) > 1)


# ------------------------------------------------------------------------------------------- colocated
class RecordingEngine:
    """Stands in for ``sglang.Engine``: records calls, with SGLang's documented signatures (sglang/srt/entrypoints/
    engine.py); generation returns a fixed answer so the pipeline downstream runs."""

    def __init__(self, **server_args):
        self.calls = [("__init__", server_args)]
        self.pushed: dict[str, torch.Tensor] = {}

    def generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False, stream=False):
        self.calls.append(("generate", {"n_requests": len(input_ids), "sampling_params": sampling_params}))
        return [{"output_ids": [33, 2], "meta_info": {"finish_reason": {"type": "stop"}}} for _ in input_ids]

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(("update_weights_from_tensor", {"names": [n for n, _ in named_tensors]}))
        self.pushed.update({n: t.clone() for n, t in named_tensors})

    def flush_cache(self):
        self.calls.append(("flush_cache", {}))

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release_memory_occupation", {}))

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume_memory_occupation", {}))


class Colocated(SGLangEngine):
    def make_engine(self, **kwargs):
        self.recorder = RecordingEngine(**kwargs)
        return self.recorder


def test_recording_engine_matches_sglang_signatures():
    """Guard against drifting from SGLang: every method we call exists there with the keywords we pass."""
    documented = {  # from sglang.Engine (python/sglang/srt/entrypoints/engine.py)
        "generate": ["prompt", "sampling_params", "input_ids"],
        "update_weights_from_tensor": ["named_tensors", "load_format", "flush_cache"],
        "release_memory_occupation": ["tags"],
        "resume_memory_occupation": ["tags"],
        "flush_cache": [],
    }
    for method, names in documented.items():
        params = inspect.signature(getattr(RecordingEngine, method)).parameters
        assert all(n in params for n in names), method


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


def test_colocated_engine_call_order_around_training(toy_model_dir):
    """Weights are pushed (in buckets, then one flush) whenever they changed, generation follows, and memory is
    released before training and resumed before the next generation."""
    L.seed_everything(0)
    module = SPPOModule(str(toy_model_dir), learning_rate=1e-3, loss_type="sppo_softmean")
    engine = Colocated(bucket_mb=1, mem_fraction_static=0.4, engine_kwargs={"cuda_graph_max_bs": 8})
    fit(module, engine)
    calls = [name for name, _ in engine.recorder.calls]

    init_args = engine.recorder.calls[0][1]
    assert init_args["skip_tokenizer_init"] is True and init_args["enable_memory_saver"] is True
    assert init_args["model_path"] == str(toy_model_dir) and init_args["cuda_graph_max_bs"] == 8

    def push():  # a weight refresh: at least 2 buckets of <= 1 MiB (the toy model has 2.5 MB), then a flush
        return ["update_weights_from_tensor"] * push_count + ["flush_cache"]

    push_count = calls.index("flush_cache") - 1
    assert push_count >= 2
    assert calls == [
        "__init__",
        *push(), "generate", "release_memory_occupation",  # validation before training (step 0)
        "resume_memory_occupation", "generate", "release_memory_occupation",  # epoch 0 rollout: same weights
        "resume_memory_occupation", *push(), "generate", "release_memory_occupation",  # validation after epoch 0
        "resume_memory_occupation", "generate", "release_memory_occupation",  # epoch 1 rollout
        "resume_memory_occupation", *push(), "generate", "release_memory_occupation",  # validation after epoch 1
    ]  # fmt: skip
    pushed = {c[1]["n_requests"] for c in engine.recorder.calls if c[0] == "generate"}
    assert pushed == {8}  # 4 prompts x K=2 for training, 8 validation prompts x 1
    final = dict(module.policy.named_parameters())
    assert engine.recorder.pushed.keys() == final.keys()
    for name, tensor in engine.recorder.pushed.items():  # the last push holds the trained weights, in bf16
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(tensor, final[name].detach().to(torch.bfloat16))


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
    ``/update_weights_from_disk``). It really loads the folder it is given and generates with HF ``generate``,
    so the test sees whether the trainer's weights reach the server. ``fail_first`` answers 503 that many times."""

    def __init__(self, model_dir, fail_first=0):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir)
        self.requests: list[tuple[str, dict]] = []
        self.fail_first = fail_first
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
        from transformers import AutoModelForCausalLM

        if path == "/update_weights_from_disk":
            self.model = AutoModelForCausalLM.from_pretrained(body["model_path"])
            return 200, {"success": True, "message": "Succeeded to update model weights."}
        if path == "/generate":
            sp = body["sampling_params"]
            params = SamplingParams(temperature=0.0, max_new_tokens=sp["max_new_tokens"])  # greedy: deterministic
            eos = sp["stop_token_ids"][0]
            out = hf_generate(self.model, body["input_ids"], params, pad_id=eos, eos_id=eos, batch_size=64)
            return 200, [{"output_ids": group[0], "meta_info": {}} for group in out]
        return 404, {"error": path}

    def close(self):
        self.httpd.shutdown()


def test_server_client_refreshes_weights_and_generates(toy_model_dir, tmp_path):
    server = StandInServer(toy_model_dir)
    try:
        L.seed_everything(0)
        module = SPPOModule(str(toy_model_dir), learning_rate=1e-3)
        engine = SGLangServerEngine(url=server.url, weights_dir=str(tmp_path / "w"), batch_size=4)
        fit(module, engine, epochs=1)
    finally:
        server.close()
    paths = [p for p, _ in server.requests]
    # validation and rollout at step 0 use the server's own (base) weights; after the epoch the trained ones
    assert paths[:4] == ["/generate"] * 4  # 8 validation prompts, then 4 x K=2 rollout requests, 4 per call
    assert paths[4] == "/update_weights_from_disk" and set(paths[5:]) == {"/generate"}
    assert server.requests[4][1]["model_path"] == str((tmp_path / "w").resolve())
    body = server.requests[0][1]
    assert isinstance(body["input_ids"][0], list) and body["sampling_params"]["max_new_tokens"] == 8
    for name, p in module.policy.named_parameters():  # the server now holds the trained policy
        torch.testing.assert_close(dict(server.model.named_parameters())[name], p.detach())


def test_server_client_retries_then_succeeds(toy_model_dir):
    server = StandInServer(toy_model_dir, fail_first=2)
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
