"""Start, watch and stop the SGLang servers of one :class:`SGLangPDConfig`.

Why: tests, benchmarks and recipes need real PD servers that come up
together, fail loudly with the log that explains why, and never outlive the
Python process that started them (a leaked CPU server holds ~3.5 GB).

Each server runs in its own session (``start_new_session=True``), so one
``killpg`` reaches its scheduler and detokenizer too, and a terminal's Ctrl-C
reaches only this process, which then stops the servers in order. Stopping
runs on ``stop()``, context exit, exceptions during start-up, ``atexit`` and
SIGINT/SIGTERM (handlers chain to the previous ones); a small reaper process
(:mod:`backends.launcher._reaper`) covers the launcher dying by SIGKILL.
A supervisor thread (:mod:`backends.launcher._supervisor`) restarts servers
that exit or whose transfer thread dies; ``kill()`` leaves them dead.
"""

from __future__ import annotations

import atexit
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from backends.errors import ClusterStartError, ConfigurationError
from backends.launcher import _process
from backends.launcher._config import SGLangPDConfig
from backends.launcher._launch_plan import ServerSpec, plan_servers
from backends.launcher._process import ManagedProcess
from backends.launcher._supervisor import Gate, RestartEvent, Supervisor
from backends.launcher._tiny_model import ensure_tiny_model

__all__ = ["PDCluster"]

_REAPER = Path(__file__).resolve().with_name("_reaper.py")


class PDCluster:
    """The running servers of one config; a context manager.

    Parameters
    ----------
    config : SGLangPDConfig, optional
        What to launch; default ``SGLangPDConfig()`` (1:1 on the tiny model).
    log_dir : path-like, optional
        Folder for one ``<role>-<index>.log`` per server; default a new temp
        folder (kept after stop so logs can be read).
    startup_timeout : float
        Seconds for all servers to answer ``GET /health`` with 200.
    stop_timeout : float
        Seconds between SIGTERM and SIGKILL when stopping.
    supervise : bool
        Restart a server that exits or logs SGLang's transfer-thread death (see :meth:`restarts`).
    max_restarts : int
        Attempts per server within 10 minutes (after 1, 2, 4 ... s); then it stays down.

    Raises
    ------
    ConfigurationError
        A bad timeout, or a plan the config cannot make (e.g. too few GPUs).
    """

    def __init__(self, config: SGLangPDConfig | None = None, log_dir=None,
                 startup_timeout: float = 300.0, stop_timeout: float = 15.0,
                 supervise: bool = True, max_restarts: int = 3) -> None:
        for name, value in (("startup_timeout", startup_timeout), ("stop_timeout", stop_timeout)):
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}.")
        if not isinstance(max_restarts, int) or isinstance(max_restarts, bool) or max_restarts < 0:
            raise ConfigurationError(f"max_restarts must be an int >= 0, got {max_restarts!r}.")
        self.supervise, self.max_restarts = bool(supervise), max_restarts
        self.config = config if config is not None else SGLangPDConfig()
        self.startup_timeout = float(startup_timeout)
        self.stop_timeout = float(stop_timeout)
        self._specs = plan_servers(self.config)
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="sgl-pd-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._procs: dict[str, ManagedProcess] = {}
        self._reaper: subprocess.Popen | None = None
        self._prev_handlers: dict[int, object] = {}
        self._stopping = False
        self._deferred_signal: int | None = None
        self._gate = Gate([s.name for s in self._specs])  # shared with the supervisor thread
        self._supervisor: Supervisor | None = None
        self._reaper_lock = threading.Lock()  # both threads write to the reaper's pipe

    # ----- addresses ---------------------------------------------------------------
    @property
    def servers(self) -> list[ServerSpec]:
        return list(self._specs)

    def _urls(self, role: str) -> list[str]:
        return [s.url for s in self._specs if s.role == role]

    @property
    def prefill_urls(self) -> list[str]:
        return self._urls("prefill")

    @property
    def decode_urls(self) -> list[str]:
        return self._urls("decode")

    @property
    def colocated_urls(self) -> list[str]:
        return self._urls("colocated")

    @property
    def prefill_bootstrap_ports(self) -> list[int]:
        """Bootstrap port of each prefill server, in ``prefill_urls`` order."""
        return [s.bootstrap_port for s in self._specs if s.role == "prefill"]

    @property
    def is_tiny_model(self) -> bool:
        return self.config.is_tiny_model

    def spec(self, role: str, index: int) -> ServerSpec:
        """The :class:`ServerSpec` of server ``role``/``index``."""
        for s in self._specs:
            if (s.role, s.index) == (role, index):
                return s
        raise ConfigurationError(f"No {role} server with index {index} in this cluster; it has {[s.name for s in self._specs]}.")

    def log_path(self, server: ServerSpec | str) -> Path:
        """Log file of a server, given its spec or its name (``"decode-0"``)."""
        return self.log_dir / f"{server.name if isinstance(server, ServerSpec) else server}.log"

    def exited(self) -> dict[str, int]:
        """Servers whose main process has exited, by name, with exit codes."""
        codes = {name: proc.exit_code() for name, proc in list(self._procs.items())}  # list(): other threads
        return {name: code for name, code in codes.items() if code is not None}

    def down(self) -> list[str]:
        """Servers not running now, by name: exited, given up on, or killed by :meth:`kill` (no exit code)."""
        return [s.name for s in self._specs
                if (proc := self._procs.get(s.name)) is None or not proc.running()]

    def pid(self, role: str, index: int) -> int | None:
        """Pid (also the process group id) of a server's main process; ``None`` once stopped."""
        proc = self._procs.get(self.spec(role, index).name)
        return proc.pid if proc is not None else None

    def restarts(self) -> list[RestartEvent]:
        """The supervisor's restart attempts since the last ``start()``, oldest first."""
        return self._supervisor.events() if self._supervisor is not None else []

    def urls(self) -> dict[str, list[str]]:
        """Server URLs by role, as the adapter takes them: ``PDBackend(**cluster.urls())``."""
        return {"prefill": self.prefill_urls, "decode": self.decode_urls, "colocated": self.colocated_urls}

    # ----- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> "PDCluster":
        return self if self._procs else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "PDCluster":
        """Launch every server and wait until all are healthy.

        A random model (tiny, prefill-bound) is built first when the config asks for it (once per machine).

        Raises
        ------
        ClusterStartError
            Already started, a port is taken, or a server exited or stayed
            unhealthy; every server already started is stopped first.
        """
        if self._procs:
            raise ClusterStartError("PDCluster.start(): already started; call stop() first.")
        for spec in self._specs:
            _process.require_free_ports(spec, ClusterStartError)
        if self.config.random_model_kind is not None:
            ensure_tiny_model(kind=self.config.random_model_kind)
        self._install_exit_hooks()
        try:
            for spec in self._specs:
                self._launch(spec)
            self._wait_healthy(self._specs)
        except BaseException:
            self.stop()
            raise
        self._supervisor = Supervisor(self, self._gate, self.max_restarts).start() if self.supervise else None
        return self

    def stop(self) -> None:
        """Stop the supervisor, then every server (SIGTERM, SIGKILL after ``stop_timeout``). Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        self._gate.closing.set()  # a restart in progress ends at its next step and stops what it started
        try:
            if self._supervisor is not None:
                self._supervisor.stop(2 * self.stop_timeout + 60.0)  # > one restart's stop + ports + stop
            pids = [proc.pid for proc in self._procs.values()]
            _process.stop_all(list(self._procs.values()), self.stop_timeout)
            for pid in pids:
                self._tell_reaper(f"-{pid}")
            self._procs.clear()
            if self._reaper is not None:
                self._reaper.stdin.close()
                _process.wait_quietly(self._reaper, 5.0)
                self._reaper = None
        finally:
            self._remove_exit_hooks()
            self._gate.reset()  # nothing held, not closing: ready for start()
            self._stopping = False
        if self._deferred_signal is not None:
            signum, self._deferred_signal = self._deferred_signal, None
            signal.raise_signal(signum)

    # ----- fault injection -------------------------------------------------------------
    def kill(self, role: str, index: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a server's whole process group (fault injection).

        For SIGKILL/SIGTERM, waits until every process of the group is gone. The
        supervisor leaves it down until :meth:`restart` (SIGSTOP/SIGTSTP/SIGCONT aside);
        to fake a crash it restarts, signal :meth:`pid` yourself.

        Raises
        ------
        ClusterStartError
            The server is not running.
        """
        spec = self.spec(role, index)
        with self._gate.lock(spec.name):  # the supervisor cannot be between its checks and a restart
            proc = self._procs.get(spec.name)
            if proc is None:
                raise ClusterStartError(f"{spec.name} is not running; start() or restart() it first.")
            if sig not in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGCONT):  # a pause is not "down"
                self._gate.held.add(spec.name)
            proc.signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self._stop_one(proc)

    def restart(self, role: str, index: int) -> None:
        """Restart one server on the same ports (its log appended) and wait until it is healthy.

        Also the supervisor's restart path, and the way back after ``kill()`` or exhausted restarts.

        Raises
        ------
        ClusterStartError
            Its ports stayed taken, or it exited or stayed unhealthy (it is
            stopped again, and the supervisor leaves it down).
        """
        spec = self.spec(role, index)
        with self._gate.lock(spec.name):
            self._gate.held.discard(spec.name)
            old = self._procs.pop(spec.name, None)
            if old is not None:
                self._stop_one(old)
            try:
                _process.wait_ports_free(spec, 30.0, ClusterStartError)
                self._launch(spec, append=True)
                self._wait_healthy([spec])
            except BaseException:
                self._gate.held.add(spec.name)
                failed = self._procs.pop(spec.name, None)
                if failed is not None:
                    self._stop_one(failed)
                raise

    # ----- internals -------------------------------------------------------------------
    def _launch(self, spec: ServerSpec, append: bool = False) -> None:
        if self._gate.closing.is_set():  # stop() has begun: start nothing it could miss
            raise ClusterStartError(f"{spec.name} not launched: the cluster is stopping.")
        if self._reaper is None:
            self._reaper = subprocess.Popen(
                [sys.executable, str(_REAPER), str(self.stop_timeout)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True, text=True)
        proc = ManagedProcess(spec.name, spec.argv, self.log_path(spec), spec.env).start(append=append)
        self._procs[spec.name] = proc
        self._tell_reaper(f"+{proc.pid}")

    def _stop_one(self, proc: ManagedProcess) -> None:
        pid = proc.pid
        proc.stop(self.stop_timeout)
        self._tell_reaper(f"-{pid}")  # only once gone: the reaper still covers a launcher killed meanwhile

    def _tell_reaper(self, line: str) -> None:
        with self._reaper_lock:
            if self._reaper is not None and self._reaper.stdin and not self._reaper.stdin.closed:
                try:
                    self._reaper.stdin.write(line + "\n")
                    self._reaper.stdin.flush()
                except (BrokenPipeError, OSError):
                    pass

    def _wait_healthy(self, specs: list[ServerSpec]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        pending = list(specs)
        timeout = httpx.Timeout(10.0, connect=2.0)
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            while pending:
                for spec in list(pending):
                    proc = self._procs.get(spec.name)
                    if self._gate.closing.is_set() or proc is None or proc.pid is None:
                        raise ClusterStartError(f"{spec.name} was stopped while starting.")
                    code = proc.exit_code()
                    if code is not None:
                        raise self._start_error(spec, f"exited with code {code} during start-up")
                    if _process.is_healthy(client, spec.url):
                        pending.remove(spec)
                if pending and time.monotonic() > deadline:
                    raise self._start_error(
                        pending[0], f"not healthy after {self.startup_timeout:.0f} s "
                        f"(still waiting for {[s.name for s in pending]})")
                if pending:
                    self._gate.closing.wait(1.0)  # stop() ends the wait at once

    def _start_error(self, spec: ServerSpec, what: str) -> ClusterStartError:
        path = self.log_path(spec)
        return ClusterStartError(
            f"{spec.role} server {spec.index} at {spec.url} {what}.\n"
            f"Log: {path}\n--- last lines ---\n{_process.log_tail(path, 40)}")

    def _install_exit_hooks(self) -> None:
        atexit.register(self.stop)
        if threading.current_thread() is not threading.main_thread():
            return  # Python only allows signal handlers in the main thread
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) != signal.SIG_IGN:  # respect an ignored signal
                self._prev_handlers[signum] = signal.signal(signum, self._on_signal)

    def _remove_exit_hooks(self) -> None:
        atexit.unregister(self.stop)
        for signum, previous in self._prev_handlers.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._prev_handlers.clear()

    def _on_signal(self, signum: int, frame) -> None:
        if self._stopping:  # finish stopping first; stop() re-raises the signal
            self._deferred_signal = signum
            return
        previous = self._prev_handlers.get(signum, signal.SIG_DFL)
        self.stop()
        if callable(previous):
            previous(signum, frame)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
