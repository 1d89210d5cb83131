"""An OpenAI-compatible stand-in for vLLM (tests only): real HTTP, vLLM's wire format, scripted
answers, deterministic faults. See server.py for the format and scripts.py for the 'models'."""

from .scripts import (
    PlannerScript,
    Target,
    Targets,
    VerifierScript,
    hash_judge,
    overlay_iou_judge,
)
from .server import (
    REASONING_PLACEMENTS,
    ChatRequest,
    Completion,
    Faults,
    ServerThread,
    StandIn,
    free_port,
    logprobs_content,
    serve,
    tokenize,
)

__all__ = ["REASONING_PLACEMENTS", "ChatRequest", "Completion", "Faults", "PlannerScript",
           "ServerThread", "StandIn", "Target", "Targets", "VerifierScript", "free_port",
           "hash_judge", "logprobs_content", "overlay_iou_judge", "serve", "tokenize"]
