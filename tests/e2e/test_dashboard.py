"""The dashboard in Debian's headless chromium: its charts move with traffic, and optional ones appear."""

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from openai import OpenAI
from prometheus_client import Counter
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tokenmill.config import ServerConfig
from tokenmill.outputs import CompletionOutput, DraftCounters, EngineStats, RequestMetrics, RequestOutput
from tokenmill.server.dashboard import dashboard_router
from tokenmill.server.errors import install_handlers
from tokenmill.server.metrics import Metrics
from tokenmill.server.serving import ServerState

# Set to a path (docs/dashboard.png for the README) to keep the screenshot taken after the traffic.
SCREENSHOT = os.environ.get("TOKENMILL_DASHBOARD_SCREENSHOT")


@pytest.fixture
def browser():
    """Headless chromium through Debian's matching chromedriver (.ci/run installs both)."""
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1300,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))
    yield driver
    driver.quit()


def _series(driver, chart: str) -> dict[str, list[float | None]]:
    raw = driver.find_element("id", f"chart-{chart}").get_attribute("data-series")
    return json.loads(raw) if raw else {}


def _peak(series: dict[str, list[float | None]]) -> float:
    return max((v for values in series.values() for v in values if v is not None), default=0.0)


def _wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def test_charts_move_after_traffic(server, browser, tmp_path):
    # Earlier tests' requests (aborted ones included) must have finished, or they would count as this traffic.
    _wait_for(lambda: server.metric("tokenmill:num_requests_running") + server.metric("tokenmill:num_requests_waiting")
              == 0, timeout=30)
    browser.get(f"{server.url}/dashboard")
    # From the second poll on, rates: all zero, since nothing has finished since the page opened.
    _wait_for(lambda: len(next(iter(_series(browser, "requests").values()), [])) >= 3, timeout=15)
    assert _peak(_series(browser, "requests")) == 0 and _peak(_series(browser, "tokens")) == 0
    assert _peak(_series(browser, "prefix")) == 0  # nothing looked up: gaps

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    prompt = "You are a helpful assistant. Answer briefly. " * 6  # 3 blocks the later prompts find cached
    for question in ("What is 2 + 2?", "Name a colour.", "Name a fruit."):
        client.completions.create(model="smollm2-135m", prompt=prompt + question, max_tokens=6, temperature=0)

    # A poll may land between the requests (the first alone finds nothing cached): wait for one after the last.
    _wait_for(lambda: _peak(_series(browser, "requests")) > 0 and _peak(_series(browser, "prefix")) > 0, timeout=10)
    tokens = _series(browser, "tokens")
    assert _peak({"output": tokens["output"]}) > 0 and _peak({"prompt": tokens["prompt"]}) > 0
    assert all(values[-1] > 0 for values in _series(browser, "ttft").values())  # p50, p90, p99
    assert browser.find_element("id", "chart-requests").find_elements("css selector", "polyline")
    assert browser.find_element("id", "chart-spec").is_displayed() is False  # no drafter: no acceptance chart
    assert "error" not in browser.find_element("id", "status").get_attribute("class")

    # The page catches up with the idle server (its polls lag behind while the engine holds the cores).
    _wait_for(lambda: _series(browser, "load")["running"][-1] == 0, timeout=15)
    shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


@pytest.fixture
def two_model_metrics():
    """A dashboard-only app in this process, with an API key, over two models' series (`big`, `small`) that the
    test moves."""
    metrics = Metrics("big")
    metrics.for_model("small")
    app = FastAPI()
    install_handlers(app)
    app.include_router(dashboard_router("s3cret"))
    # The data route reads only the served names from the models; no engine is needed to draw their series.
    app.state.tokenmill = ServerState(dict.fromkeys(["big", "small"]), ServerConfig(), metrics)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_for(lambda: server.started, timeout=10)
    yield f"http://127.0.0.1:{port}", metrics, app.state.tokenmill
    server.should_exit = True
    thread.join(10)


def test_routing_and_speculation_charts_appear_with_their_series(two_model_metrics, browser):
    url, metrics, _ = two_model_metrics
    routing = Counter("tokenmill:routing_decisions", "Requests routed, by reason.", ["reason"],
                      registry=metrics.registry)
    browser.get(f"{url}/dashboard")
    _wait_for(lambda: "API key" in browser.find_element("id", "status").text, timeout=10)
    browser.get(f"{url}/dashboard#key=s3cret")
    browser.refresh()  # a new fragment alone does not reload the page
    _wait_for(lambda: len(_series(browser, "kv").get("big", [])) >= 2, timeout=15)
    assert not any(browser.find_element("id", f"chart-{c}").is_displayed() for c in ("routed", "routing", "spec"))

    for step in range(1, 4):
        metrics.observe_stats(EngineStats(1, 0, 100 - 10 * step, 100, prefix_queries=0, prefix_hits=0,
                                          num_preemptions=0, drafts=DraftCounters(step, 4 * step, 3 * step, [])))
        metrics.observe_route("small", "cascade", "confident")
        routing.labels("prefix").inc()
        time.sleep(1.1)  # a poll in between
    _wait_for(lambda: _peak(_series(browser, "routing")) > 0, timeout=10)
    assert all(browser.find_element("id", f"chart-{c}").is_displayed() for c in ("routed", "routing", "spec"))
    assert 75 in _series(browser, "spec")["big"]  # 3 of every 4 draft tokens accepted
    routed = _series(browser, "routed")
    assert _peak({"small": routed["small"]}) > 0 and _peak({"big": routed["big"]}) == 0
    assert _series(browser, "kv")["big"][-1] == pytest.approx(30)  # a line per model


def test_a_counter_that_falls_is_a_gap_not_a_negative_rate(two_model_metrics, browser):
    url, metrics, state = two_model_metrics
    done = RequestOutput("r", None, [1, 2, 3], [CompletionOutput(0, "a", [4], "length")], True, 0,
                         RequestMetrics(0.0, first_scheduled_time=0.1, token_times=[0.5], token_samples=[0],
                                        finished_time=0.5))
    for _ in range(5):
        metrics.observe_finished(done)
    browser.get(f"{url}/dashboard#key=s3cret")
    _wait_for(lambda: len(_series(browser, "requests").get("big", [])) >= 2, timeout=15)
    # As when a replica leaves `serve --replicas`' sum, or restarts: the counters start again from fewer.
    state.metrics = Metrics("big")
    state.metrics.for_model("small")
    state.metrics.observe_finished(done)
    _wait_for(lambda: len(_series(browser, "requests").get("big", [])) >= 5, timeout=15)
    values = [v for line in ("requests", "tokens") for series in _series(browser, line).values() for v in series]
    assert all(v is None or v >= 0 for v in values) and None in _series(browser, "requests")["big"]
