"""``build_app`` and the documented ``serve deploy`` config, without starting Ray."""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
CONFIG = Path(__file__).resolve().parents[2] / "examples" / "ray_serve_config.yaml"


def test_the_example_serve_deploy_config_is_valid_and_builds():
    pytest.importorskip("ray.serve")
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from loramux.ray.app import ENGINE_NAME, INGRESS_NAME, app_builder

    schema = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (spec,) = schema.applications
    assert spec.import_path == "loramux.ray.app:app_builder"
    app = app_builder(spec.args)
    ingress = app._bound_deployment
    assert ingress.name == INGRESS_NAME
    (engine,) = [a for a in ingress.init_args if hasattr(a, "_bound_deployment")]
    assert engine._bound_deployment.name == ENGINE_NAME
    assert engine._bound_deployment.num_replicas == spec.args["replicas"]


def test_unknown_options_fail_before_anything_starts():
    pytest.importorskip("ray.serve")
    from loramux.ray import build_app

    with pytest.raises(ValueError, match="max_loaded_adapterz"):
        build_app({"max_loaded_adapterz": 4})
    with pytest.raises(ValueError, match="replicas"):
        build_app({}, replicas=0)
