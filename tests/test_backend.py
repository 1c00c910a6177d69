"""backends.adapter._backend: PDBackend, the frontend seam (gen, stream, select, warm-ups, end_program)."""

import types

import pytest

from backends import PDBackend
from backends.errors import BadRequestError, ConfigurationError, StreamInterruptedError
from backends.testing import FakeServer
from tests._support import D1, P1, P2, make, make_client, params, state


def test_a_stream_never_iterated_sends_nothing_and_holds_no_load():
    p1, d1 = FakeServer("prefill"), FakeServer("decode", reply="abc")
    backend, _ = make({P1: p1, D1: d1})
    stream = backend.generate_stream(state(), params())
    assert p1.generated == [] and d1.generated == [] and backend.client.loads() == {}
    del stream
    assert backend.client.loads() == {}
    assert "".join(d for d, _ in backend.generate_stream(state(), params())) == "abc"
    assert backend.client.loads() == {}


def test_stream_yields_deltas_and_breaks_loudly():
    p1, d1 = FakeServer("prefill"), FakeServer("decode", reply="abcdef")
    backend, transport = make({P1: p1, D1: d1})
    chunks = [delta for delta, _ in backend.generate_stream(state(), params())]
    assert "".join(chunks) == "abcdef" and len(chunks) == 6

    def broken(method, path, body):
        if path == "/generate" and body.get("stream"):
            return 200, [{"text": "ab", "meta_info": {}}, ConnectionResetError("peer died")]
        return d1(method, path, body)

    transport.servers[D1] = broken
    stream = backend.generate_stream(state(), params())
    assert next(stream)[0] == "ab"
    with pytest.raises(StreamInterruptedError, match="after 2 characters"):
        next(stream)


def test_no_endpoint_attribute_and_no_concat_append():
    backend, _ = make({P1: FakeServer("prefill"), D1: FakeServer("decode")})
    assert not hasattr(backend, "endpoint")
    assert backend.support_concate_and_append is False


def test_end_program_spares_running_programs_and_aborts_orphans():
    p1, d1 = FakeServer("prefill"), FakeServer("decode")
    backend, _ = make({P1: p1, D1: d1})
    running = types.SimpleNamespace(sid="live", is_finished=False, use_thread=True)
    finished = types.SimpleNamespace(sid="dead", is_finished=True, use_thread=True)
    backend.client._inflight.tracker("live")(D1, ["rid-live"], True)
    backend.client._inflight.tracker("dead")(D1, ["rid-dead"], True)
    backend.end_program([running, finished])
    assert d1.aborted == ["rid-dead"]


def test_gen_sends_the_program_text_and_files_the_legs_under_the_program():
    p1, d1 = FakeServer("prefill"), FakeServer("decode", reply=" out")
    backend, _ = make({P1: p1, D1: d1})
    program = types.SimpleNamespace(text_="Q: 1+1?\nA:", sid="prog-7")
    seen = []
    original = backend.client._inflight.tracker

    def spying_tracker(name):
        seen.append(name)
        return original(name)

    backend.client._inflight.tracker = spying_tracker
    text, meta = backend.generate(program, params(max_new_tokens=3, stop="\n"))
    assert text == " out" and meta["finish_reason"] == {"type": "length"}
    sent = d1.generated[0]
    assert sent["text"] == "Q: 1+1?\nA:" and sent["sampling_params"]["max_new_tokens"] == 3
    assert sent["sampling_params"]["stop"] == "\n" and seen == ["prog-7"]
    assert [r.kind for r in backend.metrics.records()] == ["gen"]


def test_select_scores_every_choice_on_the_prefill_server_that_cached_the_prompt():
    p1, p2, d1 = FakeServer("prefill"), FakeServer("prefill"), FakeServer("decode")
    backend, _ = make({P1: p1, P2: p2, D1: d1})
    program = state("The sky is " * 20)
    decision = backend.select(program, ["blue", "green"], temperature=0.0)
    assert decision.decision in ("blue", "green")
    assert decision.meta_info["normalized_prompt_logprobs"] == [-1.0, -1.0]  # the fake's prompt logprob, merged
    records = backend.metrics.records()
    assert [r.kind for r in records] == ["select", "select"] and len({r.prefill for r in records}) == 1
    served = p1 if p1.generated else p2
    warm, scoring = served.generated
    assert warm["text"] == program.text_ and warm["sampling_params"]["max_new_tokens"] == 0
    assert scoring["text"] == [program.text_ + "blue", program.text_ + "green"]
    assert scoring["return_logprob"] is True and scoring["return_text_in_logprobs"] is True
    assert scoring["logprob_start_len"] == len(program.text_) // 4 - 2  # the fake counts 4 characters a token


def test_select_refuses_sampling_and_no_choices_before_sending():
    p1, d1 = FakeServer("prefill"), FakeServer("decode")
    backend, _ = make({P1: p1, D1: d1})
    with pytest.raises(BadRequestError, match="temperature 0"):
        backend.select(state(), ["a", "b"], temperature=0.7)
    with pytest.raises(BadRequestError, match="at least one choice"):
        backend.select(state(), [], temperature=0.0)
    assert p1.generated == [] and d1.generated == []


def test_fork_and_run_batch_warm_the_shared_text_with_one_token_pairs():
    p1, d1 = FakeServer("prefill"), FakeServer("decode")
    backend, _ = make({P1: p1, D1: d1})
    backend.commit_lazy_operations(state("shared history " * 10))
    backend.cache_prefix("few-shot block " * 10)
    assert [body["text"] for body in d1.generated] == ["shared history " * 10, "few-shot block " * 10]
    assert all(body["sampling_params"] == {"max_new_tokens": 1} for body in p1.generated + d1.generated)
    assert [r.kind for r in backend.metrics.records()] == ["warm", "warm"]


def test_a_backend_adapts_a_given_client_or_takes_urls_not_both():
    client, _ = make_client({P1: FakeServer("prefill"), D1: FakeServer("decode")})
    backend = PDBackend(client=client, chat_template="chatml")
    assert backend.client is client and backend.get_model_name() == "tiny"
    assert backend.metrics is client.metrics and backend.get_chat_template().name == "chatml"
    with pytest.raises(ConfigurationError, match="not both"):
        PDBackend(prefill=[P1], client=client)
    with pytest.raises(ConfigurationError, match="not both"):
        PDBackend(client=client, retry=None)
    backend.shutdown()
