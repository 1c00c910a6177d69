"""backends.adapter._transfer: KV transfer figures from SGLang's /metrics page (no servers)."""

from __future__ import annotations

from backends.adapter._transfer import TransferStats, parse_transfer_stats, read_transfer_stats, total
from backends.testing import FakeServer, InMemoryTransport

PAGE = """# HELP sglang:kv_transfer_latency_ms The transfer latency of the KV cache (ms)
# TYPE sglang:kv_transfer_latency_ms histogram
sglang:kv_transfer_latency_ms_bucket{engine_type="unified",le="1.0",model_name="m",tp_rank="0"} 3.0
sglang:kv_transfer_latency_ms_bucket{engine_type="unified",le="+Inf",model_name="m",tp_rank="0"} 4.0
sglang:kv_transfer_latency_ms_count{engine_type="unified",model_name="m",tp_rank="0"} 4.0
sglang:kv_transfer_latency_ms_sum{engine_type="unified",model_name="m",tp_rank="0"} 10.0
sglang:kv_transfer_latency_ms_count{engine_type="unified",model_name="m",tp_rank="1"} 2.0
sglang:kv_transfer_latency_ms_sum{engine_type="unified",model_name="m",tp_rank="1"} 8.0
# HELP sglang:kv_transfer_speed_gb_s The transfer speed of the KV cache (GB/s)
# TYPE sglang:kv_transfer_speed_gb_s histogram
sglang:kv_transfer_speed_gb_s_count{engine_type="unified",model_name="m",tp_rank="0"} 6.0
sglang:kv_transfer_speed_gb_s_sum{engine_type="unified",model_name="m",tp_rank="0"} 1.5
# HELP sglang:num_transfer_failed_reqs_total The number of transfer failed requests
# TYPE sglang:num_transfer_failed_reqs_total counter
sglang:num_transfer_failed_reqs_total{engine_type="unified",model_name="m",tp_rank="0"} 1.0
# HELP sglang:num_bootstrap_failed_reqs_total The number of bootstrap failed requests
# TYPE sglang:num_bootstrap_failed_reqs_total counter
sglang:num_bootstrap_failed_reqs_total{engine_type="unified",model_name="m",tp_rank="0"} 2.0
"""


def test_the_page_is_summed_over_label_sets_into_means_and_failure_counts():
    stats = parse_transfer_stats(PAGE)
    assert (stats.transfers, stats.transfer_failed, stats.bootstrap_failed) == (6, 1, 2)
    assert stats.mean_latency_ms == 3.0 and stats.mean_speed_gb_s == 0.25
    assert parse_transfer_stats("# nothing here\n") == TransferStats() and TransferStats().mean_latency_ms is None


def test_servers_without_metrics_are_none_and_left_out_of_the_total():
    def with_metrics(method, path, body):
        return (200, PAGE) if path == "/metrics" else FakeServer("prefill")(method, path, body)

    transport = InMemoryTransport({"http://a:1": with_metrics, "http://b:1": FakeServer("decode")})
    per = read_transfer_stats(transport, ["http://a:1", "http://b:1", "http://gone:1"])
    assert per["http://b:1"] is None and per["http://gone:1"] is None  # no /metrics page; unreachable
    assert total(per.values()) == per["http://a:1"] and total(per.values()).transfers == 6
