"""Fast checks of SGLangPDConfig validation and the launch plan (no servers)."""

from __future__ import annotations

import json
import sys

import pytest

from backends.launcher import _cpu as cpu
from backends import ConfigurationError, SGLangPDConfig, plan_servers
from backends.launcher._config import PORT_STRIDE
from backends.launcher._launch_plan import DECODE_MAX_RUNNING_REQUESTS

MODEL = "/models/some-model"  # a model path avoids building the tiny model


def flag(argv: list[str], name: str) -> str | None:
    """Value following ``name`` in ``argv`` (last occurrence), or None."""
    idx = [i for i, a in enumerate(argv) if a == name]
    return argv[idx[-1] + 1] if idx else None


@pytest.mark.parametrize("ratio, expected", [
    ((1, 2), (1, 2)), ([2, 3], (2, 3)), ("2:3", (2, 3)), (" 1:1 ", (1, 1)),
    ((0, 0), (0, 0)),
])
def test_ratio_forms(ratio, expected):
    colocated = 1 if expected == (0, 0) else 0
    assert SGLangPDConfig(model_path=MODEL, pd_ratio=ratio, colocated=colocated).pd_ratio == expected


@pytest.mark.parametrize("kwargs, field", [
    (dict(pd_ratio="1-2"), "pd_ratio"),
    (dict(pd_ratio="a:b"), "pd_ratio"),
    (dict(pd_ratio=(1, 2, 3)), "pd_ratio"),
    (dict(pd_ratio=(-1, 1)), "pd_ratio"),
    (dict(pd_ratio=(1.5, 1)), "pd_ratio"),
    (dict(pd_ratio=(1, 0)), "pd_ratio"),
    (dict(pd_ratio=(0, 0)), "pd_ratio"),
    (dict(colocated=-1), "colocated"),
    (dict(colocated=True), "colocated"),
    (dict(tp_size=0), "tp_size"),
    (dict(mem_fraction_static=0.0), "mem_fraction_static"),
    (dict(mem_fraction_static=1.2), "mem_fraction_static"),
    (dict(device="tpu"), "device"),
    (dict(transfer_backend="fake"), "transfer_backend"),
    (dict(host=""), "host"),
    (dict(base_port=80), "base_port"),
    (dict(base_port=65530), "base_port"),
    (dict(prefill_args="--foo"), "prefill_args"),
    (dict(prefill_args=None), "prefill_args"),
    (dict(model_path=""), "model_path"),
    (dict(decode_args=["--port", "1"]), "base_port"),
    (dict(colocated_args=["--model-path=x"]), "model_path"),
    (dict(decode_torch_compile="yes"), "decode_torch_compile"),
])
def test_invalid_fields_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SGLangPDConfig(**{"model_path": MODEL, **kwargs})


def test_colocated_only_mode():
    cfg = SGLangPDConfig(model_path=MODEL, pd_ratio=(0, 0), colocated=1, device="cpu")
    specs = plan_servers(cfg)
    assert [s.role for s in specs] == ["colocated"]
    assert "--disaggregation-mode" not in specs[0].argv


def test_port_plan_is_unique_and_ordered():
    cfg = SGLangPDConfig(model_path=MODEL, pd_ratio="2:3", colocated=2, base_port=31000,
                         device="cpu")
    specs = plan_servers(cfg)
    assert [s.name for s in specs] == ["prefill-0", "prefill-1", "decode-0", "decode-1",
                                       "decode-2", "colocated-0", "colocated-1"]
    ports = [p for s in specs for p in s.ports]
    assert len(ports) == len(set(ports))
    assert min(ports) == 31000 and max(ports) < 31000 + PORT_STRIDE * len(specs)
    for s in specs:
        assert flag(s.argv, "--port") == str(s.port)
        assert flag(s.argv, "--nccl-port") == str(s.nccl_port)
        assert s.url == f"http://127.0.0.1:{s.port}"
        if s.role == "prefill":
            assert flag(s.argv, "--disaggregation-bootstrap-port") == str(s.bootstrap_port)
            assert s.bootstrap_port != 8998
        else:
            assert s.bootstrap_port is None
            assert "--disaggregation-bootstrap-port" not in s.argv


def test_kv_events_are_published_by_prefill_and_colocated_servers_on_their_own_ports():
    specs = plan_servers(SGLangPDConfig(model_path=MODEL, pd_ratio="2:1", colocated=1, device="cpu",
                                        prefill_args=["--dp-size", "2"]))
    for s in specs:
        if s.role == "decode":
            assert "--kv-events-config" not in s.argv and s.event_ports == ()
            continue
        dp = 2 if s.role == "prefill" else 1
        config = json.loads(flag(s.argv, "--kv-events-config"))
        events = s.port + 3
        assert config == {"publisher": "zmq", "endpoint": f"tcp://*:{events}",
                          "replay_endpoint": f"tcp://*:{events + dp}", "topic": "kv"}
        assert flag(s.argv, "--load-publish-endpoint") == f"tcp://*:{events + 2 * dp}"
        assert s.event_ports == tuple(range(events, events + 3 * dp))
    ports = [p for s in specs for p in s.ports]
    assert len(ports) == len(set(ports))
    quiet = plan_servers(SGLangPDConfig(model_path=MODEL, colocated=1, device="cpu", kv_events=False))
    assert not any("--kv-events-config" in s.argv or s.event_ports for s in quiet)
    with pytest.raises(ConfigurationError, match="kv_events=False"):
        plan_servers(SGLangPDConfig(model_path=MODEL, device="cpu", prefill_args=["--dp-size", "3"]))
    with pytest.raises(ConfigurationError, match="kv_events must be True or False"):
        SGLangPDConfig(kv_events="yes")


def test_argv_starts_with_launch_server():
    spec = plan_servers(SGLangPDConfig(model_path=MODEL, device="cpu"))[0]
    assert spec.argv[:3] == [sys.executable, "-m", "sglang.launch_server"]
    assert flag(spec.argv, "--model-path") == MODEL


def test_cpu_flags_and_env():
    specs = plan_servers(SGLangPDConfig(model_path=MODEL, colocated=1, device="cpu"))
    for s in specs:
        assert flag(s.argv, "--device") == "cpu"
        assert flag(s.argv, "--attention-backend") == "torch_native"
        assert "--sleep-on-idle" in s.argv
        assert not any("cuda-graph" in a for a in s.argv)
        assert s.env["SGLANG_USE_CPU_ENGINE"] == "1"
        assert s.env["OMP_NUM_THREADS"] == "1"
        assert s.env["PYTHONPATH"].split(":")[0] == str(cpu.sgl_kernel_standin_path())
        assert "CUDA_VISIBLE_DEVICES" not in s.env and s.gpu_ids == ()
    prefill, decode, _ = specs
    assert flag(prefill.argv, "--disaggregation-transfer-backend") == "mooncake_tcp"
    assert flag(decode.argv, "--disaggregation-decode-retraction-backup") == "cpu_tensor"
    assert flag(decode.argv, "--max-running-requests") == str(DECODE_MAX_RUNNING_REQUESTS)


def test_gpu_flags_env_and_gpu_ids():
    cfg = SGLangPDConfig(model_path=MODEL, pd_ratio="1:2", colocated=1, tp_size=2,
                         mem_fraction_static=0.85)
    prefill, d0, d1, coloc = plan_servers(cfg, device="cuda", gpu_count=8)
    assert [s.gpu_ids for s in (prefill, d0, d1, coloc)] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert d1.env["CUDA_VISIBLE_DEVICES"] == "4,5"
    for s in (prefill, d0, d1, coloc):
        assert "PYTHONPATH" not in s.env and "--device" not in s.argv
        assert flag(s.argv, "--tp-size") == "2"
        assert flag(s.argv, "--mem-fraction-static") == "0.85"
    assert flag(prefill.argv, "--disaggregation-transfer-backend") == "mooncake"
    assert "--disable-prefill-cuda-graph" in prefill.argv
    assert flag(d0.argv, "--cuda-graph-max-bs-decode") == str(DECODE_MAX_RUNNING_REQUESTS)
    assert "--disable-prefill-cuda-graph" not in d0.argv


def test_local_plan_uses_the_visible_gpus_and_a_given_count_ignores_them(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setattr(cpu, "gpu_count", lambda: 4)
    cfg = SGLangPDConfig(model_path=MODEL, pd_ratio="1:1", tp_size=2)
    assert [s.gpu_ids for s in plan_servers(cfg, device="cuda")] == [(4, 5), (6, 7)]
    # A count given explicitly plans some machine's GPUs 0..n-1 (multinode_plan).
    assert [s.gpu_ids for s in plan_servers(cfg, device="cuda", gpu_count=4)] == [(0, 1), (2, 3)]


def test_gpu_plan_refuses_too_few_gpus():
    cfg = SGLangPDConfig(model_path=MODEL, pd_ratio="1:1", tp_size=2)
    with pytest.raises(ValueError, match="need 4 GPUs"):
        plan_servers(cfg, device="cuda", gpu_count=2)


def test_role_args_come_last_and_override():
    cfg = SGLangPDConfig(model_path=MODEL, device="cpu",
                         decode_args=["--max-running-requests", "8"],
                         prefill_args=["--chunked-prefill-size", "512"])
    prefill, decode = plan_servers(cfg)
    assert flag(decode.argv, "--max-running-requests") == "8"
    assert prefill.argv[-2:] == ["--chunked-prefill-size", "512"]


def test_decode_torch_compile_flag():
    _, decode = plan_servers(SGLangPDConfig(model_path=MODEL, decode_torch_compile=True), 
        device="cuda", gpu_count=2)
    assert "--enable-torch-compile" in decode.argv
    with pytest.raises(ValueError, match="decode_torch_compile"):
        plan_servers(SGLangPDConfig(model_path=MODEL, decode_torch_compile=True), device="cpu")


@pytest.mark.parametrize("name, model, ratio, tp, mem", [
    ("small", "microsoft/phi-2", (1, 2), 1, 0.8),
    ("medium", "meta-llama/Llama-2-7b-hf", (2, 4), 2, 0.9),
    ("large", "meta-llama/Llama-2-70b-hf", (4, 8), 8, 0.95),
])
def test_presets(name, model, ratio, tp, mem):
    cfg = SGLangPDConfig.preset(name)
    assert (cfg.model_path, cfg.pd_ratio, cfg.tp_size, cfg.mem_fraction_static) == \
        (model, ratio, tp, mem)


def test_preset_overrides_and_errors():
    assert SGLangPDConfig.preset("small", base_port=40000).base_port == 40000
    with pytest.raises(ValueError, match="unknown preset"):
        SGLangPDConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown override"):
        SGLangPDConfig.preset("small", tp=2)


def test_transfer_backend_auto_by_device():
    cfg = SGLangPDConfig(model_path=MODEL)
    assert cfg.resolved_transfer_backend("cpu") == "mooncake_tcp"
    assert cfg.resolved_transfer_backend("cuda") == "mooncake"
    assert SGLangPDConfig(model_path=MODEL, transfer_backend="nixl"
                          ).resolved_transfer_backend("cpu") == "nixl"


def test_cuda_detection_honours_hidden_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cpu.gpu_count() == 0 and not cpu.cuda_available()
    assert SGLangPDConfig(model_path=MODEL).resolved_device() == "cpu"


def test_model_path_accepts_pathlike(tmp_path):
    assert SGLangPDConfig(model_path=tmp_path).model_path == str(tmp_path)


def test_is_tiny_model(tmp_path):
    assert SGLangPDConfig().is_tiny_model
    assert not SGLangPDConfig(model_path=MODEL).is_tiny_model
    (tmp_path / "TINY_RANDOM_MODEL").write_text("x")
    assert SGLangPDConfig(model_path=str(tmp_path)).is_tiny_model


def test_data_parallel_role_gets_its_own_gpus_ports_and_cpu_binding():
    cfg = SGLangPDConfig(model_path=MODEL, pd_ratio="1:1", tp_size=2, prefill_args=["--dp-size", "2"])
    prefill, decode = plan_servers(cfg, device="cuda", gpu_count=6)
    assert prefill.gpu_ids == (0, 1, 2, 3) and decode.gpu_ids == (4, 5)  # tp 2 x dp 2, then tp 2
    assert "--nccl-port" not in prefill.argv and prefill.nccl_port is None  # SGLang gives DP ranks one port
    assert prefill.ports == (prefill.port, prefill.bootstrap_port, *range(prefill.port + 3, prefill.port + 9))
    assert flag(decode.argv, "--nccl-port") == str(decode.nccl_port)
    with pytest.raises(ValueError, match="need 8 GPUs"):
        plan_servers(SGLangPDConfig(model_path=MODEL, pd_ratio="1:1", tp_size=2,
                       decode_args=["--data-parallel-size=3"]), device="cuda", gpu_count=6)

    on_cpu = plan_servers(SGLangPDConfig(model_path=MODEL, pd_ratio="1:1", prefill_args=["--dp-size", "2"]), device="cpu")
    binds = on_cpu[0].env["SGLANG_CPU_OMP_THREADS_BIND"].split("|")
    assert len(binds) == 2 and all(b.isdigit() for b in binds)  # one core per rank
    assert "SGLANG_CPU_OMP_THREADS_BIND" not in on_cpu[1].env
    with pytest.raises(ValueError, match="--dp-size needs a positive integer"):
        plan_servers(SGLangPDConfig(model_path=MODEL, prefill_args=["--dp-size", "x"]), device="cpu")
