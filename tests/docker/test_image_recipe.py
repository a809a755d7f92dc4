"""The CPU image's recipe, replayed without Docker: what catches a missing file or dependency.

From a copy of the build context filtered by .dockerignore, docker/Dockerfile's builder and
runtime-cpu stages are replayed (COPY, ENV, WORKDIR, RUN with the image's paths mapped under a
temporary root: a fresh venv, `pip install <wheel>[serve]`), then the service is started with the
image's exact CMD and ENV (only the host, port and paths substituted) and used like a client of the
container would: /health/ready, the image's HEALTHCHECK command, a real /v1/encode of a photo, and
SIGTERM as `docker stop` sends it.

The model is models/default when the repository has it (the image bakes it, so it must survive
.dockerignore); before it is committed, a tiny exported model from the `tiny_model_dir` fixture is
put where the build context would have it.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from build_context import copy_context
from dockerfile_recipe import Replay, exec_form, parse_dockerfile, stage_chain

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
IMAGE_PORT = "8000"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _request(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _photo_png() -> bytes:
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="PNG")  # 512x512 RGB, public domain
    return buffer.getvalue()


def _multipart(field: str, filename: str, payload: bytes, content_type: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink()
    }


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """The replayed CPU image: build context -> builder wheel -> runtime-cpu venv + model."""
    work = tmp_path_factory.mktemp("image")
    context = work / "context"
    copied = copy_context(REPO, context)
    if not (REPO / "models" / "default" / "model.json").is_file():
        model_dir = Path(request.getfixturevalue("tiny_model_dir"))
        shutil.copytree(model_dir, context / "models" / "default")
    else:
        assert "models/default/model.json" in copied, ".dockerignore leaves out models/default"

    stages = parse_dockerfile(DOCKERFILE.read_text(), {"VARIANT": "cpu"})
    replay = Replay(context, {"builder": work / "builder", "runtime": work / "root"})
    replay.run_stage(stage_chain(stages, "builder"))
    env = replay.run_stage(stage_chain(stages, "runtime"))
    chain = stage_chain(stages, "runtime")
    final = chain[-1]
    assert [s.name for s in chain] == ["runtime-cpu", "runtime"], "VARIANT=cpu picks runtime-cpu"
    (work / "recipe.json").write_text(
        json.dumps(
            {
                "env": env,
                "workdir": final.all("WORKDIR")[-1].args,
                "cmd": exec_form(final.all("CMD")[-1]),
                "healthcheck": exec_form(final.all("HEALTHCHECK")[-1]),
            }
        )
    )
    return work


@pytest.fixture(scope="module")
def recipe(image_root: Path) -> dict:
    return json.loads((image_root / "recipe.json").read_text())


def _venv_python(image_root: Path) -> Path:
    return image_root / "root" / "opt" / "venv" / "bin" / "python"


def test_image_venv_has_onnxruntime_and_no_torch(image_root: Path) -> None:
    probe = (
        "import importlib.util as u, json; "
        "print(json.dumps({m: u.find_spec(m) is not None for m in "
        "['torch', 'onnxruntime', 'fastapi', 'uvicorn', 'service', 'PIL']}))"
    )
    out = subprocess.run(
        [_venv_python(image_root), "-c", probe], capture_output=True, text=True, check=True
    )
    found = json.loads(out.stdout)
    assert found == {
        "torch": False,
        "onnxruntime": True,
        "fastapi": True,
        "uvicorn": True,
        "service": True,
        "PIL": True,
    }
    dists = subprocess.run(
        [_venv_python(image_root), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {d["name"].lower() for d in json.loads(dists.stdout)}
    assert "onnxruntime-gpu" not in names, "onnxruntime and onnxruntime-gpu must never share an env"


@contextlib.contextmanager
def _serve(image_root: Path, recipe: dict, port: int) -> Iterator[subprocess.Popen]:
    root = image_root / "root"
    tmp = image_root / "tmpfs"
    tmp.mkdir(exist_ok=True)
    # Exactly the image's ENV (paths mapped) plus what Docker itself provides; nothing of ours.
    env = {**recipe["env"], "HOME": str(root / "nonexistent"), "TMPDIR": str(tmp)}
    program = shutil.which(recipe["cmd"][0], path=env["PATH"])
    assert program and Path(program).is_relative_to(root), f"{recipe['cmd'][0]} not in the image"
    argv = [program] + [
        {"0.0.0.0": "127.0.0.1", IMAGE_PORT: str(port)}.get(arg, arg) for arg in recipe["cmd"][1:]
    ]
    log = (image_root / "service.log").open("w")
    proc = subprocess.Popen(
        argv,
        cwd=root / recipe["workdir"].lstrip("/"),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def _wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vqtok-serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(OSError):
            status, _ = _request(port, "GET", "/health/ready")
            if status == 200:
                return
        time.sleep(0.3)
    pytest.fail(f"/health/ready not 200 after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def test_service_starts_from_the_image_cmd_and_encodes_a_photo(
    image_root: Path, recipe: dict
) -> None:
    root = image_root / "root"
    before = _tree_state(root)
    port = _free_port()
    log = image_root / "service.log"
    with _serve(image_root, recipe, port) as proc:
        _wait_ready(proc, port, log)

        # The image's HEALTHCHECK, run as Docker would (inside the container, so port mapped).
        health = [
            shutil.which(recipe["healthcheck"][0], path=recipe["env"]["PATH"]),
            *(arg.replace(f":{IMAGE_PORT}/", f":{port}/") for arg in recipe["healthcheck"][1:]),
        ]
        assert health[0] and Path(health[0]).is_relative_to(root)
        checked = subprocess.run(health, env=recipe["env"], capture_output=True, timeout=30)
        assert checked.returncode == 0, checked.stderr.decode()

        status, body = _request(port, "GET", "/health/live")
        assert status == 200

        payload, content_type = _multipart("images", "astronaut.png", _photo_png(), "image/png")
        status, body = _request(port, "POST", "/v1/encode", payload, {"Content-Type": content_type})
        assert status == 200, body[:2000]
        answer = json.loads(body)
        model_dir = Path(recipe["env"]["VQTOK_MODEL_DIR"])  # the baked model, path mapped
        assert model_dir.is_relative_to(root)
        model_json = json.loads((model_dir / "model.json").read_text())
        assert answer["model"]["id"] == model_json["id"]
        f, k = answer["model"]["downsample"], answer["model"]["codebook_size"]
        (item,) = answer["items"]
        tokens = np.asarray(item["tokens"])
        h, w = item["shape"]
        assert tokens.shape == (h, w)
        assert [h * f, w * f] == item["image_size"]
        assert item["original_size"] == [512, 512]
        assert tokens.min() >= 0 and tokens.max() < k
        assert len(np.unique(tokens)) > 1, "a real photo should not map to a single code"

        # `docker stop`: SIGTERM, then the service drains and exits on its own.
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"vqtok-serve ignored SIGTERM for 60 s:\n{log.read_text()[-4000:]}")
        # a clean drain exits 0; anything else (a crash, an error status, the signal) fails
        assert code == 0, log.read_text()[-4000:]

    # read_only: true in compose: the service must not write into the image's filesystem.
    after = _tree_state(root)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:10]
    assert os.listdir(image_root / "tmpfs") == [], "temporary files left behind in /tmp"
