"""translator serve: replies equal offline translations under concurrent load, hostile requests get a 4xx and
change nothing, and the page works in a real headless browser."""

import http.client
import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from translator.checkpoint import load_model
from translator.config import DecodeConfig
from translator.lines import translate_lines

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402

from translator.serve import Limits, Translator, build_app  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def request(self, method, path, body=None, headers=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            connection.close()

    def translate(self, payload):
        return self.request("POST", "/translate", json.dumps(payload).encode())

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served(toy_model_dir):
    run_dir, data_dir = toy_model_dir
    model, tokenizer, recipe = load_model(run_dir)
    app = build_app(Translator(model, tokenizer, recipe, [str(run_dir)]),
                    limits=Limits(max_body_bytes=100_000, max_sentences=32, max_chars=300, max_beam=8),
                    batch_tokens=4096, max_wait_ms=20)
    server = Server(app)
    server.app, server.model, server.tokenizer, server.recipe = app, model, tokenizer, recipe
    server.sentences = (data_dir / "toy/valid.en").read_text().splitlines()
    yield server
    server.stop()


def offline(served, lines, beam=None, nbest=1):
    options = DecodeConfig(**{**served.recipe.decode.__dict__, **({"beam": beam} if beam else {})})
    mode = "greedy" if options.beam == 1 and nbest == 1 else "beam"
    return translate_lines(served.model, served.tokenizer, lines, options, mode, nbest)


def test_concurrent_requests_are_batched_and_each_reply_equals_the_offline_translation(served):
    sentences = served.sentences[:60]
    expected = dict(zip(sentences, (t[0] for t in offline(served, sentences).texts)))
    requests = [sentences[i:i + 1 + i % 3] for i in range(0, 60, 2)]  # 30 requests of 1 to 3 sentences
    before = served.app.state.batcher.batches
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda texts: served.translate({"text": texts}), requests))
    assert all(status == 200 for status, _ in replies)
    for texts, (_, reply) in zip(requests, replies):
        assert reply["translations"] == [expected[t] for t in texts]
    assert served.app.state.batcher.batches - before < len(requests)  # some requests shared a batch


def test_nbest_replies_carry_scores_best_first(served):
    lines = served.sentences[:3]
    status, reply = served.translate({"text": lines, "beam": 4, "nbest": 3})
    assert status == 200
    want = offline(served, lines, beam=4, nbest=3)
    for hyps, texts, scores in zip(reply["translations"], want.texts, want.scores):
        assert [h["text"] for h in hyps] == texts
        assert [h["score"] for h in hyps] == pytest.approx(scores, abs=1e-3)
        assert [h["score"] for h in hyps] == sorted((h["score"] for h in hyps), reverse=True)


def test_prefix_and_alignments_over_http(served):
    status, reply = served.translate({"text": ["the dog runs"], "prefix": ["Katze"], "alignments": True})
    assert status == 200 and reply["translations"][0].startswith("Katze")
    assert all("-" in link for link in reply["alignments"][0].split())


def test_health_and_info(served):
    assert served.request("GET", "/health") == (200, {"status": "ok"})
    status, info = served.request("GET", "/info")
    assert status == 200 and info["source_language"] == "en" and info["target_language"] == "de"
    assert info["parameters"] > 0 and info["decode"]["beam"] == served.recipe.decode.beam
    assert info["limits"]["max_sentences"] == 32 and info["recipe"]["model"]["d_model"] == 64


HOSTILE = [  # (what, body bytes or payload, extra headers, expected status)
    ("malformed JSON", b'{"text": ["a"', {}, 400),
    ("not JSON at all", b"\x00\x01\x02\xff", {}, 400),
    ("empty body", b"", {}, 400),
    ("deeply nested", b"[" * 50_000 + b"]" * 50_000, {}, 400),
    ("10 MB body", b'{"text": ["' + b"a" * 10_000_000 + b'"]}', {}, 413),
    ("a body of a list", [1, 2], {}, 422),
    ("no text", {"beam": 2}, {}, 422),
    ("text not a list", {"text": "the dog"}, {}, 422),
    ("non-string items", {"text": ["the dog", 7, None]}, {}, 422),
    ("nested items", {"text": [["the dog"]]}, {}, 422),
    ("empty list", {"text": []}, {}, 422),
    ("too many sentences", {"text": ["the dog"] * 33}, {}, 413),
    ("too long a sentence", {"text": ["dog " * 100]}, {}, 413),
    ("huge nbest", {"text": ["the dog"], "beam": 4, "nbest": 10 ** 9}, {}, 422),
    ("nbest over beam", {"text": ["the dog"], "beam": 2, "nbest": 3}, {}, 422),
    ("huge beam", {"text": ["the dog"], "beam": 10 ** 6}, {}, 422),
    ("zero beam", {"text": ["the dog"], "beam": 0}, {}, 422),
    ("beam true", {"text": ["the dog"], "beam": True}, {}, 422),
    ("beam a float", {"text": ["the dog"], "beam": 2.5}, {}, 422),
    ("lenpen NaN", b'{"text": ["the dog"], "lenpen": NaN}', {}, 422),
    ("lenpen huge", b'{"text": ["the dog"], "lenpen": 1e400}', {}, 422),
    ("lenpen a string", {"text": ["the dog"], "lenpen": "0.6"}, {}, 422),
    ("unknown option", {"text": ["the dog"], "temperature": 2}, {}, 422),
    ("lone surrogate", b'{"text": ["\\ud800"]}', {}, 422),
    ("prefix of another length", {"text": ["the dog", "a cat"], "prefix": ["Hund"]}, {}, 422),
    ("alignments not a bool", {"text": ["the dog"], "alignments": "yes"}, {}, 422),
]


@pytest.mark.parametrize("what,body,headers,status", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_requests_get_a_4xx_with_one_line(served, what, body, headers, status):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, reply = served.request("POST", "/translate", raw, headers)
    assert got == status, (what, reply)
    assert isinstance(reply["error"], str) and "\n" not in reply["error"] and reply["error"]


def test_hostile_requests_change_no_later_reply(served):
    lines = served.sentences[60:70] + ["a\x00b the dog", "the dog\nruns"]
    status, before = served.translate({"text": lines})
    assert status == 200 and len(before["translations"]) == len(lines)  # NUL bytes and line breaks are text
    for _what, body, headers, _ in HOSTILE:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        served.request("POST", "/translate", raw, headers)
    for garbage in (b"GARBAGE\r\n\r\n", b"POST /translate HTTP/1.1\r\nContent-Length: x\r\n\r\n", b"\x00" * 100):
        with socket.create_connection(("127.0.0.1", served.port), timeout=30) as raw_socket:
            raw_socket.sendall(garbage)
            assert raw_socket.recv(100).startswith(b"HTTP/1.1 400")  # uvicorn answers a broken request line
    chunked = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)  # no Content-Length: counted
    chunked.putrequest("POST", "/translate")
    chunked.putheader("Transfer-Encoding", "chunked")
    chunked.endheaders()
    for _ in range(200):
        chunked.send(b"1000\r\n" + b"a" * 4096 + b"\r\n")
    chunked.send(b"0\r\n\r\n")
    response = chunked.getresponse()
    assert response.status == 413
    chunked.close()
    assert served.request("GET", "/nowhere")[0] == 404 and served.request("GET", "/translate")[0] == 405
    assert served.translate({"text": lines}) == (200, before)
    assert before["translations"][:10] == [t[0] for t in offline(served, lines[:10]).texts]


# -- The page in a real browser ---------------------------------------------------------------------------------

def chromium():
    """(chromium, chromedriver) paths, or skip; under CI (TRANSLATOR_REQUIRE_BROWSER=1) fail instead."""
    found = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not all(found):
        message = "needs Debian's chromium and chromium-driver (apt install chromium chromium-driver)"
        if os.environ.get("TRANSLATOR_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


def test_the_page_translates_in_headless_chromium(served, tmp_path):
    browser_path, driver_path = chromium()
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(f"http://127.0.0.1:{served.port}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "en" in d.find_element(By.ID, "languages").text and "de" in
                   d.find_element(By.ID, "languages").text)
        sentence = served.sentences[5]
        driver.find_element(By.ID, "source").send_keys(sentence)
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.ID, "output").get_attribute("data-state") == "done")
        shown = [p.text for p in driver.find_elements(By.CSS_SELECTOR, "#output .translation")]
        assert shown == [offline(served, [sentence]).texts[0][0]]
        # n-best: each hypothesis with its score
        driver.find_element(By.ID, "nbest").clear()
        driver.find_element(By.ID, "nbest").send_keys("2")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#output .hypothesis")) == 2)
        first = driver.find_elements(By.CSS_SELECTOR, "#output .hypothesis")[0].text
        assert first.startswith(offline(served, [sentence], nbest=2).texts[0][0] + " (")
        assert driver.find_element(By.ID, "error").text == ""
    finally:
        driver.quit()
