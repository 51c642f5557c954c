"""`mtrain serve`: a real server on 127.0.0.1 answers as `mtrain translate` does, batches concurrent
requests, refuses bad input with a 4xx JSON line and keeps serving, and its page works in Chromium."""

import concurrent.futures
import json
import logging
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLE_DE, SAMPLE_EN

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from mtrain import checkpoint  # noqa: E402
from mtrain.attention import alignment_layer, line_attention  # noqa: E402
from mtrain.device import pick_device  # noqa: E402
from mtrain.serve import Limits, Translator, make_app  # noqa: E402
from mtrain.translate import Inspect, tag_piece, translate_lines, translate_texts, with_overrides  # noqa: E402

SOURCES = SAMPLE_EN.read_text().splitlines()
GERMAN = SAMPLE_DE.read_text().splitlines()


@pytest.fixture(scope="module")
def model_path(tagged_model) -> Path:
    """A tiny model that learned two tagged corpora: <2de> the German, <2en> the English copied."""
    return tagged_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread of this process, on 127.0.0.1 and a free port."""

    def __init__(self, translator, limits=Limits(), max_wait_ms=20.0, max_batch_tokens=32768):
        self.app = make_app(translator, limits, max_wait_ms, max_batch_tokens)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


def call(url: str, body=None, raw: bytes | None = None, timeout: float = 60) -> tuple[int, dict]:
    """(status, JSON answer) of a GET, or of a POST of `body` as JSON (or of `raw` bytes)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def translator(model_path):
    return Translator([model_path], "cpu", "fp32", False, 1)  # as --beam 1: greedy unless a request asks


@pytest.fixture(scope="module")
def server(translator):
    with Server(translator, Limits(max_body_bytes=4000, max_lines=8, max_chars=200), max_wait_ms=50) as s:
        yield s


def reference(model_path, lines, tag, inspect=None, **decode):
    """What `mtrain translate` writes for these lines (its own function, in this process)."""
    model, toks, cfg = checkpoint.load_for_inference([model_path])
    return list(translate_lines(lines, model, toks, with_overrides(cfg.decode, **decode), pick_device("cpu", "fp32"),
                                inspect=inspect, tag=tag_piece(tag, toks, cfg.data.tags)))


def test_translate_equals_mtrain_translate(server, model_path):
    """The API's translations and n-best scores are `mtrain translate`'s, for either tag; the CLI
    itself (a subprocess) gives the same best lines."""
    lines = SOURCES[:6]
    status, answer = call(server.url + "/translate", {"text": lines, "tag": "<2de>", "beam": 3, "nbest": 2})
    assert status == 200, answer
    expected = reference(model_path, lines, "<2de>", beam=3, nbest=2)
    got = [f"{n} ||| {h['text']}" for n, item in enumerate(answer["translations"]) for h in item["nbest"]]
    assert got == [" ||| ".join(x.split(" ||| ")[:2]) for x in expected]
    scores = [h["score"] for item in answer["translations"] for h in item["nbest"]]
    assert scores == pytest.approx([float(x.split(" ||| ")[2]) for x in expected], abs=2e-4)
    status, answer = call(server.url + "/translate", {"text": lines, "tag": "<2en>"})
    cli = subprocess.run([sys.executable, "-m", "mtrain", "translate", "-c", str(model_path), "--tag", "<2en>",
                          "--beam", "1"],
                         input="\n".join(lines) + "\n", capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    assert [t["text"] for t in answer["translations"]] == cli.stdout.splitlines() == lines


def test_attention_is_translates_own(server, model_path):
    """Each line's matrix is the penultimate layer's cross-attention (heads averaged) that
    `translate --attention` draws, rows summing to 1; the alignment is `translate --alignment`'s."""
    lines = SOURCES[6:9]
    status, answer = call(server.url + "/translate", {"text": lines, "tag": "<2de>", "attention": True})
    assert status == 200, answer
    aligned = reference(model_path, lines, "<2de>", inspect=Inspect("pieces"), beam=1)
    model, toks, cfg = checkpoint.load_for_inference([model_path])
    tag = tag_piece("<2de>", toks, cfg.data.tags)
    outputs = [toks.tgt.encode_batch([t["text"]])[0] for t in answer["translations"]]
    mine = list(line_attention(model, toks, toks.src.encode_batch(lines), outputs, tag))
    for item, line, (w, src, out) in zip(answer["translations"], aligned, mine):
        att = item["attention"]
        assert att["alignment"] == line.split(" ||| ")[1]
        assert att["source"] == [*src, "</s>"] and att["source"][0] == "<2de>" and att["source_offset"] == 1
        assert att["target"] == [*out, "</s>"]
        weights = w[alignment_layer(w.shape[0])].mean(0)
        assert len(att["weights"]) == len(out) + 1 and all(len(r) == len(src) + 1 for r in att["weights"])
        for row, want in zip(att["weights"], weights.tolist()):
            assert sum(row) == pytest.approx(1.0, abs=1e-3)
            assert row == pytest.approx(want, abs=1e-4)


def test_health_and_info_answer_without_paths(server, model_path):
    status, health = call(server.url + "/health")
    assert status == 200 and health["status"] == "ok"
    status, info = call(server.url + "/info")
    assert status == 200
    assert info["tags"] == ["<2de>", "<2en>"] and info["ensemble"] is False
    assert info["models"][0]["model"]["d_model"] == 64 and info["models"][0]["step"] == 600
    assert info["limits"]["max_lines"] == 8
    text = json.dumps(info)
    assert str(model_path.parent) not in text and str(SAMPLE_EN) not in text and "spm" not in text
    status, spec = call(server.url + "/openapi.json")
    assert status == 200 and {"/translate", "/health", "/info"} <= set(spec["paths"])
    body = spec["paths"]["/translate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"text", "beam", "tag", "attention"} <= set(body["properties"])


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, model_path):
    """16 client threads x 10 one-line requests: 160 answers, each the translation of its own line,
    and the server's counters show beam-search steps that served several requests at once."""
    _, before = call(server.url + "/health")
    expected = dict(zip(SOURCES, reference(model_path, SOURCES, "<2de>", beam=1)))
    assert list(expected.values()) == GERMAN  # the tiny model learned them

    def client(n):
        answers = []
        for k in range(10):
            line = SOURCES[(n * 10 + k) % len(SOURCES)]
            status, answer = call(server.url + "/translate", {"text": [line], "tag": "<2de>"})
            answers.append((line, status, answer))
        return answers

    with ThreadPoolExecutor(16) as pool:
        results = [a for part in pool.map(client, range(16)) for a in part]
    assert len(results) == 160
    for line, status, answer in results:
        assert status == 200, answer
        assert [t["text"] for t in answer["translations"]] == [expected[line]]
    _, after = call(server.url + "/health")
    assert after["requests"] - before["requests"] == 160
    steps, request_steps = (after[k] - before[k] for k in ("steps", "request_steps"))
    assert request_steps > 1.5 * steps  # a step served two requests or more, on average
    assert after["largest_batch"] > 1 and after["batched_requests"] > before["batched_requests"]
    assert after["errors"] == before["errors"] and after["waiting"] == 0


BAD = [  # (body bytes, status, the error names ...)
    (b"{not json", 400, r"not JSON"),
    (b"", 400, r"body is empty"),
    (b'{"text": ["caf\xe9"]}', 400, r"not UTF-8 \(byte 14"),
    (b'["a dog ."]', 422, r"must be a JSON object, got list"),
    (b'{"lines": ["a dog ."]}', 422, r"unknown option 'lines'"),
    (b'{"beam": 2}', 422, r"text: missing"),
    (b'{"text": "a dog ."}', 422, r"text: must be a list of strings"),
    (b'{"text": [1, 2]}', 422, r"text: must be a list of strings"),
    (b'{"text": ["a dog .", "a cat .\\nruns ."]}', 422, r"text\[1\]: holds a line break"),
    (b'{"text": []}', 422, r"text: the list is empty"),
    (b'{"text": ["a dog ."], "beam": "5"}', 422, r'beam: must be an integer, got "5"'),
    (b'{"text": ["a dog ."], "beam": 2.5}', 422, r"beam: must be an integer, got 2.5"),
    (b'{"text": ["a dog ."], "beam": 0}', 422, r"beam and nbest must be >= 1"),
    (b'{"text": ["a dog ."], "beam": 99}', 413, r"beam: 99, over the limit of 32"),
    (b'{"text": ["a dog ."], "beam": 2, "nbest": 3}', 422, r"nbest \(3\) cannot exceed beam \(2\)"),
    (b'{"text": ["a dog ."], "attention": "yes"}', 422, r"attention: must be true or false"),
    (b'{"text": ["a dog ."], "tag": "<2fr>"}', 422, r"tag <2fr>: not a tag this model was trained with \(its tags: "
                                                    r"<2de>, <2en>\)"),
    (b'{"text": ["a dog ."], "tag": 7}', 422, r"tag: must be a string"),
    (json.dumps({"text": ["a dog ."] * 9}).encode(), 413, r"9 lines, over the limit of 8"),
    (json.dumps({"text": ["ok", "x" * 201]}).encode(), 413, r"text\[1\]: 201 characters, over the limit of 200"),
    (json.dumps({"text": ["a dog ."], "pad": "x" * 5000}).encode(), 413, r"over the limit of 4,000"),
    # Whatever a body makes the parser or the checks raise is the client's error (a 500 before):
    (b"[" * 1990 + b"]" * 1990, 400, r"nested too deeply"),  # within the test server's 4,000 bytes
    (b'{"text": ["a dog ."], "lenpen": NaN}', 400, r"NaN is not a JSON number"),
    (b'{"text": ["a dog ."], "lenpen": -Infinity}', 400, r"-Infinity is not a JSON number"),
    (b'{"text": ["a dog ."], "lenpen": 1e999}', 400, r"the number 1e999, too large for a float"),
    (b'{"text": ["a \\ud800 dog ."]}', 422, r"text\[0\]: holds an unpaired surrogate \(U\+D800\)"),
    (b'{"text": ' + b"[" * 1900 + b"]" * 1900 + b"}", 400, r"nested too deeply"),
    # Constraints and prefixes: one item per line, checked
    (b'{"text": ["a dog ."], "constraints": ["hund"]}', 422, r"constraints\[0\]: must be a list of strings"),
    (b'{"text": ["a dog .", "x"], "constraints": [["hund"]]}', 422, r"constraints: must be a list with one item per "
                                                                   r"line of text \(2\)"),
    (b'{"text": ["a dog ."], "constraints": [[""]]}', 422, r"line 0: an empty constraint phrase"),
    (json.dumps({"text": ["a dog ."], "constraints": [["hund"] * 17]}).encode(), 413,
     r"constraints\[0\]: 17 phrases, over the limit of 16 per line"),
    (json.dumps({"text": ["a dog ."], "constraints": [["☃"]]}).encode(), 422, r"target tokenizer does not know"),
    (b'{"text": ["a dog ."], "prefix": [3]}', 422, r"prefix\[0\]: must be a string"),
    (json.dumps({"text": ["a dog ."], "prefix": ["ein " * 40]}).encode(), 422, r"line 0: the prefix has \d+ pieces"),
    # Each request's work is bounded in KV-cache positions, as --max-batch-tokens counts them:
    (json.dumps({"text": ["a dog runs on the grass and the man holds a red ball . " * 3] * 8,
                 "beam": 32}).encode(), 413, r"the request needs [\d,]+ positions of KV cache \(8 lines x beam 32 x "
                                             r"\d+ output positions\), over the server's --max-batch-tokens 32,768"),
]


def test_constraints_and_prefixes_are_served_batched_with_other_requests(server, model_path):
    """Requests with constraints or a prefix share the search with plain ones; each answer is what
    `mtrain translate` gives with the same constraints, and says whether they were met."""
    from mtrain.guide import Wish
    model, toks, cfg = checkpoint.load_for_inference([model_path])
    lines = SOURCES[:4]
    constraints = [["fahrrad"], [], ["katze", "sofa"], []]
    prefixes = ["", "", "", "ein ma"]
    want = [r.texts[0] for r in translate_texts(lines, model, toks, with_overrides(cfg.decode, beam=3),
                                                 pick_device("cpu", "fp32"), tag=tag_piece("<2de>", toks, cfg.data.tags),
                                                 wishes=[Wish(tuple(c), p) for c, p in zip(constraints, prefixes)])]
    bodies = [{"text": lines, "tag": "<2de>", "beam": 3, "constraints": constraints, "prefix": prefixes},
              {"text": lines, "tag": "<2de>", "beam": 3}] * 3
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda b: call(server.url + "/translate", b), bodies))
    plain = reference(model_path, lines, "<2de>", beam=3)
    for n, (code, answer) in enumerate(answers):
        assert code == 200, answer
        got = [t["text"] for t in answer["translations"]]
        if n % 2:
            assert got == plain and all("constraints_met" not in t for t in answer["translations"])
        else:
            assert got == want
            assert "fahrrad" in got[0] and "katze" in got[2] and "sofa" in got[2] and got[3].startswith("ein ma")
            assert [t.get("constraints_met") for t in answer["translations"]] == [True, None, True, None]


@pytest.mark.parametrize("raw,status,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_gets_a_4xx_json_line_and_the_server_keeps_serving(server, raw, status, message):
    code, answer = call(server.url + "/translate", raw=raw)
    assert code == status and re.search(message, answer["error"]), answer
    assert "\n" not in answer["error"] and "Traceback" not in answer["error"]
    code, answer = call(server.url + "/translate", {"text": [SOURCES[0]], "tag": "<2de>"})
    assert code == 200 and answer["translations"][0]["text"] == GERMAN[0]


def test_no_mangled_body_is_a_server_error(server):
    """Bodies cut, with bytes flipped, dropped or repeated (seeded): each is answered, and with a 4xx
    whenever it is not a good request; never a 500."""
    import random

    rng = random.Random(7)
    good = json.dumps({"text": [SOURCES[0], "a \u00e9 dog"], "tag": "<2de>", "beam": 2, "nbest": 2,
                       "lenpen": 0.6, "attention": False}).encode()
    codes = []
    for _ in range(150):
        body = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            if not body:
                break
            at = rng.randrange(len(body))
            kind = rng.randrange(4)
            if kind == 0:
                body[at] = rng.randrange(256)
            elif kind == 1:
                del body[at:at + rng.randint(1, 8)]
            elif kind == 2:
                body[at:at] = body[at:at + rng.randint(1, 8)] * rng.randint(1, 3)
            else:
                body = body[:at]
        code, answer = call(server.url + "/translate", raw=bytes(body))
        codes.append(code)
        assert code == 200 or (400 <= code < 500 and "\n" not in answer["error"]), (bytes(body), code, answer)
    assert codes.count(200) < len(codes) / 2  # most mangled bodies are refused, as they should be


def test_a_model_error_is_a_500_logged_once_and_the_server_goes_on(server, caplog):
    model = server.app.state.batcher.engine.model

    def broken(*args):
        raise RuntimeError("CUDA out of memory (simulated)\nsecond line")

    model.log_probs = broken  # the first step fails
    try:
        with caplog.at_level(logging.ERROR, logger="mtrain.serve"):
            code, answer = call(server.url + "/translate", {"text": ["a dog ."], "tag": "<2de>"})
    finally:
        del model.log_probs
    assert code == 500 and answer["error"] == "translation failed: RuntimeError: CUDA out of memory (simulated)"
    assert len([r for r in caplog.records if "CUDA out of memory" in r.getMessage()]) == 1
    code, answer = call(server.url + "/translate", {"text": [SOURCES[1]], "tag": "<2de>"})
    assert code == 200 and answer["translations"][0]["text"] == GERMAN[1]


def test_an_ensemble_server_refuses_attention(model_path):
    translator = Translator([model_path, model_path], "cpu", "fp32", False, 2)
    with Server(translator) as s:
        code, answer = call(s.url + "/translate", {"text": [SOURCES[2]], "tag": "<2de>"})
        assert code == 200 and answer["translations"][0]["text"] == GERMAN[2]  # a model with itself: its own
        code, answer = call(s.url + "/translate", {"text": [SOURCES[2]], "tag": "<2de>", "attention": True})
        assert code == 422 and "ensemble of 2" in answer["error"]
        assert call(s.url + "/info")[1]["ensemble"] is True


def test_sigterm_finishes_the_request_in_flight_then_exits(model_path):
    """`mtrain serve` in its own process: a request waiting in a batch when SIGTERM comes still gets
    its translation; then the process ends by itself and the port is closed."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mtrain", "serve", str(model_path), "--port", str(port),
                             "--max-wait-ms", "1500", "--device", "cpu"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if call(url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(call, url + "/translate", {"text": [SOURCES[3]], "tag": "<2de>"})
            time.sleep(0.5)  # the request is in, waiting 1.5 s for company
            proc.send_signal(signal.SIGTERM)
            status, answer = pending.result(timeout=30)
        assert status == 200 and answer["translations"][0]["text"] == GERMAN[3]
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Traceback" not in out
    with pytest.raises(OSError):
        call(url + "/health", timeout=2)


def browser():
    """Headless Chromium through Selenium and Debian's chromedriver (no browser downloads here)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (apt install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=390,844"):  # a phone's width
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))


def test_the_page_in_a_real_browser(server, tmp_path):
    """Type a sentence, press Translate, read the translation off the page (the API's), hover an
    output word and see its aligned source word lit; the page fits a phone's width, loads nothing
    from elsewhere, and its screenshot is not blank."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    html = urllib.request.urlopen(server.url + "/", timeout=10).read().decode()
    assert not re.search(r"""\b(src|href)\s*=\s*["']|https?://|@import|url\(""", html)  # self-contained
    line = SOURCES[4]
    _, api = call(server.url + "/translate", {"text": [line], "tag": "<2de>", "attention": True})
    driver = browser()
    try:
        driver.get(server.url + "/")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "tag").find_elements(By.TAG_NAME, "option"))
        Select(driver.find_element(By.ID, "tag")).select_by_visible_text("<2de>")
        driver.find_element(By.ID, "source").send_keys(line)
        driver.find_element(By.ID, "translate").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "results").get_attribute("data-done"))
        assert driver.find_element(By.ID, "error").text == ""
        words = driver.find_elements(By.CSS_SELECTOR, "#results .out .word")
        assert " ".join(w.text for w in words) == api["translations"][0]["text"] == GERMAN[4]
        assert not driver.find_elements(By.CSS_SELECTOR, "#results .src .word.aligned")
        ActionChains(driver).move_to_element(words[1]).perform()
        lit = driver.find_elements(By.CSS_SELECTOR, "#results .src .word.aligned")
        att = api["translations"][0]["attention"]
        row = att["weights"][1][att["source_offset"]:-1]
        best = att["source"][att["source_offset"] + row.index(max(row))].lstrip("\u2581")
        assert [w.text for w in lit] and any(best in w.text for w in lit)  # the source word the piece looks at most
        assert driver.find_elements(By.CSS_SELECTOR, "#results .heat tr.active")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#results .heat td")) == sum(map(len, att["weights"]))
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        # The glossary: a term whose source occurs in the line is a constraint, and lit in the output
        done = driver.find_element(By.ID, "results").get_attribute("data-done")
        driver.find_element(By.ID, "source").clear()
        driver.find_element(By.ID, "source").send_keys(SOURCES[1] + "\n" + SOURCES[2])
        driver.find_element(By.CSS_SELECTOR, "#glossarybox summary").click()
        driver.find_element(By.ID, "glossary").send_keys("Playing = park\ncat = katze")
        driver.find_element(By.ID, "translate").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "results").get_attribute("data-done") != done)
        assert driver.find_element(By.ID, "error").text == ""
        _, want = call(server.url + "/translate", {"text": SOURCES[1:3], "tag": "<2de>", "attention": True,
                                                   "constraints": [["park"], []]})
        outs = driver.find_elements(By.CSS_SELECTOR, "#results .out")
        assert [o.text.split() for o in outs] == [t["text"].split() for t in want["translations"]]
        assert "park" in outs[0].text.split() and outs[1].text == GERMAN[2]  # no term of line 2 occurs in it
        assert [w.text for w in driver.find_elements(By.CSS_SELECTOR, "#results .out .word.term")] == ["park"]
        loaded = driver.execute_script("return performance.getEntriesByType('resource').map((r) => r.name)")
        assert loaded and all(x.startswith(server.url + "/") for x in loaded)  # /info and /translate only
        shot = tmp_path / "page.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    import matplotlib.image
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[1] >= 300 and pixels.std() > 0.05  # text and a heatmap, not one flat colour
    assert (pixels.reshape(-1, 3) < 0.3).all(axis=1).mean() > 0.001  # some dark pixels: text was drawn


def test_bench_serve_answers_as_the_file_does(model_path, tmp_path):
    """scripts/bench_serve.py on the tiny model: every setting served every line, each answer equal
    to the file translation of its line."""
    source = tmp_path / "test.en"
    source.write_text("\n".join(SOURCES[:12]) + "\n")
    run = subprocess.run([sys.executable, "scripts/bench_serve.py", "-c", str(model_path), "-i", str(source),
                          "--tag", "<2de>", "--clients", "1,3", "--single", "3", "--seconds", "120"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = re.findall(r"^\| serve, (\d) clients? \| (\d+) \| [\d.]+ \(\*\*[\d.]+×\*\* the file\) \| [\d.]+ \| "
                      r"[\d.]+ \(\*\*[\d.]+×\*\* alone\) .*\| (\d+) \|$", run.stdout, re.M)
    assert rows == [("1", "12", "0"), ("3", "12", "0")], run.stdout
    # the server's own decoding, 3 lines in flight without HTTP, answers as the file too
    assert re.search(r"^\| the server's decoding alone, 3 lines in flight, no HTTP \| 12 \| .*\| 3 \| 0 \|$",
                     run.stdout, re.M), run.stdout
    # and the file translated 3 sentences at a time, the server's batch size, answers as the file
    assert re.search(r"^\| the file in sorted batches of 3 sentences, no server \| 12 \| .*\| 0 \|$",
                     run.stdout, re.M), run.stdout


def test_a_port_in_use_is_one_line_before_the_model_loads(model_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "mtrain", "serve", str(model_path), "--port", str(port)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr == f"mtrain: --host 127.0.0.1 --port {port}: cannot listen there " \
                                             f"(Address already in use)\n", r.stderr


class Steps:
    """A stand-in engine for the worker: each admitted job needs as many steps as it has lines."""

    def __init__(self):
        self.left, self.admitted, self.answered = {}, [], []

    def admit(self, job):
        self.left[id(job)] = (job, len(job.lines))
        self.admitted.append(job.lines[0])

    def step(self):
        self.left = {k: (job, n - 1) for k, (job, n) in self.left.items()}
        done = [(job, len(job.lines)) for job, n in self.left.values() if n == 0]
        self.left = {k: v for k, v in self.left.items() if v[1] > 0}
        self.answered += [job.lines[0] for job, _ in done]
        return done

    def abort(self):
        self.left = {}

    def decoding(self):
        import contextlib
        return contextlib.nullcontext()


def test_connections_are_accepted_with_nodelay():
    """Answers leave at once on a kept-open connection: accepted sockets inherit TCP_NODELAY."""
    from mtrain.serve import listen

    server = listen("127.0.0.1", 0)
    server.listen()
    with socket.create_connection(server.getsockname(), timeout=5):
        accepted, _ = server.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    server.close()


def test_the_worker_stops_when_the_stop_comes_while_it_gathers_a_batch():
    """A stop that arrives while the first job waits for company (uvicorn gave up on slow requests
    and shut down) still ends the worker, after it answered the job it held."""
    from mtrain.serve import Batcher, Job

    batcher = Batcher(Steps(), max_wait_ms=5000, max_batch_tokens=100)
    batcher.start()
    future = batcher.submit(Job(["a", "b"], ("same",), 2))
    time.sleep(0.2)  # the worker holds the job and waits up to 5 s for others
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    stopper.join(10)
    assert not stopper.is_alive() and not batcher.thread.is_alive()
    assert future.result(timeout=1) == 2


def test_jobs_join_a_running_search_within_the_budget_and_leave_when_done():
    """Continuous batching: a short job that comes while a long one runs is admitted at the next
    step and answered before the long one; a job over the budget waits until pieces leave."""
    from mtrain.serve import Batcher, Job

    engine = Steps()
    batcher = Batcher(engine, max_wait_ms=0, max_batch_tokens=11)
    release = threading.Event()
    step = engine.step
    engine.step = lambda: release.wait(10) and step()  # steps run only when the test lets them
    batcher.start()
    long = batcher.submit(Job(["long"] * 50, ("k",), 6))
    time.sleep(0.1)
    short = batcher.submit(Job(["short"] * 2, ("k",), 3))
    big = batcher.submit(Job(["big"], ("k",), 5))  # 6 + 3 + 5 pieces are over 11: it waits for short
    time.sleep(0.1)
    release.set()
    assert (long.result(timeout=10), short.result(timeout=10), big.result(timeout=10)) == (50, 2, 1)
    assert engine.admitted == ["long", "short", "big"] and engine.answered == ["short", "big", "long"]
    c = batcher.counters
    assert c.requests == 3 and c.largest_batch == 2 and c.batched_requests == 3
    assert c.steps == 50 and c.request_steps == 50 + 2 + 1  # short in steps 2-3, big in step 4
    batcher.stop()


def test_jobs_admitted_between_steps_start_in_one_encoder_pass(model_path, monkeypatch):
    """The engine starts every job admitted since the last step with one encoder pass; each still
    gets translate's answer. When that start fails, those jobs get the error and the jobs already
    running go on to their answers."""
    translator = Translator([model_path], "cpu", "fp32", False, None)
    model = translator.model
    encoded = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda src, pad: encoded.append(src.shape[0]) or encode(src, pad))

    def job(lines):
        return translator.job({"text": lines, "tag": "<2de>"}, Limits())

    first, second, third = job(SOURCES[:1]), job(SOURCES[1:3]), job(SOURCES[3:4])
    translator.admit(first)
    answers = dict((id(j), a) for j, a in translator.step())
    translator.admit(second)
    translator.admit(third)
    answers.update((id(j), a) for j, a in translator.step())
    assert encoded == [1, 3]  # the first job alone, then the two that came during its step together
    broken = job(SOURCES[4:5])
    translator.admit(broken)
    monkeypatch.setattr(model, "encode", lambda *a: (_ for _ in ()).throw(RuntimeError("simulated")))
    stepped = translator.step()
    failed = [(j, a) for j, a in stepped if isinstance(a, Exception)]
    assert [(j, str(a)) for j, a in failed] == [(broken, "simulated")]
    answers.update((id(j), a) for j, a in stepped if j is not broken)
    for _ in range(200):
        if len(answers) == 3:
            break
        answers.update((id(j), a) for j, a in translator.step())
    got = [t["text"] for j in (first, second, third) for t in answers[id(j)]["translations"]]
    assert got == reference(model_path, SOURCES[:4], "<2de>")


def test_a_full_queue_is_a_503_with_retry_after_and_the_queued_requests_are_answered(translator, monkeypatch):
    """While the worker is busy in a step, requests wait in a queue of --max-queue; one more is refused
    at once with 503 and Retry-After, and the waiting ones are answered when the step ends."""
    release, stepping = threading.Event(), threading.Event()
    step = translator.step

    def slow_step():
        stepping.set()
        release.wait(30)
        return step()

    monkeypatch.setattr(translator, "step", slow_step)
    with Server(translator, Limits(max_queue=1)) as s, ThreadPoolExecutor(2) as pool:
        first = pool.submit(call, s.url + "/translate", {"text": [SOURCES[0]], "tag": "<2de>"})
        assert stepping.wait(30)  # the first request is in a step
        second = pool.submit(call, s.url + "/translate", {"text": [SOURCES[1]], "tag": "<2de>"})
        deadline = time.monotonic() + 30
        while s.app.state.batcher.queue.qsize() < 1:  # the second waits in the queue
            assert time.monotonic() < deadline
            time.sleep(0.01)
        request = urllib.request.Request(s.url + "/translate", data=json.dumps({"text": ["a dog ."]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
        assert "1 requests are waiting already" in json.loads(refused.value.read())["error"]
        release.set()
        for future, german in ((first, GERMAN[0]), (second, GERMAN[1])):
            code, answer = future.result(30)
            assert code == 200 and answer["translations"][0]["text"] == german


def test_a_failure_is_its_own_jobs_alone(translator, monkeypatch):
    """One job's answer that fails (its attention pass runs out of memory) fails that job; a search
    whose step fails fails its own jobs; the other jobs of the same step get their answers."""
    import mtrain.attention

    def job(lines, **options):
        return translator.job({"text": lines, "tag": "<2de>", **options}, Limits())

    def run(*jobs):
        for j in jobs:
            translator.admit(j)
        answers = {}
        for _ in range(200):
            answers.update((id(j), a) for j, a in translator.step())
            if len(answers) == len(jobs):
                return [answers[id(j)] for j in jobs]
        raise AssertionError("not all answered")

    def no_memory(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(mtrain.attention, "line_attention", no_memory)
    plain, shown = run(job(SOURCES[:2]), job(SOURCES[2:3], attention=True))
    assert [t["text"] for t in plain["translations"]] == GERMAN[:2]
    assert isinstance(shown, RuntimeError) and "out of memory" in str(shown)
    monkeypatch.undo()

    from mtrain.search import BeamSearch
    step = BeamSearch.step
    monkeypatch.setattr(BeamSearch, "step", lambda self: no_memory() if self.k == 3 else step(self))
    beam1, beam3, other = run(job(SOURCES[3:5]), job(SOURCES[5:6], beam=3), job(SOURCES[6:7]))
    assert isinstance(beam3, RuntimeError)
    assert [t["text"] for a in (beam1, other) for t in a["translations"]] == GERMAN[3:5] + GERMAN[6:7]
    assert not translator.searches and not translator.owners  # nothing of the failed search is left


def test_a_cancelled_request_does_not_end_the_worker():
    """A job whose future was cancelled (its client went away, uvicorn shut down) is skipped when it
    is done: set_result on it raised InvalidStateError and killed the worker thread."""
    from mtrain.serve import Batcher, Job

    engine = Steps()
    release = threading.Event()
    step = engine.step
    engine.step = lambda: release.wait(10) and step()
    batcher = Batcher(engine, max_wait_ms=0, max_batch_tokens=100)
    batcher.start()
    gone = batcher.submit(Job(["gone"], ("k",), 1))
    time.sleep(0.1)
    assert gone.cancel()
    release.set()
    later = batcher.submit(Job(["later", "x"], ("k",), 1))
    assert later.result(timeout=10) == 2 and batcher.thread.is_alive()
    batcher.stop()


def test_a_request_that_alone_needs_more_than_the_budget_is_refused_and_the_rest_wait_their_turn():
    """Admission counts the KV cache as it is allocated: every row as long as the longest output
    limit in flight."""
    from mtrain.serve import Batcher, Job

    engine = Steps()
    batcher = Batcher(engine, max_wait_ms=0, max_batch_tokens=100)
    batcher.live = [Job(["a"], ("k",), rows=5, columns=10)]
    assert batcher.load() == 50
    assert batcher.load(Job(["b"], ("k",), rows=4, columns=2)) == 90  # 9 rows x 10 columns: fits
    assert batcher.load(Job(["c"], ("k",), rows=2, columns=20)) == 140  # 7 rows x 20 columns: waits


def test_the_soak_benchmark_keeps_a_server_busy_without_errors(model_path, tmp_path):
    """bench_serve --soak on the tiny model for a few seconds (bf16, where joining sentences crashed
    the cache before): requests of random lengths and options are all answered, and the table counts
    them by window with the server's memory."""
    source = tmp_path / "test.en"
    source.write_text("\n".join(SOURCES) + "\n")
    run = subprocess.run([sys.executable, "scripts/bench_serve.py", "--soak", "-c", str(model_path), "-i", str(source),
                          "--clients", "4", "--seconds", "8", "--window", "2", "--precision", "bf16"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    if "this CPU has no native bf16" in run.stderr:  # the server refuses bf16 on such a CPU: soak in fp32
        run = subprocess.run([sys.executable, "scripts/bench_serve.py", "--soak", "-c", str(model_path), "-i",
                              str(source), "--clients", "4", "--seconds", "8", "--window", "2"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = re.findall(r"^\| (\d+)-(\d+) \| (\d+) \| (\d+) \| (\d+) \|$", run.stdout, re.M)
    assert len(rows) == 4 and all(errors == "0" and int(rss) > 50 for *_, errors, rss in rows), run.stdout
    total = int(re.search(r"^(\d+) requests answered, 0 errors$", run.stdout, re.M)[1])
    assert total == sum(int(r[2]) for r in rows) > 4
    assert re.search(r"^peak RSS: second minute \d+ MB, last minute \d+ MB", run.stdout, re.M) is None  # < 3 min
