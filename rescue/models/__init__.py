"""Planner, executor and verifier implementations: HTTP clients and in-process simulators."""
