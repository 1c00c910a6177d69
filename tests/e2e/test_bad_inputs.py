"""Bad input against real servers: the documented exception, a useful message, no retry storm."""

from __future__ import annotations

import socket
import time

import pytest

from backends import BadRequestError, ConfigurationError, PDBackend


def _last_record(backend):
    return backend.metrics.records()[-1]


def test_unknown_sampling_key_is_refused_once(pd_backend):
    with pytest.raises(BadRequestError) as caught:
        pd_backend.client.request({"text": "hi", "sampling_params": {"max_new_tokens": 2, "temprature": 0}})
    assert "temprature" in str(caught.value) and caught.value.status == 400
    assert _last_record(pd_backend).attempts == 1  # a 4xx is never retried


def test_negative_max_tokens_is_refused_before_sending(pd_backend):
    with pytest.raises(BadRequestError, match="max_new_tokens must be a non-negative integer"):
        pd_backend.client.request({"text": "hi", "sampling_params": {"max_new_tokens": -5}})
    assert _last_record(pd_backend).attempts == 0


def test_regex_that_does_not_compile(pd_backend):
    with pytest.raises(BadRequestError, match="does not compile"):
        pd_backend.client.request({"text": "hi", "sampling_params": {"max_new_tokens": 2, "regex": "(unclosed"}})


def test_negative_temperature_is_the_servers_400(pd_backend):
    with pytest.raises(BadRequestError, match="temperature"):
        pd_backend.client.request({"text": "hi", "sampling_params": {"max_new_tokens": 2, "temperature": -1}})
    assert _last_record(pd_backend).attempts == 1
    assert all(state["healthy"] for state in pd_backend.client.health().values())  # the caller's fault, not the server's


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_url_with_nothing_listening(cluster):
    dead = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match=f"cannot reach the prefill server {dead}"):
        PDBackend(prefill=[dead], decode=cluster.decode_urls)
    assert time.monotonic() - started < 10


def test_server_of_the_wrong_role(cluster):
    with pytest.raises(ConfigurationError, match="is a 'decode' server .* listed as prefill"):
        PDBackend(prefill=cluster.decode_urls, decode=cluster.prefill_urls)
    with pytest.raises(ConfigurationError, match="is a 'colocated' server .* listed as decode"):
        PDBackend(prefill=cluster.prefill_urls, decode=cluster.colocated_urls)


def test_malformed_url_and_empty_pools():
    with pytest.raises(ConfigurationError, match="must look like 'http://HOST:PORT'"):
        PDBackend(prefill=["localhost:30000"], decode=["http://127.0.0.1:1"])
    with pytest.raises(ConfigurationError, match="needs servers"):
        PDBackend()
