"""HTTP end to end: the gateway, real workers, and the Starlette Request rebuilt in the replica."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI, Query
from fastapi.testclient import TestClient

from tests.conftest import Served


@pytest.fixture(scope="module")
def http(served: Served) -> httpx.Client:
    with served.http() as client:
        yield client


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
def test_any_method_and_sub_path_reach_call(http: httpx.Client, method: str) -> None:
    response = http.request(method, "/probe/a/b/c", params={"x": "1", "y": "two"})
    assert response.status_code == 200
    got = response.json()
    assert (got["method"], got["path"], got["query"]) == (method, "/probe/a/b/c", {"x": "1", "y": "two"})


def test_the_prefix_itself_reaches_call(http: httpx.Client) -> None:
    assert http.get("/probe").json()["path"] == "/probe"
    assert http.get("/probe/").json()["path"] == "/probe/"


def test_query_params_headers_and_body(http: httpx.Client) -> None:
    response = http.post(
        "/probe/echo?tag=a&tag=b&plain=%20space",
        content=b"raw bytes \x00\xff",
        headers={"X-Custom": "Value 1", "Content-Type": "application/octet-stream"},
    )
    got = response.json()
    assert got["query_multi"] == ["a", "b"] and got["query"]["plain"] == " space"
    assert got["headers"]["x-custom"] == "Value 1"
    assert got["body"] == "raw bytes \x00\xff"
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]


def test_json_body(http: httpx.Client) -> None:
    payload = {"text": "héllo", "n": [1, 2.5, None], "nested": {"ok": True}}
    assert http.post("/probe", json=payload).json()["json"] == payload


def test_urlencoded_form(http: httpx.Client) -> None:
    got = http.post("/probe/form", data={"name": "Ada", "lang": "en"}).json()
    assert got["form"] == {"name": "Ada", "lang": "en"}


def test_multipart_form_with_a_file(http: httpx.Client) -> None:
    got = http.post(
        "/probe/upload",
        data={"title": "report"},
        files={"doc": ("notes.txt", b"file contents", "text/plain")},
    ).json()
    assert got["form"] == {"title": "report", "doc": {"filename": "notes.txt", "content": "file contents"}}


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"data": {"a": "1", "b": "x y"}}, {"a": "1", "b": "x y"}),
        ({"data": {"t": "x"}, "files": {"f": ("f.txt", b"x", "text/plain")}}, {"t": "x", "f": "file f.txt"}),
    ],
)
def test_sync_methods_read_forms_with_form_sync(http: httpx.Client, kwargs: dict, expected: dict) -> None:
    response = http.post("/probe", headers={"X-Serve-Call-Method": "form_fields"}, **kwargs)
    assert (response.status_code, response.json()) == (200, expected)


def test_call_method_header_picks_another_method_returning_text(http: httpx.Client) -> None:
    response = http.post("/probe", content=b"quiet words", headers={"X-Serve-Call-Method": "shout"})
    assert response.status_code == 200
    assert response.text == "QUIET WORDS"
    assert response.headers["content-type"] == "text/plain; charset=utf-8"


def test_call_method_header_for_a_method_taking_no_request(http: httpx.Client) -> None:
    response = http.get("/probe", headers={"X-Serve-Call-Method": "handles"})
    assert response.json()["via_list"] == 3


def test_unknown_call_method_is_404(http: httpx.Client) -> None:
    response = http.get("/probe", headers={"X-Serve-Call-Method": "missing"})
    assert response.status_code == 404
    assert response.json()["error"] == "DeploymentNotFoundError"
    assert "missing" in response.json()["message"]


def test_a_returned_starlette_response_keeps_status_headers_and_body(http: httpx.Client) -> None:
    response = http.post("/probe", headers={"X-Serve-Call-Method": "created"})
    assert response.status_code == 201
    assert response.headers["x-a"] == "b"
    assert response.headers["content-type"].startswith("text/x-custom")
    assert response.content == b"made it"


def test_returned_bytes_are_sent_as_they_are(http: httpx.Client) -> None:
    response = http.get("/probe", headers={"X-Serve-Call-Method": "binary"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.content == bytes(range(256))


def test_sync_function_deployment_reads_json_and_query(http: httpx.Client) -> None:
    response = http.post("/fn/anything?scale=3", json={"b": 2, "a": 1})
    assert response.status_code == 200
    assert response.json() == {"keys": ["a", "b"], "total": 3, "scale": "3"}


def test_composition_over_http(http: httpx.Client) -> None:
    response = http.get("/compose")
    assert (response.status_code, response.text) == (200, "Hello world!")


def test_several_applications_side_by_side(served: Served, http: httpx.Client) -> None:
    routes = http.get("/-/routes").json()
    assert (
        routes.items()
        >= {
            "/probe": "Probe",
            "/compose": "Ingress",
            "/fn": "summarize",
            "/clf": "Classifier",
            "/busy": "busy",
            "/deadline": "deadline",
            "/load": "load",
        }.items()
    )
    assert http.get("/probe/x").json()["path"] == "/probe/x"
    assert http.post("/fn", json={"z": 5}).json()["total"] == 5
    assert http.get("/clf/healthcheck").status_code == 200


def test_a_prefix_matches_whole_path_segments_only(http: httpx.Client) -> None:
    response = http.get("/probeX")
    assert response.status_code == 404


# --- FastAPI ingress ----------------------------------------------------------------------------------


def test_fastapi_ingress_seed_classifier_routes(http: httpx.Client) -> None:
    assert http.get("/clf/test").json() == "Sentiment Classifier (0 -> Negative and 1 -> Positive)"
    health = http.get("/clf/healthcheck")
    assert (health.status_code, health.json()) == (200, "dummy check! Classifier is all ready to go!")
    classified = http.post("/clf/classify", params={"input_text": "ilikeyou"})
    assert classified.status_code == 200
    assert classified.json()["label"] == "POSITIVE" and classified.json()["text"] == "ilikeyou"


def test_fastapi_validation_error_is_exactly_plain_fastapis(http: httpx.Client) -> None:
    plain = FastAPI()

    @plain.post("/classify")
    async def predict_sentiment(input_text: str = Query(..., min_length=2)) -> dict:
        return {}

    expected = TestClient(plain).post("/classify?input_text=i")
    got = http.post("/clf/classify?input_text=i")
    assert got.status_code == expected.status_code == 422
    assert got.json() == expected.json()
    assert got.json()["detail"][0]["loc"] == ["query", "input_text"]
    missing = http.post("/clf/classify")
    assert missing.status_code == 422 and missing.json()["detail"][0]["type"] == "missing"


def test_fastapi_path_params_and_response_model_filtering(http: httpx.Client) -> None:
    assert http.get("/clf/items/42").json() == {"name": "item-42"}
    invalid = http.get("/clf/items/not-a-number")
    assert invalid.status_code == 422 and invalid.json()["detail"][0]["loc"] == ["path", "item_id"]


def test_fastapi_body_model_and_custom_status_code(http: httpx.Client) -> None:
    created = http.post("/clf/items", json={"name": "pen", "price": 1.5})
    assert (created.status_code, created.json()) == (201, {"created": "pen", "price": 1.5})
    assert http.post("/clf/items", json={"name": "pen"}).status_code == 422


def test_fastapi_unknown_route_and_wrong_method(http: httpx.Client) -> None:
    assert http.get("/clf/nowhere").status_code == 404
    assert http.get("/clf/classify").status_code == 405


# --- the gateway's own endpoints ----------------------------------------------------------------------


def test_healthz(http: httpx.Client) -> None:
    response = http.get("/-/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok" and response.json()["applications"] >= 7


def test_docs_and_openapi(http: httpx.Client) -> None:
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = http.get("/openapi.json").json()
    assert {"/-/healthz", "/-/routes"} <= set(schema["paths"])
