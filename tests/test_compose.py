"""docker-compose.yml: structure, references and security, checked without a Docker engine."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SECRETS = {"POSTGRES_USER": "agch", "POSTGRES_PASSWORD": "test-only", "RAY_AUTH_TOKEN": "test-token"}


@pytest.fixture(scope="module")
def spec() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _compose(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose (Debian's v1 package) is not installed; .ci/run installs it")
    return subprocess.run([exe, "-f", str(COMPOSE), *args], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", **(env or {})}, timeout=60)


def test_docker_compose_config_accepts_the_file_with_secrets_set(tmp_path):
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in SECRETS.items()))
    done = _compose("--env-file", str(env_file), "config")
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert set(resolved["services"]) == {"postgres", "mlflow", "ray-head", "ray-worker", "job"}
    assert "test-only" in resolved["services"]["job"]["environment"]["AGCH_STORAGE"]


def test_compose_refuses_to_start_without_secrets():
    done = _compose("config")
    assert done.returncode != 0 and "set POSTGRES_" in done.stderr


def test_no_default_passwords_and_env_file_not_committed(spec):
    text = COMPOSE.read_text()
    for var in SECRETS:
        uses = re.findall(r"\$\{" + var + r"([^}]*)\}", text)
        assert uses and all(u == "" or u.startswith(":?") for u in uses), (var, uses)  # required, never defaulted
    template = (ROOT / "docker" / "env.template").read_text()
    assert re.search(r"^POSTGRES_PASSWORD=$", template, re.M) and re.search(r"^RAY_AUTH_TOKEN=$", template, re.M)
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_images_are_pinned_and_ports_stay_on_the_host(spec):
    for name, service in spec["services"].items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), (name, image)
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+:\d", dockerfile, re.M)


def test_services_are_wired_to_each_other(spec):
    s = spec["services"]
    assert "pg_isready" in " ".join(s["postgres"]["healthcheck"]["test"])
    assert s["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    mlflow_cmd = s["mlflow"]["command"]
    assert "--workers 1" in mlflow_cmd and "--serve-artifacts" in mlflow_cmd
    assert "--app-name agch" in mlflow_cmd  # the UI as tests/runs/test_ui.py checks it (tests.services.start_mlflow)
    allowed = re.search(r'--allowed-hosts "([^"]+)"', mlflow_cmd).group(1).split(",")
    assert "mlflow:5000" in allowed and "mlflow" in allowed
    assert s["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "mem_limit" in s["mlflow"]
    for name in ("ray-head", "ray-worker", "job"):
        assert s[name]["environment"]["RAY_AUTH_MODE"] == "token", name
        assert "RAY_AUTH_TOKEN" in s[name]["environment"], name
    assert "--address=ray-head:6379" in s["ray-worker"]["command"]
    assert "--object-store-memory" in s["ray-worker"]["command"]
    gpu = s["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["driver"] == "nvidia"
    job_env = s["job"]["environment"]
    assert job_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "@postgres:5432/optuna" in job_env["AGCH_STORAGE"] and job_env["RAY_ADDRESS"] == "ray-head:6379"
    assert s["job"]["command"][:2] == ["agch-search", "run"]
    assert "--num-cpus=0" in s["ray-head"]["command"]  # trials run only where the data is mounted


def test_job_is_a_ray_node_and_sees_the_search_folder_where_the_workers_do(spec):
    s = spec["services"]
    assert s["job"]["entrypoint"] == ["agch-job"] and s["job"]["init"] is True
    assert "COPY docker/job-entrypoint.sh /usr/local/bin/agch-job" in (ROOT / "docker" / "Dockerfile").read_text()
    home = s["job"]["environment"]["AGCH_HOME"]  # Tune's experiment folder: workers write trial checkpoints there
    shared = [v for v in s["ray-worker"]["volumes"] if v in s["job"]["volumes"]]
    assert any(home.startswith(v.split(":")[1] + "/") and not v.endswith(":ro") for v in shared), (home, shared)


def test_job_entrypoint_joins_without_resources_runs_the_command_and_leaves(tmp_path):
    # A stand-in `ray` that records its arguments: the real `ray stop` would end every Ray process on this machine.
    log = tmp_path / "ray.log"
    shim = tmp_path / "ray"
    shim.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    shim.chmod(0o755)
    script = str(ROOT / "docker" / "job-entrypoint.sh")
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "RAY_ADDRESS": "ray-head:6379"}
    done = subprocess.run(["sh", script, "sh", "-c", "echo ran; exit 3"], capture_output=True, text=True, env=env)
    assert done.returncode == 3 and "ran" in done.stdout  # the command's own exit status
    start, stop = log.read_text().splitlines()
    assert start.startswith("start --address=ray-head:6379 --num-cpus=0 --num-gpus=0") and stop == "stop"
    done = subprocess.run(["sh", script, "true"], capture_output=True, text=True, env={"PATH": env["PATH"]})
    assert done.returncode != 0 and "RAY_ADDRESS must name the Ray head" in done.stderr


def test_referenced_files_exist(spec):
    dockerfile = ROOT / spec["x-agch-image"]["build"]["dockerfile"]
    assert dockerfile.is_file()
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    for service in spec["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and not source.startswith("./data"):
                assert (ROOT / source).exists(), source
    job_space = spec["services"]["job"]["command"][2]
    assert (ROOT / "search_spaces" / Path(job_space).name).is_file()
