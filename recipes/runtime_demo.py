"""Start SGLang runtimes from Python, run programs on them, stop them: the in-process API.

Examples::

    python -m recipes.runtime_demo --simple     # one ordinary (colocated) server, one generation
    python -m recipes.runtime_demo              # a prefill and a decode runtime, several programs

``PDCluster`` is the runtime: a context manager that starts the servers,
waits until they are healthy and stops them on exit, exceptions and Ctrl-C.
``PDBackend(**cluster.urls())`` connects a backend to them; after
``sgl.set_default_backend(...)`` every ``@sgl.function`` runs on it without
a ``backend=`` argument.
"""

from __future__ import annotations

import argparse
import sys
import time

import sglang as sgl

from backends import ClusterStartError, PDBackend, PDCluster, SGLangPDConfig
from recipes._demo import TINY_MODEL_NOTE
from sgl_programs import (
    Conversation,
    ask_document,
    chat_completion,
    classify,
    draft_and_judge,
    extract_json,
    stream_text,
)

_PERSON = {"type": "object", "required": ["name", "role"], "additionalProperties": False,
           "properties": {"name": {"type": "string", "maxLength": 16}, "role": {"enum": ["keeper", "sailor"]}}}


def simple(config: SGLangPDConfig, max_tokens: int) -> None:
    """One colocated runtime, one generation and how long it took."""
    with PDCluster(config) as cluster, PDBackend(**cluster.urls()) as backend:
        print(f"Runtime up: {cluster.colocated_urls[0]}")
        started = time.monotonic()
        state = chat_completion.run(messages=[{"role": "user", "content": "Say something about runtimes."}],
                                    max_tokens=max_tokens, backend=backend)
        error = state.error()  # run() returns at once; this waits for the program to finish
        elapsed = time.monotonic() - started
        if error is not None:
            raise error
        meta = state.get_meta_info("reply")
        print(f"reply: {state['reply']!r}")
        print(f"Generated {meta['completion_tokens']} tokens in {elapsed:.3f}s")


def programs(config: SGLangPDConfig, max_tokens: int) -> None:
    """A prefill and a decode runtime as the default backend of several programs."""
    with PDCluster(config) as cluster:
        print(f"Runtimes up: prefill {cluster.prefill_urls[0]}, decode {cluster.decode_urls[0]}")
        backend = PDBackend(**cluster.urls())
        sgl.set_default_backend(backend)
        try:
            _run_programs(max_tokens)
        finally:
            backend.shutdown()
        summary = backend.metrics.summary()
        print(f"\n{summary['requests']} requests, {summary['errors']} errors, "
              f"cache hit ratio {summary['cache_hit_ratio']:.0%}")


def _run_programs(max_tokens: int) -> None:
    chat = Conversation(system="You are a lighthouse keeper.", max_tokens=max_tokens)
    print(f"\n[Conversation] turn 1: {chat.ask('What do you see tonight?')!r}")
    print(f"[Conversation] turn 2: {chat.ask('And the ships?')!r} "
          f"(cached {chat.last_state.get_meta_info('reply')['cached_tokens']} prompt tokens)")
    print("[stream_text] ", end="")
    for chunk in stream_text(chat_completion, "reply", messages=[{"role": "user", "content": "A sea shanty."}],
                             max_tokens=max_tokens):
        print(chunk, end="", flush=True)
    print()
    label = classify.run(text="The storm broke the lamp.", labels=["good news", "bad news"])
    print(f"[classify] {label['label']!r}")
    person = extract_json.run(text="Ada keeps the light.", schema=_PERSON, compact=True, max_tokens=32)
    print(f"[extract_json] {person.ret_value!r}")
    drafts = draft_and_judge.run(task="Name the lighthouse.", num_drafts=3, max_tokens=8)
    print(f"[draft_and_judge] drafts {drafts['draft']!r} -> best {drafts['best']}")
    answers = ask_document("The lighthouse was built in 1874 and automated in 1986. " * 10,
                           ["When was it built?", "When was it automated?"], max_tokens=8, progress_bar=False)
    print(f"[ask_document] {answers.values('answer')!r} "
          f"(cached {[s.get_meta_info('answer')['cached_tokens'] for s in answers.states]} tokens)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m recipes.runtime_demo",
        description="Start SGLang runtimes from Python with PDCluster (a context manager), run "
                    "programs from sgl_programs on them, and stop them.")
    p.add_argument("--simple", action="store_true",
                   help="one colocated runtime and one generation, instead of a PD pair and several programs")
    p.add_argument("--model", help="model path or Hugging Face id (default: the random tiny model)")
    p.add_argument("--base-port", type=int, default=30300, help="first server port (default 30300)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per generation (default 24)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = dict(pd_ratio=(0, 0), colocated=1) if args.simple else dict(pd_ratio=(1, 1))
    try:
        config = SGLangPDConfig(model_path=args.model, base_port=args.base_port, **shape)
        if config.is_tiny_model:
            print(TINY_MODEL_NOTE)
        print(f"Starting {config.num_servers} runtime(s) (about a minute on CPU)...", flush=True)
        (simple if args.simple else programs)(config, args.max_tokens)
    except (ClusterStartError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted; runtimes stopped.")
        return 130
    print("Runtimes stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
