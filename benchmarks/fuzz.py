"""schemathesis against a real vqtok-serve: every phase, every response check, ≥ 1000 cases.

    .venv/bin/python -m benchmarks.fuzz                      # make fuzz: models/default, 1000+
    .venv/bin/python -m benchmarks.fuzz --max-examples 20    # quick

The service's own OpenAPI document is the contract: no 5xx, every status, media type, header
and body as documented, schema-invalid requests refused (negative_data_rejection), and the
stateful phase chains encode → decode through the documented links. Output: schemathesis's
report, then exactly one final line of JSON (cases generated, failures, errors).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, ServiceProcess

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance,negative_data_rejection"
)
PHASES = "examples,coverage,fuzzing,stateful"
# A schema-invalid request may be refused as too large (413: more files than max_images) as well
# as malformed or invalid: all are documented refusals.
CONFIG = """
[checks.negative_data_rejection]
expected-statuses = [400, 401, 409, 413, 415, 422]
"""


def run_schemathesis(base_url: str, max_examples: int, seed: int, workdir: Path) -> dict:
    """One schemathesis run; returns its JSON report's case counts plus the exit code."""
    report = workdir / "schemathesis.json"
    config = workdir / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config),
        "run", base_url + "/openapi.json",
        "--checks", CHECKS, "--phases", PHASES, "--max-examples", str(max_examples),
        "--seed", str(seed), "--generation-database", "none", "--workers", "1",
        "--request-timeout", "60", "--no-color",
        "--report", "json", "--report-json-path", str(report),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
    print(done.stdout[-8000:], done.stderr[-2000:], sep="\n")
    cases = json.loads(report.read_text())["test_cases"] if report.is_file() else {}
    return {"exit_code": done.returncode, **cases}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--max-examples", type=int, default=150, help="per operation and phase")
    parser.add_argument("--seed", type=int, default=20261201)
    args = parser.parse_args(argv)
    flags = ["--model-dir", str(args.model_dir), "--pre-stop-delay-s", "0"]
    with ServiceProcess(flags) as server, tempfile.TemporaryDirectory() as workdir:
        result = run_schemathesis(server.url, args.max_examples, args.seed, Path(workdir))
    result = {"benchmark": "fuzz", "max_examples": args.max_examples, **result}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["exit_code"] == 0 else 1)
