"""The run's three models, as one typed value: built from the config, checked, closed.

Every mode that calls models (`run`, `infer`) and the benchmarks build them here, so a model
is preflighted before any work and closed however the work ends. What a model may do beyond
its role (preflight, close, count its requests) is a Protocol in `rescue.protocols`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from rescue.errors import UserError
from rescue.protocols import (
    Closable,
    Counted,
    Executor,
    Planner,
    Preflighted,
    Resolved,
    Verifier,
)
from rescue.sample import Sample


class PreflightError(UserError, RuntimeError):
    """An endpoint is down, slow, or serves another model; one line per problem."""


@dataclass
class Models:
    planner: Planner
    executor: Executor
    verifier: Verifier

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Models:
        """The `planner`, `executor` and `verifier` groups of a composed config, instantiated."""
        from hydra.utils import instantiate

        return cls(planner=instantiate(cfg["planner"]), executor=instantiate(cfg["executor"]),
                   verifier=instantiate(cfg["verifier"]))

    def all(self) -> dict[str, Planner | Executor | Verifier]:
        return {"planner": self.planner, "executor": self.executor, "verifier": self.verifier}

    def endpoint_stats(self) -> dict[str, Any]:
        """Requests, retries and failures per HTTP endpoint, from the models that count them."""
        return {role: m.stats() for role, m in self.all().items() if isinstance(m, Counted)}

    def require_identities(self) -> None:
        """Without a preflight (offline): fail now, naming the cause, when a model's identity
        is not known, instead of with a cache miss under a key that names no backend."""
        why = {role: m.identity_problem() for role, m in self.all().items()
               if isinstance(m, Resolved)}
        problems = [f"{role}: {problem}" for role, problem in why.items() if problem is not None]
        if problems:
            raise PreflightError("the identity of a model, part of every cache key, is not "
                                 "known, so no cached answer can be found: "
                                 + " | ".join(problems))

    async def aclose(self) -> None:
        for m in self.all().values():
            if isinstance(m, Closable):
                await m.aclose()

    @asynccontextmanager
    async def ready(self, *, check: bool = True, offline: bool = False,
                    sample: Sample | None = None) -> AsyncIterator[Models]:
        """The models, preflighted first when `check` (`check_endpoints`), with every
        identity known without a server when `offline` (`require_identities`), closed on exit
        whatever happens (a failed check included)."""
        try:
            if check:
                await check_endpoints(self, sample)
            if offline:
                self.require_identities()
            yield self
        finally:
            await self.aclose()


async def _preflight(model: object, sample: Sample | None) -> list[str]:
    return list(await model.preflight(sample)) if isinstance(model, Preflighted) else []


async def check_endpoints(models: Models, sample: Sample | None = None) -> None:
    """Every endpoint is up and serves its model; with `sample`, each accepts a real request
    of the run (`rescue.models.probe`). Raises PreflightError, one line per problem."""
    roles = models.all()
    results = await asyncio.gather(*(_preflight(m, None) for m in roles.values()))
    if sample is not None and not any(results):
        results = await asyncio.gather(*(_preflight(m, sample) for m in roles.values()))
    problems = [f"{role}: {p}" for role, ps in zip(roles, results, strict=True) for p in ps]
    if problems:
        raise PreflightError("preflight failed:\n  " + "\n  ".join(problems))
