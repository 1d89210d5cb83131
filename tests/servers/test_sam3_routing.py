"""Both SAM3 backends route a prompt by its parts, so each client prompt mode takes one path,
and their /v1/info identity is fixed at construction (no model loaded, no torch imported)."""

from __future__ import annotations

import pytest

from rescue.hypothesis import Prompt
from rescue.models.sam_client import PROMPT_MODES, mode_parts, mode_unsupported, reduce_prompt
from servers.backends.classical import ClassicalBackend
from servers.backends.routing import route
from servers.backends.sam3_hf import Sam3HFBackend
from servers.backends.sam3_meta import Sam3MetaBackend
from servers.backends.versions import package_version

FULL = Prompt(text="cup", box=(1, 2, 30, 40), points=((10, 20),), point_labels=(1,))
PATHS = {"text": "concept", "text_box": "concept", "box": "interactive",
         "box_points": "interactive"}


@pytest.mark.parametrize("mode", PROMPT_MODES)
def test_each_mode_takes_one_path_on_both_sam3_backends(mode):
    assert route(reduce_prompt(FULL, mode_parts(mode))) == PATHS[mode]


def test_text_with_points_is_interactive_and_the_text_is_not_read():
    assert route(FULL) == "interactive"
    assert route(Prompt(text="cup")) == route(Prompt(text="cup", box=(1, 2, 3, 4))) == "concept"


@pytest.mark.parametrize("cls", [Sam3MetaBackend, Sam3HFBackend])
def test_capabilities_say_which_modes_a_sam3_server_serves(cls):
    on, off = cls(enable_points=True).info(), cls(enable_points=False).info()
    assert all(mode_unsupported(m, on.capabilities) is None for m in PROMPT_MODES)
    assert [m for m in PROMPT_MODES if mode_unsupported(m, off.capabilities) is None] == \
        ["text", "text_box"]
    assert on.identity["routing"] == off.identity["routing"]


def test_the_classical_backend_serves_the_box_modes_only():
    caps = ClassicalBackend().info().capabilities
    assert [m for m in PROMPT_MODES if mode_unsupported(m, caps) is None] == ["box", "box_points"]


@pytest.mark.parametrize("cls, package, key", [(Sam3HFBackend, "transformers", "transformers"),
                                               (Sam3MetaBackend, "sam3", "sam3")])
def test_identity_names_the_installed_library_before_any_load(cls, package, key):
    """It said 'not loaded' until the model loaded, then the version: a client that read it at
    preflight and again later hashed two different execute keys for one backend."""
    backend = cls()
    ident = backend.info().identity
    assert ident[key] == package_version(package) and "not loaded" not in str(backend.info())
    assert backend._model is None  # nothing was loaded to say so
