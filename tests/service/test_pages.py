"""The browser pages against the ASGI app (fake engine): the demo page, the offline docs and the
files they load. tests/e2e/test_e2e_browser.py renders them in a real chromium."""

from __future__ import annotations

import re
from urllib.parse import urljoin

from fastapi.testclient import TestClient
from service_fakes import FakeEngine, make_client

from service.pages import STATIC_DIR, static_assets

PAGES = ("/", "/docs", "/redoc")


def loaded_urls(html: str, page: str) -> list[str]:
    """Every src/href of a page, resolved against the page's URL."""
    found = re.findall(r"""(?:src|href|spec-url)=["']([^"']+)["']""", html)
    found += re.findall(r"""url: ?'([^']+)'""", html)  # Swagger UI's document URL
    return [urljoin(f"http://testserver{page}", url) for url in found]


def test_pages_load_only_files_the_service_serves(client: TestClient) -> None:
    for page in PAGES:
        response = client.get(page)
        assert response.status_code == 200, page
        assert response.headers["content-type"].startswith("text/html")
        # the browser refuses any request off the service, whatever a vendored bundle tries
        assert "default-src 'self'" in response.headers["content-security-policy"]
        urls = loaded_urls(response.text, page)
        assert urls, page
        for url in urls:
            if url.startswith("http://testserver/"):  # not the pages' own links out (none)
                assert client.get(url).status_code == 200, (page, url)
            else:
                raise AssertionError(f"{page} loads {url} from outside the service")


def test_docs_load_the_vendored_swagger_ui_and_redoc(client: TestClient) -> None:
    swagger = client.get("/docs").text
    assert "static/vendor/swagger-ui/swagger-ui-bundle.js" in swagger
    assert '"validatorUrl": null' in swagger  # no badge fetched from validator.swagger.io
    assert "static/vendor/redoc/redoc.standalone.js" in client.get("/redoc").text
    assert "fonts.googleapis.com" not in client.get("/redoc").text
    bundle = client.get("/static/vendor/swagger-ui/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and "javascript" in bundle.headers["content-type"]
    # Swagger UI 5 renders OpenAPI 3.1 (what FastAPI writes); 4.x shows an error instead
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    assert (STATIC_DIR / "vendor" / "swagger-ui" / "LICENSE").is_file()
    assert (STATIC_DIR / "vendor" / "redoc" / "LICENSE").is_file()


def test_static_answers_only_its_own_files(client: TestClient) -> None:
    assert client.get("/static/demo.css").headers["content-type"].startswith("text/css")
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/nope.js", "/static/"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/problem+json"
    assert all(
        path.resolve().is_relative_to(STATIC_DIR.resolve()) for path in static_assets().values()
    )


def test_pages_stay_out_of_the_api_document(client: TestClient) -> None:
    paths = set(client.get("/openapi.json").json()["paths"])
    assert paths and paths.isdisjoint({"/", "/docs", "/redoc", "/static/{asset}"})
    assert all(path.startswith(("/v1/", "/health/", "/metrics")) for path in paths)


def test_page_requests_are_counted_by_route(client: TestClient) -> None:
    client.get("/")
    client.get("/static/demo.js")
    text = client.get("/metrics").text
    assert 'route="/",status="200"' in text
    assert 'route="/static/{asset:path}",status="200"' in text


def test_pages_need_no_api_key(fake_engine: FakeEngine) -> None:
    # the page asks for the key and sends it with /v1/* calls; it must load without one
    with make_client(fake_engine, api_key="secret") as client:
        for page in (*PAGES, "/static/demo.js", "/openapi.json"):
            assert client.get(page).status_code == 200, page
        assert client.get("/v1/model").status_code == 401
