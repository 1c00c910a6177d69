"""backends.adapter._servers: what each server is (role, model, bootstrap port, DP ranks) and pool checks."""

import logging

import pytest

from backends.adapter._servers import ServerInfo, describe_server, discover, discover_pools, normalize_url
from backends.adapter._transport import Timeouts
from backends.errors import ConfigurationError
from backends.testing import FakeServer, InMemoryTransport
from tests._support import C1, D1, P1, P2

T = Timeouts()


def _pools(servers, **given):
    return discover_pools(InMemoryTransport(servers), given, T)


# ----- describe_server ----------------------------------------------------------------


def test_describe_server_reads_each_role_and_the_prefill_bootstrap_endpoint():
    transport = InMemoryTransport({P1: FakeServer("prefill", model="m", bootstrap_port=8998),
                                   D1: FakeServer("decode", model="m"), C1: FakeServer("colocated", model="m")})
    assert describe_server(transport, P1, T) == ServerInfo(P1, "prefill", "m", "p1", 8998)
    assert describe_server(transport, D1, T) == ServerInfo(D1, "decode", "m", "d1", None)
    assert describe_server(transport, C1, T) == ServerInfo(C1, "colocated", "m", "c1", None)
    assert transport.paths(P1) == ["/model_info", "/server_info"]
    assert transport.paths(D1) == ["/model_info"]  # decode caches nothing worth routing on
    assert transport.paths(C1) == ["/model_info", "/server_info"]  # its KV-event endpoints and tokenizer


def test_a_server_without_a_disaggregation_mode_is_colocated_and_an_unknown_one_is_refused():
    modes = {"mode": None}

    def server(method, path, body):
        info = {"model_path": "m"}
        if modes["mode"] != "absent":
            info["disaggregation_mode"] = modes["mode"]
        return 200, info

    transport = InMemoryTransport({C1: server})
    assert describe_server(transport, C1, T).role == "colocated"
    modes["mode"] = "absent"
    assert describe_server(transport, C1, T).role == "colocated"
    modes["mode"] = "encode"
    with pytest.raises(ConfigurationError, match="unknown disaggregation_mode='encode'"):
        describe_server(transport, C1, T)


def test_describe_server_refuses_what_is_not_an_sglang_server():
    transport = InMemoryTransport({C1: lambda method, path, body: (404, {"error": {"message": "Not Found"}}),
                                   P1: lambda method, path, body: (200, {"model_path": "m", "disaggregation_mode": "prefill"}
                                                                   if path == "/model_info" else {})})
    with pytest.raises(ConfigurationError, match="answered HTTP 404: Not Found; is this an SGLang server"):
        describe_server(transport, C1, T)
    with pytest.raises(ConfigurationError, match="did not report a bootstrap port"):
        describe_server(transport, P1, T)
    with pytest.raises(ConfigurationError, match=r"cannot reach http://x:1: .*Is it running"):
        describe_server(transport, "http://x:1", T)


def test_urls_are_normalized_and_malformed_ones_refused():
    assert normalize_url(" http://h:1/ ") == "http://h:1"
    assert normalize_url("https://h:1/base/") == "https://h:1/base"
    for bad in ["h:1", "ftp://h:1", "http://", 30000]:
        with pytest.raises(ConfigurationError, match="server URL"):
            normalize_url(bad)
    transport = InMemoryTransport({D1: FakeServer("decode")})
    assert describe_server(transport, D1 + "/", T).url == D1


# ----- DP ranks -----------------------------------------------------------------------


def _prefill(dp_size, attention=False, method="follow_bootstrap_room"):
    server = FakeServer("prefill")
    server.dp_size, server.enable_dp_attention, server.load_balance_method = dp_size, attention, method
    return describe_server(InMemoryTransport({P1: server}), P1, T)


def test_dp_ranks_come_from_server_info():
    assert (_prefill(1).dp_ranks, _prefill(1).serving_ranks) == (1, (0,))
    assert (_prefill(4, attention=True).dp_ranks, _prefill(4, attention=True).serving_ranks) == (4, (0, 1, 2, 3))
    assert (_prefill(2).dp_ranks, _prefill(2).serving_ranks) == (2, (0,))  # plain DP: rank 0 only
    assert _prefill(4, attention=True, method="auto").dp_ranks == 4
    assert _prefill(4, attention=True, method=None).dp_ranks == 4
    assert _prefill(4, attention=True, method="round_robin").dp_ranks == 1  # rooms do not pick the rank
    assert _prefill(4, method="shortest_queue").serving_ranks == (0,)
    assert _prefill("not a number").dp_ranks == 1 and _prefill(None).dp_ranks == 1


def test_discovering_a_plain_dp_prefill_warns_that_only_rank_zero_serves(caplog):
    server = FakeServer("prefill")
    server.dp_size = 2
    with caplog.at_level(logging.WARNING, logger="backends.adapter._servers"):
        info = discover(InMemoryTransport({P1: server}), P1, "prefill", T)
    assert info.dp_ranks == 2 and "plain --dp-size 2" in caplog.text and P1 in caplog.text


# ----- discover and discover_pools ----------------------------------------------------


def test_a_server_listed_under_the_wrong_role_is_refused_with_the_fix():
    transport = InMemoryTransport({P1: FakeServer("decode"), C1: FakeServer("colocated")})
    with pytest.raises(ConfigurationError) as caught:
        discover(transport, P1, "prefill", T)
    assert str(caught.value) == (
        "http://p1:1 is a 'decode' server (disaggregation_mode='decode') but was listed as prefill; "
        "move it to the decode list or restart it with --disaggregation-mode prefill")
    assert caught.value.server == P1
    with pytest.raises(ConfigurationError, match=r"'colocated' server \(disaggregation_mode='null'\) but was listed "
                                                 r"as decode; move it to the colocated list or restart it with "
                                                 r"--disaggregation-mode decode"):
        discover(transport, C1, "decode", T)


def test_an_unreachable_server_is_named_with_the_role_it_was_listed_as():
    with pytest.raises(ConfigurationError, match="cannot reach the decode server http://d1:1"):
        discover(InMemoryTransport({}), D1, "decode", T)


def test_discover_pools_describes_every_role():
    pools = _pools({P1: FakeServer("prefill"), P2: FakeServer("prefill"), D1: FakeServer("decode"),
                    C1: FakeServer("colocated")}, prefill=[P1, P2], decode=D1, colocated=[C1 + "/"])
    assert [s.url for s in pools["prefill"]] == [P1, P2]
    assert [s.url for s in pools["decode"]] == [D1] and [s.url for s in pools["colocated"]] == [C1]
    assert {s.role for servers in pools.values() for s in servers} == {"prefill", "decode", "colocated"}
    assert _pools({C1: FakeServer("colocated")}, colocated=[C1])["prefill"] == []


@pytest.mark.parametrize("given, message", [
    ({"prefill": [P1]}, "PD needs both prefill and decode servers; no decode server was given"),
    ({"decode": [D1], "colocated": [C1]}, "no prefill server was given"),
    ({}, "needs servers"),
    ({"prefill": [], "decode": None, "colocated": ()}, "needs servers"),
    ({"colocated": 30000}, "colocated must be a list of URLs, got 30000"),
])
def test_malformed_pools_are_refused_before_any_server_is_asked(given, message):
    transport = InMemoryTransport({})
    with pytest.raises(ConfigurationError, match=message):
        discover_pools(transport, given, T)
    assert transport.calls == []


def test_a_server_listed_twice_is_refused_also_across_roles_and_spellings():
    servers = {P1: FakeServer("prefill"), D1: FakeServer("decode"), C1: FakeServer("colocated")}
    with pytest.raises(ConfigurationError, match=r"servers listed more than once: \['http://c1:1'\]"):
        _pools(servers, prefill=[P1], decode=[D1], colocated=[C1, C1 + "/"])
    with pytest.raises(ConfigurationError, match=r"more than once: \['http://p1:1'\]"):
        _pools(servers, prefill=[P1], decode=[D1], colocated=[P1])


def test_servers_of_different_models_are_refused_naming_each():
    servers = {P1: FakeServer("prefill", model="a"), D1: FakeServer("decode", model="b"),
               C1: FakeServer("colocated", model="a")}
    with pytest.raises(ConfigurationError, match="all servers must serve one model; found "
                                                 "http://p1:1=a, http://d1:1=b, http://c1:1=a"):
        _pools(servers, prefill=[P1], decode=[D1], colocated=[C1])
