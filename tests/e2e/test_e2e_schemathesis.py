"""schemathesis against the running service's own OpenAPI document, every phase (examples,
coverage, fuzzing, stateful): no 5xx, every answer as documented, schema-invalid requests refused.
The same run as `make fuzz` (benchmarks/fuzz.py), with fewer examples."""

from __future__ import annotations

from pathlib import Path

from e2e_support import Server

from benchmarks.fuzz import run_schemathesis


def test_openapi_contract_holds_for_generated_requests(server: Server, tmp_path: Path) -> None:
    cases = run_schemathesis(server.base_url, max_examples=25, seed=20261127, workdir=tmp_path)
    assert cases["exit_code"] == 0, cases
    assert cases["generated"] >= 200, cases
    assert cases["with_failures"] == 0 and cases["errored"] == 0, cases
