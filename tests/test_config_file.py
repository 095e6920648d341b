"""Config files in Ray Serve's schema, without running anything: `celery-serve build` writes one, and a file
that names an unknown field, deployment or option (or gives a wrong type) is refused with its line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from celery_serve import DeploymentConfigError
from celery_serve._runtime.config_file import ConfigFile
from celery_serve._runtime.serve import _import_path

GOOD = """\
http_options:
  host: 127.0.0.1
  port: 8123
applications:
- name: echo
  route_prefix: /echo
  import_path: tests.lifecycle_deployments:echo_app
  deployments:
  - name: Echo
    num_replicas: 2
    user_config:
      mode: loud
- name: front
  route_prefix: /front
  import_path: tests.lifecycle_deployments:front_app
  deployments:
  - name: Front
    max_ongoing_requests: 7
    ray_actor_options:
      num_cpus: 0.5
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    return path


def test_overrides_win_over_the_code(tmp_path: Path) -> None:
    specs = {s.name: s for s in ConfigFile(write(tmp_path, GOOD)).specs(_import_path)}
    assert set(specs) == {"echo", "front"}
    echo = specs["echo"].deployments["Echo"].config
    assert echo["num_replicas"] == 2 and echo["user_config"] == {"mode": "loud"}
    front = specs["front"].deployments["Front"].config
    assert front["max_ongoing_requests"] == 7 and front["num_cpus"] == 0.5
    assert specs["front"].deployments["Echo"].config["num_replicas"] == 1  # not overridden: the code's
    assert specs["front"].route_prefix == "/front"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("    num_replicas: 2\n", "    num_replica: 2\n"),
            r"serve\.yaml:10: unknown option 'num_replica' of deployment",
        ),
        (("  - name: Front\n", "  - name: Back\n"), r"serve\.yaml:17: application 'front' has no deployment 'Back'"),
        (("    num_replicas: 2\n", "    num_replicas: two\n"), r"serve\.yaml:10: .*num_replicas"),
        (("http_options:\n", "http_option:\n"), r"serve\.yaml:1: unknown field 'http_option'"),
        (
            ("  route_prefix: /front\n", "  route_prefix: /echo\n"),
            r"serve\.yaml:14: route_prefix '/echo' is already used",
        ),
        (("    max_ongoing_requests: 7\n", "    max_ongoing_requests: 0\n"), r"serve\.yaml:18: .*max_ongoing_requests"),
    ],
)
def test_a_wrong_line_is_named(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    assert change[0] in GOOD
    path = write(tmp_path, GOOD.replace(change[0], change[1], 1))
    with pytest.raises(DeploymentConfigError, match=expected):
        ConfigFile(path).specs(_import_path)


def test_build_writes_a_file_that_deploys_the_code_as_it_is(tmp_path: Path) -> None:
    out = tmp_path / "built.yaml"
    cli = [sys.executable, "-m", "celery_serve", "build"]
    subprocess.run([*cli, "tests.lifecycle_deployments:front_app", "-o", str(out)], check=True, capture_output=True)
    data = yaml.safe_load(out.read_text())
    (app,) = data["applications"]
    assert app["import_path"] == "tests.lifecycle_deployments:front_app"
    assert app["name"] == "default" and app["route_prefix"] == "/"
    assert [d["name"] for d in app["deployments"]] == ["Echo", "Front"]
    assert app["deployments"][1]["num_replicas"] == 1 and app["deployments"][1]["max_ongoing_requests"] == 100
    specs = ConfigFile(out).specs(_import_path)  # what build writes, deploy reads
    assert specs[0].deployments["Echo"].config["num_replicas"] == 1
    two = subprocess.run(
        [*cli, "tests.lifecycle_deployments:echo_app", "tests.lifecycle_deployments:front_app"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert [a["name"] for a in yaml.safe_load(two)["applications"]] == ["app1", "app2"]


MIDDLEWARES = """\
  cors_allow_origins: [https://app.example]
  middlewares:
  - cls: tests.safety_deployments:StampMiddleware
    kwargs: {value: from-file}
"""


def test_gateway_middlewares_in_the_file_are_checked_and_reach_the_gateway(tmp_path: Path) -> None:
    from celery_serve.api import middlewares

    config = ConfigFile(write(tmp_path, GOOD.replace("  port: 8123\n", "  port: 8123\n" + MIDDLEWARES, 1)))
    spec = config.config.http_options.middleware_spec()
    assert spec is not None
    loaded = middlewares.load(spec)  # what the gateway does with SERVE_HTTP_MIDDLEWARES
    assert [m.cls.__name__ for m in loaded] == ["CORSMiddleware", "StampMiddleware"]
    assert loaded[0].kwargs["allow_origins"] == ["https://app.example"] and loaded[1].kwargs == {"value": "from-file"}
    broken = MIDDLEWARES.replace("tests.safety_deployments:StampMiddleware", "tests.no_such_module:Stamp")
    with pytest.raises(DeploymentConfigError, match=r"serve\.yaml:.*cannot import 'tests.no_such_module:Stamp'"):
        ConfigFile(write(tmp_path, GOOD.replace("  port: 8123\n", "  port: 8123\n" + broken, 1)))
