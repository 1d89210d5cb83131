"""Print, start, stop or check the model services of a GPU layout (`conf/layout/*.yaml`).

    python -m servers.launch layout=mi325x_4 action=print
    python -m servers.launch layout=h100_1 action=start services=[executor,planner]
    python -m servers.launch layout=mi325x_4 action=status
    python -m servers.launch layout=mi325x_4 action=stop
    python -m servers.launch layout=cpu action=start layout.services.executor.port=9001

Launcher keys: layout (default cpu), action (print | start | stop | status; default print),
services (default: all of the layout), run_dir (logs and pid files; default outputs/servers),
timeout_s (overrides every service's startup timeout), wait (default true), stop_timeout_s
(default 30). Any other `key=value` is a Hydra override of the composed layout, e.g.
`layout.services.verifier.args.max-model-len=16384`.

`start` runs each service in its own process group with its output in `<run_dir>/<name>.log`
and its pid in `<run_dir>/<name>.pid`, waits until it answers (SAM: GET /health says ready;
vLLM: GET /v1/models lists the served model) and fails with the service's name and the tail of
its log if it exits or times out. A failed start stops what this invocation started. `stop`
sends SIGTERM to each group, then SIGKILL after `stop_timeout_s`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from servers.layout import LayoutError, ServiceSpec, layout_specs

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
ACTIONS = ("print", "start", "stop", "status")


class LaunchError(RuntimeError):
    """A service failed to start or stop; the message names it and quotes its log."""


@dataclass(frozen=True)
class LaunchArgs:
    layout: str = "cpu"
    action: str = "print"
    services: tuple[str, ...] = ()
    run_dir: Path = Path("outputs/servers")
    timeout_s: float | None = None
    wait: bool = True
    stop_timeout_s: float = 30.0
    overrides: tuple[str, ...] = ()


def _parse_list(value: str) -> tuple[str, ...]:
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    return tuple(v.strip().strip("'\"") for v in value.split(",") if v.strip())


def _parse_bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def parse_args(argv: Sequence[str]) -> LaunchArgs:
    """`key=value` arguments; unknown keys are Hydra overrides of the layout."""
    kw: dict[str, Any] = {}
    overrides: list[str] = []
    for arg in argv:
        if arg in ("-h", "--help"):
            raise SystemExit(__doc__)
        if "=" not in arg:
            raise ValueError(f"arguments are key=value, got {arg!r} (see --help)")
        key, value = arg.split("=", 1)
        if key == "layout":
            kw["layout"] = value
        elif key == "action":
            if value not in ACTIONS:
                raise ValueError(f"action must be one of {ACTIONS}, got {value!r}")
            kw["action"] = value
        elif key == "services":
            kw["services"] = _parse_list(value)
        elif key == "run_dir":
            kw["run_dir"] = Path(value)
        elif key == "timeout_s":
            kw["timeout_s"] = float(value)
        elif key == "stop_timeout_s":
            kw["stop_timeout_s"] = float(value)
        elif key == "wait":
            kw["wait"] = _parse_bool(value)
        else:
            overrides.append(arg)
    return LaunchArgs(overrides=tuple(overrides), **kw)


def compose_layout(name: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The layout group option `name` from conf/, through Hydra (so overrides and
    interpolations behave exactly as in `run.py layout=...`)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    available = sorted(p.stem for p in (CONF_DIR / "layout").glob("*.yaml"))
    if name not in available:
        raise LayoutError(f"no layout {name!r} in {CONF_DIR / 'layout'} (have: "
                          f"{', '.join(available)})")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=None, overrides=[f"+layout={name}", *overrides])
    return OmegaConf.to_container(cfg.layout, resolve=True)  # type: ignore[return-value]


def resolve_specs(args: LaunchArgs) -> list[ServiceSpec]:
    layout = compose_layout(args.layout, args.overrides)
    specs = layout_specs(layout, args.services or None)
    if args.timeout_s is not None:
        specs = [ServiceSpec(**{**s.__dict__, "startup_timeout_s": args.timeout_s})
                 for s in specs]
    return specs


# -- processes -------------------------------------------------------------------------------

def _pid_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid"


def _log_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.log"


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _alive(pid: int) -> bool:
    try:  # reap it if it is our own exited child
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not running
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _same_process(pid: int, argv: Sequence[str]) -> bool:
    """The pid still runs the command we recorded (pids get reused)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the pid file
    got = [c.decode("utf-8", "replace") for c in cmd if c]
    return got[-len(argv) + 1:] == list(argv)[1:] if len(argv) > 1 else bool(got)


def read_pid(run_dir: Path, name: str) -> dict[str, Any] | None:
    """The pid record of a running service, or None (a stale file is removed)."""
    path = _pid_file(run_dir, name)
    try:
        rec = json.loads(path.read_text())
        pid = int(rec["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if _alive(pid) and _same_process(pid, rec.get("argv") or []):
        return rec
    path.unlink(missing_ok=True)
    return None


def _port_open(host: str, port: int) -> bool:
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def spawn(spec: ServiceSpec, run_dir: Path) -> subprocess.Popen:
    """Start `spec` in its own session (so stop can signal the whole group: vLLM forks
    workers), its output appended to its log, its pid recorded."""
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = list(spec.argv)
    if argv and argv[0] == "python":  # the interpreter running the launcher
        argv[0] = sys.executable
    log_path = _log_file(run_dir, spec.name)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {spec.shell()}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, env={**os.environ, **spec.env}, cwd=str(REPO_ROOT),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    _pid_file(run_dir, spec.name).write_text(json.dumps(
        {"pid": proc.pid, "argv": argv, "url": spec.base_url, "started": time.time()}))
    return proc


def probe(spec: ServiceSpec, timeout: float = 2.0) -> tuple[bool, str, bool]:
    """(ready, what was seen, fatal). Fatal: the service says it cannot become ready."""
    try:
        r = httpx.get(spec.ready_url, timeout=timeout)
    except httpx.HTTPError as exc:
        return False, f"{type(exc).__name__}", False
    if spec.kind == "sam":
        try:
            body = r.json()
        except ValueError:
            return False, f"HTTP {r.status_code}, not JSON", False
        if body.get("status") == "error":
            return False, f"backend failed to load: {body.get('error')}", True
        return bool(body.get("ready")), f"HTTP {r.status_code} status={body.get('status')}", False
    if r.status_code != 200:
        return False, f"HTTP {r.status_code}", False
    try:
        ids = [m.get("id") for m in r.json().get("data", [])]
    except (ValueError, AttributeError):
        return False, "HTTP 200, not a model list", False
    if spec.served_model_name in ids:
        return True, "model listed", False
    return False, f"serves {ids}, not {spec.served_model_name!r}", True


def wait_ready(spec: ServiceSpec, run_dir: Path, proc: subprocess.Popen | None = None,
               pid: int | None = None, poll_s: float = 0.5) -> float:
    """Seconds until `spec` answered ready; LaunchError naming it (and its log) otherwise."""
    t0 = time.monotonic()
    deadline = t0 + spec.startup_timeout_s
    log_path = _log_file(run_dir, spec.name)
    seen = "no answer yet"
    while True:
        exited = proc.poll() if proc is not None else (None if pid is None or _alive(pid)
                                                       else "?")
        if exited is not None:
            raise LaunchError(f"service {spec.name!r} exited (code {exited}) before it was ready "
                              f"at {spec.ready_url}; last lines of {log_path}:\n"
                              f"{log_tail(log_path)}")
        ready, seen, fatal = probe(spec)
        if ready:
            return time.monotonic() - t0
        if fatal:
            raise LaunchError(f"service {spec.name!r} cannot become ready ({seen}); last lines "
                              f"of {log_path}:\n{log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise LaunchError(f"service {spec.name!r} not ready after {spec.startup_timeout_s:g}"
                              f" s (GET {spec.ready_url}: {seen}); last lines of {log_path}:\n"
                              f"{log_tail(log_path)}")
        time.sleep(poll_s)


def stop_service(spec: ServiceSpec, run_dir: Path, timeout_s: float = 30.0) -> str:
    rec = read_pid(run_dir, spec.name)
    if rec is None:
        return "not running"
    pid = int(rec["pid"])
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        _pid_file(run_dir, spec.name).unlink(missing_ok=True)
        return "already gone"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    how = "stopped (SIGTERM)"
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        for _ in range(50):
            if not _alive(pid):
                break
            time.sleep(0.1)
        how = f"killed (SIGKILL after {timeout_s:g} s)"
    _pid_file(run_dir, spec.name).unlink(missing_ok=True)
    return how


# -- actions ---------------------------------------------------------------------------------

def do_print(specs: Sequence[ServiceSpec], layout: str) -> None:
    print(f"# layout {layout}: {len(specs)} service(s)")
    for s in specs:
        print(f"# {s.name} ({s.kind}) on {s.base_url}, ready when GET {s.ready_url} answers"
              + (f", model {s.served_model_name}" if s.served_model_name else ""))
        print(s.shell())


def do_start(specs: Sequence[ServiceSpec], args: LaunchArgs, sequential: bool) -> None:
    started: list[tuple[ServiceSpec, subprocess.Popen]] = []
    try:
        pending: list[tuple[ServiceSpec, subprocess.Popen | None, int | None]] = []
        for s in specs:
            rec = read_pid(args.run_dir, s.name)
            if rec is not None:
                print(f"[{s.name}] already running (pid {rec['pid']})", flush=True)
                pending.append((s, None, int(rec["pid"])))
            else:
                if _port_open(s.host, s.port):
                    raise LaunchError(f"service {s.name!r}: port {s.port} on {s.host} is "
                                      "already in use by a process this launcher did not start; "
                                      "stop it or override the port")
                proc = spawn(s, args.run_dir)
                started.append((s, proc))
                print(f"[{s.name}] started pid {proc.pid}, log {_log_file(args.run_dir, s.name)}",
                      flush=True)
                pending.append((s, proc, None))
            if sequential and args.wait:
                _wait_all(pending[-1:], args.run_dir)
        if not sequential and args.wait:
            _wait_all(pending, args.run_dir)
    except BaseException:
        for s, _ in reversed(started):
            print(f"[{s.name}] {stop_service(s, args.run_dir, args.stop_timeout_s)}",
                  file=sys.stderr, flush=True)
        raise


def _wait_all(pending: Sequence[tuple[ServiceSpec, subprocess.Popen | None, int | None]],
              run_dir: Path) -> None:
    for s, proc, pid in pending:
        dt = wait_ready(s, run_dir, proc=proc, pid=pid)
        print(f"[{s.name}] ready at {s.base_url} ({dt:.1f} s)", flush=True)


def do_status(specs: Sequence[ServiceSpec], run_dir: Path) -> bool:
    all_ready = True
    for s in specs:
        rec = read_pid(run_dir, s.name)
        ready, seen, _ = probe(s)
        all_ready &= ready
        run = f"pid {rec['pid']}" if rec else "not started here"
        print(f"{s.name:10s} {'ready' if ready else 'DOWN':5s} {s.base_url:28s} {run} ({seen})")
    return all_ready


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        specs = resolve_specs(args)
        if args.action == "print":
            do_print(specs, args.layout)
        elif args.action == "start":
            layout = compose_layout(args.layout, args.overrides)
            do_start(specs, args, sequential=layout.get("start", "parallel") == "sequential")
        elif args.action == "stop":
            for s in reversed(specs):
                print(f"[{s.name}] {stop_service(s, args.run_dir, args.stop_timeout_s)}")
        else:
            return 0 if do_status(specs, args.run_dir) else 3
    except (LaunchError, LayoutError, ValueError) as exc:
        print(f"servers.launch: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
