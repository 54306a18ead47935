"""Runtime-loading paths: a relative lora_path is looked for under every adapter root in turn."""
from __future__ import annotations

import os

import pytest

from loramux.server.errors import APIError
from loramux.server.security import resolve_inside_roots


@pytest.fixture
def roots(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    (first / "a").mkdir(parents=True)
    (second / "b").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    return tuple(os.path.realpath(r) for r in (first, second))


def test_a_relative_path_missing_under_the_first_root_is_found_under_the_second(roots):
    assert resolve_inside_roots("b", roots) == os.path.join(roots[1], "b")
    assert resolve_inside_roots("a", roots) == os.path.join(roots[0], "a")


def test_a_path_in_no_root_is_404_naming_the_roots(roots):
    with pytest.raises(APIError) as err:
        resolve_inside_roots("nope", roots)
    assert err.value.status == 404 and roots[0] in str(err.value) and roots[1] in str(err.value)


def test_escaping_every_root_is_400(roots):
    with pytest.raises(APIError) as err:
        resolve_inside_roots("../outside", roots)
    assert err.value.status == 400 and "outside every adapter root" in str(err.value)
