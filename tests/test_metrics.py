"""backends.adapter._metrics: request records, running totals, percentiles and the Prometheus mirror."""

import pytest

from backends.adapter._metrics import Metrics, RequestRecord

P, D, C = "http://p:1", "http://d:1", "http://c:1"


def test_an_empty_summary_has_no_percentiles_and_no_hit_ratio():
    summary = Metrics().summary()
    assert summary["cache_hit_ratio"] == 0.0 and summary["by_server"] == {}
    for name in ("ttft", "prefill_latency", "decode_time", "total", "time_per_output_token"):
        assert summary[name] == {"p50": None, "p99": None, "mean": None}


def test_percentiles_pick_from_the_sorted_values():
    metrics = Metrics()
    for total in reversed(range(1, 101)):  # 100 .. 1: the order of arrival does not matter
        metrics.record(RequestRecord(kind="gen", total=float(total)))
    assert metrics.summary()["total"] == {"p50": 51.0, "p99": 100.0, "mean": 50.5}
    few = Metrics()
    for total in (3.0, 1.0, 2.0):
        few.record(RequestRecord(kind="gen", total=total))
    assert few.summary()["total"] == {"p50": 2.0, "p99": 3.0, "mean": 2.0}


def test_percentiles_skip_requests_that_did_not_measure_a_value():
    metrics = Metrics()
    metrics.record(RequestRecord(kind="gen", ttft=0.2))
    metrics.record(RequestRecord(kind="gen", ttft=None, error="PrefillFailedError: down"))
    assert metrics.summary()["ttft"] == {"p50": 0.2, "p99": 0.2, "mean": 0.2}


def test_hit_ratio_is_cached_over_prompt_tokens_of_every_request():
    metrics = Metrics()
    metrics.record(RequestRecord(kind="gen", prompt_tokens=100, cached_tokens=75))
    metrics.record(RequestRecord(kind="gen", prompt_tokens=300, cached_tokens=25))
    summary = metrics.summary()
    assert summary["cache_hit_ratio"] == pytest.approx(0.25)
    assert (summary["prompt_tokens"], summary["cached_tokens"]) == (400, 100)


def test_totals_count_requests_errors_retries_tokens_and_route_modes():
    metrics = Metrics()
    metrics.record(RequestRecord(kind="gen", attempts=3, completion_tokens=4))
    metrics.record(RequestRecord(kind="gen", mode="colocated", attempts=1, error="BadRequestError: no"))
    metrics.record(RequestRecord(kind="select", attempts=2, error="DecodeFailedError: down"))
    summary = metrics.summary()
    assert (summary["requests"], summary["errors"], summary["retries"]) == (3, 2, 3)
    assert summary["completion_tokens"] == 4
    assert (summary["route:pd"], summary["route:colocated"]) == (2, 1)


def test_a_request_refused_before_any_attempt_adds_no_retries():
    metrics = Metrics()
    metrics.record(RequestRecord(kind="native", attempts=0, error="BadRequestError: refused before sending"))
    assert metrics.summary()["retries"] == 0


def test_the_prometheus_mirror_records_a_request_refused_before_any_attempt():
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    Metrics(registry=registry).record(RequestRecord(kind="native", attempts=0, error="BadRequestError: refused"))
    assert registry.get_sample_value("sgl_pd_requests_total", {"mode": "pd", "outcome": "error"}) == 1.0
    assert registry.get_sample_value("sgl_pd_retries_total") == 0.0


def test_by_server_counts_each_role_a_request_used():
    metrics = Metrics()
    metrics.record(RequestRecord(kind="gen", prefill=P, decode=D))
    metrics.record(RequestRecord(kind="gen", prefill=P, decode=D))
    metrics.record(RequestRecord(kind="gen", mode="colocated", colocated=C))
    metrics.record(RequestRecord(kind="gen", error="NoHealthyServerError: none"))
    assert metrics.summary()["by_server"] == {P: 2, D: 2, C: 1}


def test_time_per_output_token_needs_two_tokens():
    assert RequestRecord(kind="gen", decode_time=0.9, completion_tokens=10).time_per_output_token == pytest.approx(0.1)
    assert RequestRecord(kind="gen", decode_time=0.9, completion_tokens=1).time_per_output_token is None
    assert RequestRecord(kind="gen", completion_tokens=10).time_per_output_token is None
    record = RequestRecord(kind="gen", decode_time=0.4, completion_tokens=3)
    assert record.as_dict()["time_per_output_token"] == pytest.approx(0.2) and record.as_dict()["kind"] == "gen"
    metrics = Metrics()
    metrics.record(record)
    metrics.record(RequestRecord(kind="gen", decode_time=0.4, completion_tokens=1))
    assert metrics.summary()["time_per_output_token"]["mean"] == pytest.approx(0.2)


def test_reset_forgets_records_and_totals():
    metrics = Metrics()
    metrics.record(RequestRecord(kind="gen", prefill=P, prompt_tokens=10, cached_tokens=5))
    metrics.reset()
    summary = metrics.summary()
    assert metrics.records() == [] and "requests" not in summary
    assert summary["cache_hit_ratio"] == 0.0 and summary["by_server"] == {}


def test_records_are_bounded_but_totals_count_everything():
    metrics = Metrics(keep=3)
    records = [RequestRecord(kind="gen", total=float(i), prefill=P) for i in range(5)]
    for record in records:
        metrics.record(record)
    assert metrics.records() == records[2:]
    summary = metrics.summary()
    assert summary["requests"] == 5  # running totals
    assert summary["total"]["mean"] == 3.0 and summary["by_server"] == {P: 3}  # from the records kept
    listed = metrics.records()
    listed.clear()
    assert len(metrics.records()) == 3  # a copy


def test_the_prometheus_mirror_counts_outcomes_retries_tokens_and_servers():
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    metrics.record(RequestRecord(kind="gen", prefill=P, decode=D, attempts=2, prompt_tokens=8, ttft=0.5, total=1.0))
    metrics.record(RequestRecord(kind="gen", mode="colocated", colocated=C, error="x", total=2.0))
    value = registry.get_sample_value
    assert value("sgl_pd_requests_total", {"mode": "pd", "outcome": "ok"}) == 1.0
    assert value("sgl_pd_requests_total", {"mode": "colocated", "outcome": "error"}) == 1.0
    assert value("sgl_pd_retries_total") == 1.0 and value("sgl_pd_tokens_total", {"kind": "prompt"}) == 8.0
    assert value("sgl_pd_server_requests_total", {"server": P, "role": "prefill"}) == 1.0
    assert value("sgl_pd_server_requests_total", {"server": C, "role": "colocated"}) == 1.0
    assert value("sgl_pd_ttft_seconds_count") == 1.0 and value("sgl_pd_request_seconds_count") == 2.0
    Metrics(registry=CollectorRegistry())  # a second adapter in its own registry does not collide
