"""A data-parallel prefill server (``--dp-size 2``) through the adapter, on real servers.

SGLang dispatches a PD prefill request to rank ``bootstrap_room % dp_size``.
With plain ``--dp-size`` (no DP attention, the only kind that runs on CPU),
SGLang 0.5.23's KV sender fails every request that lands on a rank other
than 0, so rooms chosen without regard to ranks (consecutive or random, as
sglang-router's) fail about half the requests. The adapter sees the server's
DP layout and sends it rank-0 rooms only, a ``select``'s items included (room
stride = dp_size). Rank choice among several serving ranks (DP attention,
GPU-only) is unit-tested in tests/test_router.py.

Its own small cluster (1 DP-2 prefill + 1 decode, ~6 GB), started for this
module only.
"""

from __future__ import annotations

import os

import pytest
import sglang as sgl

from tests._support import wait_until

from backends import PDBackend, PDCluster, SGLangPDConfig

COLORS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def dp_backend(tmp_path_factory):
    base = int(os.environ.get("SGLPD_TEST_BASE_PORT", 30000)) + 500
    config = SGLangPDConfig(pd_ratio=(1, 1), base_port=base, prefill_args=["--dp-size", "2"])
    with PDCluster(config, log_dir=tmp_path_factory.mktemp("dp-server-logs")) as cluster:
        backend = PDBackend(**cluster.urls())
        yield backend
        backend.shutdown()


def test_the_adapter_reads_the_dp_layout(dp_backend):
    prefill = dp_backend.client.pools["prefill"][0]
    assert prefill.dp_ranks == 2 and prefill.serving_ranks == (0,)


def test_every_request_succeeds_and_a_conversation_hits_its_cache(dp_backend):
    history, previous_prompt = "System: you are a ship's log.\n", 0
    for turn in range(5):
        history += f"User: entry {turn} " + "wind north, sea calm, course steady. " * 8 + "\nAssistant:"
        answer = dp_backend.client.request({"text": history, "sampling_params": {"temperature": 0, "max_new_tokens": 3}})
        history += answer["text"] + "\n"
        if turn:  # the whole previous turn's prompt was cached on the rank that served it
            assert answer["meta_info"]["cached_tokens"] >= 0.9 * previous_prompt, (turn, answer["meta_info"])
        previous_prompt = answer["meta_info"]["prompt_tokens"]
    for i in range(6):  # distinct prompts: consecutive rooms would put every other one on rank 1
        answer = dp_backend.client.request({"text": f"Unrelated prompt number {i}. " * 6,
                                     "sampling_params": {"max_new_tokens": 2}})
        assert answer["meta_info"]["completion_tokens"] == 2
    records = dp_backend.metrics.records()
    assert all(r.error is None and r.attempts == 1 for r in records)
    assert all("@dp0:" in r.route_reason for r in records)
    # Each rank's radix cache publishes its own events: rank 0 holds what was served, rank 1 nothing.
    url = dp_backend.client.pools["prefill"][0].url
    assert wait_until(lambda: dp_backend.client.cache_status()[f"{url}#dp0"]["blocks"] > 0, 30)
    status = dp_backend.client.cache_status()
    assert set(status) == {f"{url}#dp0", f"{url}#dp1"}
    assert status[f"{url}#dp0"]["index"] == status[f"{url}#dp1"]["index"] == "events"
    assert status[f"{url}#dp1"]["blocks"] == 0
    assert all("events)" in r.route_reason for r in records), [r.route_reason for r in records]


@sgl.function
def pick_color(s, question):
    s += "Question: " + question + "\nAnswer: "
    s += sgl.select("color", choices=COLORS)


def test_select_through_a_dp_prefill_matches_colocated(dp_backend, colocated_backend):
    for question in ["What colour is the sky?", "Pick one."]:
        dp = pick_color.run(question=question, backend=dp_backend)
        ref = pick_color.run(question=question, backend=colocated_backend)
        assert dp.error() is None and dp["color"] == ref["color"]
        assert dp.get_meta_info("color")["normalized_prompt_logprobs"] == ref.get_meta_info("color")[
            "normalized_prompt_logprobs"]
