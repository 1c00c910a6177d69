"""A client for PD servers that already run elsewhere: check them, then run programs on them.

Example::

    python -m recipes.simple_client --prefill http://10.0.0.1:30000 http://10.0.0.2:30000 \\
        --decode http://10.0.0.3:30000 [--colocated http://10.0.0.4:30000]

First the troubleshooting view: every server's ``/health`` and ``/model_info``
in one table (URL, the role it was listed as, the role it reports through
``disaggregation_mode``, its model, healthy or not). If a server is down, has
another role than listed, or serves another model, it says which and exits 1
before sending any work. Otherwise it runs a few ``sgl_programs`` through
``PDBackend`` and prints what came back.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from backends import (
    HttpxTransport,
    PDBackend,
    PDError,
    Timeouts,
    Transport,
    describe_server,
    is_tiny_model,
)
from sgl_programs import chat_completion, classify, extract_regex


@dataclass
class ServerCheck:
    url: str
    listed_as: str
    role: str = "?"
    model: str = "?"
    healthy: bool = False
    problem: str = ""


def check_server(transport: Transport, url: str, listed_as: str, timeouts: Timeouts) -> ServerCheck:
    """Ask one server for its role and model (the library's discovery) and its health."""
    check = ServerCheck(url=url.rstrip("/"), listed_as=listed_as)
    try:
        info = describe_server(transport, url, timeouts)
        check.healthy = transport.request("GET", f"{info.url}/health", timeouts=timeouts).ok
    except PDError as exc:
        check.problem = f"unreachable or not an SGLang server ({exc})"
        return check
    check.role, check.model = info.role, info.model_path
    if check.role != listed_as:
        check.problem = f"listed as {listed_as} but it is a {check.role} server; move it to --{check.role}"
    elif not check.healthy:
        check.problem = "GET /health failed: the server is up but cannot generate; see its log"
    return check


def print_table(checks: list[ServerCheck]) -> None:
    rows = [("URL", "LISTED AS", "ACTUAL ROLE", "MODEL", "HEALTHY")]
    rows += [(c.url, c.listed_as, c.role, _short(c.model), "yes" if c.healthy else "NO") for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _short(model: str, width: int = 40) -> str:
    return model if len(model) <= width else "..." + model[-(width - 3):]


def problems(checks: list[ServerCheck]) -> list[str]:
    """Every reason not to send work: per server, and a model mismatch across servers."""
    found = [f"{c.url}: {c.problem}" for c in checks if c.problem]
    models = {c.model for c in checks if c.role != "?"}
    if len(models) > 1:
        found.append(f"the servers serve different models: {sorted(models)}; PD needs one model")
    return found


def run_programs(backend: PDBackend) -> None:
    """A chat reply, a classification and a regex extraction through the adapter."""
    chat = chat_completion.run(messages=[{"role": "user", "content": "Say hello to the cluster."}],
                               max_tokens=16, backend=backend)
    print(f"chat_completion -> {_result(chat, 'reply')}")
    label = classify.run(text="The servers answered quickly.", labels=["fast", "slow"],
                         instruction="Is the text about something fast or slow?", backend=backend)
    print(f"classify        -> {_result(label, 'label')}")
    phone = extract_regex.run(text="Call the on-call engineer at 555-0100.", pattern=r"\d{3}-\d{4}",
                              instruction="Extract the phone number.", backend=backend)
    print(f"extract_regex   -> {_result(phone, 'value')}")
    for record in backend.metrics.records():
        where = f"{record.prefill} -> {record.decode}" if record.mode == "pd" else record.colocated
        print(f"  {record.kind:<6} {where}  {record.total:.3f}s  {record.error or 'ok'}")


def _result(state, var: str) -> str:
    return f"ERROR {state.error()}" if state.error() is not None else repr(state[var])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m recipes.simple_client",
        description="Check already-running SGLang servers (health, role, model), print a table, "
                    "and if all is right run a few programs through PDBackend. Exits 1 naming "
                    "the server and the problem otherwise.")
    p.add_argument("--prefill", nargs="+", default=[], metavar="URL", help="prefill server URLs")
    p.add_argument("--decode", nargs="+", default=[], metavar="URL", help="decode server URLs")
    p.add_argument("--colocated", nargs="+", default=[], metavar="URL", help="ordinary (colocated) server URLs")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds per check request (default 15)")
    args = p.parse_args(argv)
    if bool(args.prefill) != bool(args.decode):
        p.error("PD needs both --prefill and --decode servers")
    if not (args.prefill or args.colocated):
        p.error("give --prefill and --decode URLs, and/or --colocated URLs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    listed = [(url, role) for role in ("prefill", "decode", "colocated") for url in getattr(args, role)]
    transport = HttpxTransport(max_connections=4)
    try:
        limits = Timeouts(connect=3.0, first_byte=args.timeout, total=args.timeout)
        checks = [check_server(transport, url, role, limits) for url, role in listed]
    finally:
        transport.close()
    print_table(checks)
    found = problems(checks)
    if found:
        print("\nerror: not sending any work:", file=sys.stderr)
        for problem in found:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print("\nAll servers healthy, in the right roles, on one model.")
    if any(is_tiny_model(c.model) for c in checks):
        print("NOTE: the model is the random tiny test model: its text is nonsense; the serving path is real.")
    try:
        with PDBackend(prefill=args.prefill, decode=args.decode, colocated=args.colocated,
                       timeouts=Timeouts(connect=3.0, first_byte=60.0, total=120.0)) as backend:
            run_programs(backend)
    except PDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
