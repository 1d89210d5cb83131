"""Pre-download the weights of a layout's services (the seed's `download_models.py`).

    python -m servers.download_models layout=mi325x_4 [services=[verifier,planner]]
        [cache_dir=/data/hf] [dry_run=true]

Fetching tens of GB while a server starts makes its readiness wait time out; fetch first.
Uses huggingface_hub's cache (HF_HOME / HF_HUB_CACHE, or cache_dir=), so vLLM and the SAM
server find the files. `facebook/sam3` is gated: accept its licence on the hub and export
HF_TOKEN. Other `key=value` arguments are Hydra overrides of the layout, as in servers.launch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from servers.launch import LaunchArgs, parse_args, resolve_specs
from servers.layout import LayoutError, ServiceSpec

SAM3_META_FILES = ["sam3.pt", "config.json"]
"""What Meta's sam3 package reads (model_builder.download_ckpt_from_hf); the repo also holds the
transformers weights, which the `hf` backend reads instead."""


class DownloadError(RuntimeError):
    pass


@dataclass(frozen=True)
class Download:
    service: str
    repo_id: str
    allow_patterns: tuple[str, ...] | None = None


def planned_downloads(specs: Sequence[ServiceSpec]) -> list[Download]:
    out = []
    for s in specs:
        for repo in s.weights:
            patterns = tuple(SAM3_META_FILES) if s.kind == "sam" and s.backend == "sam3" else None
            out.append(Download(service=s.name, repo_id=repo, allow_patterns=patterns))
    return out


def _explain(exc: BaseException, repo: str) -> str:
    name = type(exc).__name__
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if name == "GatedRepoError":
        return (f"{repo} is gated: accept its licence on the hub with your account and export "
                f"HF_TOKEN=<a token of that account> ({exc})")
    if name == "RepositoryNotFoundError":
        return f"{repo} does not exist on {endpoint} (or is private: set HF_TOKEN) ({exc})"
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or offline:
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub at {endpoint} is unreachable"
        return (f"cannot download {repo}: {why}, and it is not in the local cache. Run this "
                f"where the hub is reachable (unset HF_HUB_OFFLINE), or copy the files into the "
                f"cache (HF_HOME) of this machine. ({name}: {exc})")
    return f"downloading {repo} failed: {name}: {exc} (hub: {endpoint})"


def download(plan: Sequence[Download], cache_dir: str | None = None) -> list[str]:
    """Local snapshot paths, one per planned download; DownloadError with the reason."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise DownloadError("huggingface_hub is not installed: pip install huggingface_hub "
                            f"({exc})") from exc
    paths = []
    for d in plan:
        print(f"[{d.service}] {d.repo_id}"
              + (f" ({', '.join(d.allow_patterns)})" if d.allow_patterns else ""), flush=True)
        try:
            path = snapshot_download(repo_id=d.repo_id, cache_dir=cache_dir,
                                     allow_patterns=list(d.allow_patterns)
                                     if d.allow_patterns else None)
        except Exception as exc:
            raise DownloadError(f"[{d.service}] {_explain(exc, d.repo_id)}") from exc
        print(f"[{d.service}] {d.repo_id} -> {path}", flush=True)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    cache_dir = None
    dry_run = False
    rest = []
    for arg in raw:
        if arg.startswith("cache_dir="):
            cache_dir = arg.split("=", 1)[1] or None
        elif arg.startswith("dry_run="):
            dry_run = arg.split("=", 1)[1].lower() in ("true", "1", "yes")
        elif arg in ("-h", "--help"):
            print(__doc__)
            return 0
        else:
            rest.append(arg)
    try:
        args: LaunchArgs = parse_args(rest)
        plan = planned_downloads(resolve_specs(args))
        if not plan:
            print(f"layout {args.layout}: nothing to download")
            return 0
        if dry_run:
            for d in plan:
                print(f"[{d.service}] would download {d.repo_id}"
                      + (f" ({', '.join(d.allow_patterns)})" if d.allow_patterns else ""))
            return 0
        download(plan, cache_dir)
    except (DownloadError, LayoutError, ValueError) as exc:
        print(f"servers.download_models: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
