"""RESCue: reasoning segmentation with test-time scaling.

The client package. It imports no torch and no vLLM: models are reached over HTTP
(or simulated in-process for the CPU demo and the tests).
"""

__version__ = "0.1.0"
