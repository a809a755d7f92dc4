"""schemathesis against the running service's own OpenAPI document: no 5xx, and every answer
(status, media type, headers, body) is one the document describes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from e2e_support import Server

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance"
)


def test_openapi_contract_holds_for_generated_requests(server: Server, tmp_path: Path) -> None:
    report = tmp_path / "schemathesis.json"
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", server.base_url + "/openapi.json",
        "--checks", CHECKS,
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", "40",
        "--seed", "20261127",
        "--generation-database", "none",
        "--workers", "1",
        "--request-timeout", "30",
        "--no-color",
        "--report", "json", "--report-json-path", str(report),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    cases = json.loads(report.read_text())["test_cases"]
    assert cases["generated"] >= 200, cases
    assert cases["with_failures"] == 0 and cases["errored"] == 0, cases
