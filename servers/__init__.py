"""Server side of RESCue: the SAM executor server and the launchers of the model services.

Heavy dependencies (torch, sam3, transformers, vLLM) are imported lazily inside backends and
launched processes; importing this package needs only the client's dependencies.
"""

__version__ = "0.1.0"
