"""KV transfer overhead as the PD servers measure it (``--enable-metrics``), read through the client."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from backends import PDClient


def test_each_pd_request_adds_a_measured_transfer_on_its_prefill_server(cluster, pd_backend):
    client = pd_backend.client
    before = client.transfer_stats()
    assert set(before["servers"]) == set(cluster.prefill_urls + cluster.decode_urls)
    client.request({"text": "The ledger of the harbour, entry by entry. " * 8,
                    "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
    served_by = client.metrics.records()[-1].prefill
    after = client.transfer_stats()
    grew = {url for url, stats in after["servers"].items()
            if stats and before["servers"][url] and stats["transfers"] > before["servers"][url]["transfers"]}
    assert grew == {served_by}  # the sender measures; decode servers count failures only
    assert after["all"]["transfers"] == before["all"]["transfers"] + 1
    assert after["all"]["mean_latency_ms"] > 0 and after["all"]["mean_speed_gb_s"] > 0


def test_the_prometheus_export_mirrors_the_servers_transfer_figures(cluster):
    registry = CollectorRegistry()
    client = PDClient(prefill=cluster.prefill_urls, decode=cluster.decode_urls, metrics_registry=registry)
    try:
        client.request({"text": "A short note on the tide.", "sampling_params": {"max_new_tokens": 2}})
        page = generate_latest(registry).decode()
        lines = [line for line in page.splitlines() if line.startswith("sgl_pd_kv_transfers{")]
        assert {line.split('"')[1] for line in lines} == set(cluster.prefill_urls + cluster.decode_urls)
        assert sum(float(line.rsplit(" ", 1)[1]) for line in lines) >= 1
    finally:
        client.close()
