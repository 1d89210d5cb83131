"""A `conf/layout/*.yaml` turned into the exact command, environment and readiness probe of each
service. Pure: no process is started here (`servers.launch` does that), so the commands can be
golden-tested and printed for a human to run by hand.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

KINDS = ("vllm", "sam")


class LayoutError(ValueError):
    """The layout is malformed or does not have what was asked for."""


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    kind: str  # "vllm" (OpenAI API, ready when /v1/models lists the model) | "sam"
    argv: tuple[str, ...]
    env: dict[str, str]
    host: str
    port: int
    startup_timeout_s: float
    served_model_name: str | None = None
    backend: str | None = None  # the SAM server's backend
    weights: tuple[str, ...] = field(default=())  # hub repos `download_models` fetches

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def ready_url(self) -> str:
        return self.base_url + ("/v1/models" if self.kind == "vllm" else "/health")

    def shell(self) -> str:
        """One line a human can paste: `VAR=value ... cmd args`."""
        env = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join([*env, *(shlex.quote(a) for a in self.argv)])


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, separators=(", ", ": "))
    return str(value)


def render_flags(args: Mapping[str, Any] | None) -> list[str]:
    """`{key: value}` → `--key value`, in order. True → bare `--key`; False/None → omitted;
    a list → the flag repeated per item."""
    out: list[str] = []
    for key, value in (args or {}).items():
        flag = f"--{key}"
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, list | tuple):
            for item in value:
                out += [flag, _flag_value(item)]
        else:
            out += [flag, _flag_value(value)]
    return out


def _require(svc: Mapping[str, Any], key: str, name: str) -> Any:
    if svc.get(key) is None:
        raise LayoutError(f"service {name!r} needs {key!r}")
    return svc[key]


def service_spec(name: str, svc: Mapping[str, Any], device_env: str | None) -> ServiceSpec:
    kind = _require(svc, "kind", name)
    if kind not in KINDS:
        raise LayoutError(f"service {name!r}: kind must be one of {KINDS}, got {kind!r}")
    host = str(svc.get("host") or "127.0.0.1")
    port = int(_require(svc, "port", name))
    command = [str(c) for c in _require(svc, "command", name)]
    env = {str(k): str(v) for k, v in (svc.get("env") or {}).items()}
    devices = list(svc.get("devices") or [])
    if devices:
        if not device_env:
            raise LayoutError(f"service {name!r} names devices but the layout has no device_env")
        env = {device_env: ",".join(str(d) for d in devices), **env}
    served = backend = None
    weights: tuple[str, ...] = ()
    if kind == "vllm":
        model = str(_require(svc, "model", name))
        served = str(svc.get("served_model_name") or model)
        argv = [*command, model, "--host", host, "--port", str(port),
                "--served-model-name", served, *render_flags(svc.get("args"))]
        weights = (model,)
    else:
        backend = str(_require(svc, "backend", name))
        argv = [*command, "--backend", backend,
                "--host", host, "--port", str(port)]
        for key, value in (svc.get("options") or {}).items():
            argv += ["-o", f"{key}={_flag_value(value)}"]
        argv += render_flags(svc.get("args"))
        if svc.get("weights"):
            weights = (str(svc["weights"]),)
    return ServiceSpec(name=name, kind=kind, argv=tuple(argv), env=env, host=host, port=port,
                       startup_timeout_s=float(svc.get("startup_timeout_s") or 600),
                       served_model_name=served, backend=backend, weights=weights)


def layout_specs(layout: Mapping[str, Any], services: Sequence[str] | None = None
                 ) -> list[ServiceSpec]:
    """The specs of `services` (default: all) in the layout's start `order`."""
    table = layout.get("services") or {}
    if not table:
        raise LayoutError(f"layout {layout.get('name')!r} lists no services")
    order = [s for s in (layout.get("order") or []) if s in table]
    order += [s for s in table if s not in order]
    wanted = list(services) if services else order
    unknown = [s for s in wanted if s not in table]
    if unknown:
        raise LayoutError(f"layout {layout.get('name')!r} has no service {', '.join(unknown)} "
                          f"(it has: {', '.join(order)})")
    device_env = layout.get("device_env")
    return [service_spec(s, table[s], device_env) for s in order if s in wanted]
