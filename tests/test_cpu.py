"""CPU set-up: the sgl_kernel stand-in's semantics and the CPU server env."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from backends.launcher import _cpu as cpu


@pytest.fixture(scope="module")
def standin():
    """The stand-in loaded under another name, so the real sgl_kernel is not shadowed."""
    path = cpu.sgl_kernel_standin_path() / "sgl_kernel" / "__init__.py"
    spec = importlib.util.spec_from_file_location("sgl_kernel_standin_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_assign_req_to_token_pool_matches_kernel_semantics(standin):
    pool = torch.full((6, 16), -1, dtype=torch.int32)
    rows = torch.tensor([4, 1, 3])
    start = torch.tensor([2, 0, 5])
    end = torch.tensor([5, 4, 5])  # the last request has an empty range
    out_cache_loc = torch.arange(100, 107, dtype=torch.int64)
    standin.assign_req_to_token_pool_cpu(rows, pool, start, end, out_cache_loc, pool.shape[1])
    expected = torch.full((6, 16), -1, dtype=torch.int32)
    expected[4, 2:5] = torch.tensor([100, 101, 102])
    expected[1, 0:4] = torch.tensor([103, 104, 105, 106])
    assert torch.equal(pool, expected)


def test_unknown_cpu_ops_fail_loudly_and_others_are_missing(standin):
    op = standin.copy_all_layer_kv_cache_cpu  # resolves, so SGLang's import succeeds
    with pytest.raises(NotImplementedError, match="copy_all_layer_kv_cache_cpu"):
        op()
    with pytest.raises(AttributeError):
        standin.fused_add_rmsnorm  # non-CPU names stay missing -> SGLang falls back


def test_cpu_env_puts_standin_first(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    env = cpu.cpu_server_env("prefill")
    assert env["PYTHONPATH"].split(":") == [str(cpu.sgl_kernel_standin_path()), "/somewhere/else"]
    assert (cpu.sgl_kernel_standin_path() / "sgl_kernel" / "__init__.py").is_file()
    assert env["SGLANG_DISAGGREGATION_ALL_CP_RANKS_TRANSFER"] == "1"
    assert env["SGLANG_DISAGG_PREFILL_EARLY_SEND_CACHED_PREFIX"] == "0"


def test_decode_only_flags():
    assert "--disaggregation-decode-retraction-backup" in cpu.cpu_server_flags("decode")
    assert "--disaggregation-decode-retraction-backup" not in cpu.cpu_server_flags("prefill")
