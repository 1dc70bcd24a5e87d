"""Our calls against the released SGLang source (the wheels of the checked releases, downloaded and parsed, never
installed).

What we call is not written down here: it is recorded from the stand-in engine during a Lightning fit (every
method, every keyword, every ServerArgs key, every sampling field) and from the HTTP stand-in for the server client.
What SGLang offers is read from its source with ``ast`` (``sglang_source``).
"""

import re

import pytest

from sppo_lightning.module import SPPOModule
from sppo_lightning.rollout.sglang import CHECKED, SGLangEngine, SGLangServerEngine
from tests.conftest import REPO
from tests.rollout import sglang_source, sglang_standin
from tests.rollout.test_sglang import StandInServer, fit


@pytest.fixture(scope="module", params=sglang_source.CHECKED)
def release(request):
    return sglang_source.released(request.param)


@pytest.fixture(scope="module")
def recorded_fit(release, toy_model_dir, tmp_path_factory):
    """The stand-in's calls during a 1-iteration fit through the colocated engine, and the server stand-in's
    requests during a 1-iteration fit through the server client followed by a weight refresh."""
    import lightning as L

    with pytest.MonkeyPatch.context() as mp:
        engine_cls = sglang_standin.install(mp, release)
        L.seed_everything(0)
        module = SPPOModule(str(toy_model_dir), learning_rate=1e-3)
        fit(module, SGLangEngine(bucket_mb=1, dtype="auto", engine_kwargs={"log_level": "error"}), epochs=1)
    server = StandInServer(toy_model_dir, release)
    try:
        L.seed_everything(0)
        module = SPPOModule(str(toy_model_dir), learning_rate=1e-3)
        client = SGLangServerEngine(url=server.url, weights_dir=str(tmp_path_factory.mktemp("w")), batch_size=4)
        fit(module, client, epochs=1)
        client.refresh_weights(module.policy_handle())
    finally:
        server.close()
    (sgl,) = engine_cls.instances
    return sgl.calls, server.requests


def test_every_engine_method_and_keyword_we_call_exists_in_the_release(release, recorded_fit):
    calls, _ = recorded_fit
    methods = release.engine_methods
    called = {c.name for c in calls} - {"__init__"}
    assert {"generate", "update_weights_from_tensor", "begin_weight_update", "end_weight_update"} <= called
    assert {"release_memory_occupation", "resume_memory_occupation", "flush_cache"} <= called
    for call in calls[1:]:
        assert call.name in methods, f"sglang {release.version} Engine has no {call.name}"
        signature = methods[call.name]
        assert not call.args, f"{call.name} called with positional arguments {call.args}"
        for keyword in call.kwargs:
            assert signature.takes(keyword), f"sglang {release.version} Engine.{call.name} takes no {keyword}"


def test_every_server_args_key_we_pass_is_a_field_of_the_release(release, recorded_fit):
    calls, _ = recorded_fit
    init = calls[0].kwargs
    assert {"model_path", "dtype", "tp_size", "random_seed", "skip_tokenizer_init", "enable_memory_saver"} <= set(init)
    assert set(init) <= release.server_args_fields, set(init) - release.server_args_fields
    assert init["dtype"] in release.dtype_choices
    assert "cuda_graph_max_bs" not in release.server_args_fields  # what the engine used to pass


def test_every_sampling_field_we_send_is_a_field_of_the_release(release, recorded_fit):
    calls, requests = recorded_fit
    sent = [c.kwargs["sampling_params"] for c in calls if c.name == "generate"]
    sent += [body["sampling_params"] for path, body in requests if path == "/generate"]
    fields = set(release.sampling_params_fields)
    for sampling in sent:
        for one in sampling if isinstance(sampling, list) else [sampling]:
            assert set(one) <= fields, set(one) - fields


def test_every_request_field_the_server_client_sends_is_in_the_release_schema(release, recorded_fit):
    _, requests = recorded_fit
    schemas = {"/generate": "GenerateReqInput", "/update_weights_from_disk": "UpdateWeightFromDiskReqInput"}
    assert {path for path, _ in requests} == set(schemas)
    for path, body in requests:
        assert set(body) <= set(release.request_fields(schemas[path])), (path, sorted(body))


def test_the_memory_tags_and_session_refusal_the_stand_in_uses_are_the_releases(release):
    assert release.memory_tags == ["kv_cache", "weights", "cuda_graph"]
    assert "begin_weight_update()" in release.session_refusal


def test_the_stand_in_accepts_nothing_the_release_would_refuse(release):
    """Its methods take only keywords the released Engine takes, so a call that passes here passes there."""
    import inspect

    for name in ("generate", "update_weights_from_tensor", "begin_weight_update", "end_weight_update",
                 "release_memory_occupation", "resume_memory_occupation", "flush_cache"):  # fmt: skip
        ours = inspect.signature(getattr(sglang_standin.StandInEngine, name)).parameters
        for keyword in ours:
            if keyword != "self":
                assert release.engine_methods[name].takes(keyword), (name, keyword)


def test_the_sglang_extra_names_the_checked_range():
    extra = re.search(r"^sglang = \[(.*)\]", (REPO / "pyproject.toml").read_text(), re.MULTILINE)  # py3.10: no tomllib
    low, high = CHECKED
    assert extra is not None and extra.group(1) == f'"sglang>={low},<={high}"'
    assert CHECKED == sglang_source.CHECKED  # the releases these tests parse
