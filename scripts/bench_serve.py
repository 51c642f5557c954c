"""Benchmark `mtrain serve` under load on loopback and print a table.

    python scripts/bench_serve.py -c runs/multi30k_en_de/final.pt -i data/multi30k/test_2016_flickr.en.gz
    python scripts/bench_serve.py -c MODEL.pt -i test.en --tag '<2de>' --screenshot docs/img/serve.png

A real `mtrain serve` process on 127.0.0.1; 1, 4 and 16 client threads (--clients) each send one
sentence per request, one request at a time on a connection kept open, until the input lines are used up (--lines, at most
--seconds per setting). Per setting: sentences/s and the p50 and p99 latency of a request. Against
`mtrain translate`'s own function on the same lines in this process: sentences/s of the whole file,
and the median decode time of one line translated alone (the least a request can take); and the
server's own decoding in this process with as many one-line requests in flight as the most clients,
without HTTP (the most those clients could get from it), and the file translated in sorted
batches of as many sentences as those clients keep in flight (the file's batching at the server's
batch size). The file and
the lone line are timed again, with the server idle, just before each setting, which is compared
with them: a shared machine's speed may drift within a run. Every answer is checked against the
file translation of its line. With --screenshot, headless Chromium
(Debian's chromium and chromium-driver) translates the first line on the page, points at the
second output word, and saves the picture. Run it on an otherwise idle machine.

    python scripts/bench_serve.py --soak -c MODEL.pt -i test.en --precision bf16 --seconds 300

--soak instead: a server that must hold up for weeks, kept busy for --seconds. --clients (16)
threads send, with no pause, requests of 1-4 lines of random length (1-200 source pieces, cut from
the input's pieces) with random options (beam, n-best, length penalty, output limit, the model's
tags, now and then attention), so that the server's search never empties and its KV cache keeps
changing shape. Every --window seconds (30): requests answered, errors (any answer but 200), and the
server process's peak RSS in that window. The server's memory should level off: the peak RSS of the
last minute within 1.1x that of the second.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())


def load(port: int, lines: list[str], clients: int, seconds: float, tag: str | None) -> tuple[float, list[float], dict]:
    """Clients send lines one per request until none are left or `seconds` pass: (sentences/s,
    latencies, {line index: translation}). Each client keeps its HTTP/1.1 connection open, as an
    application's connection pool does."""
    todo = iter(range(len(lines)))
    lock = threading.Lock()
    latencies, answers = [], {}
    stop = time.monotonic() + seconds

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < stop:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            start = time.perf_counter()
            body = json.dumps({"text": [lines[i]], **({"tag": tag} if tag else {})})
            connection.request("POST", "/translate", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = json.loads(response.read())
            took = time.perf_counter() - start
            if response.status != 200:
                raise SystemExit(f"bench_serve: {response.status} {answer}")
            with lock:
                latencies.append(took)
                answers[i] = answer["translations"][0]["text"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(answers) / (time.perf_counter() - start), latencies, answers


def in_flight(checkpoint: str, lines: list[str], n: int, tag: str | None) -> tuple[int, float, int]:
    """The server's decoding without HTTP: its engine in this process, kept at n one-line requests
    in flight as n clients would keep it: (sentences/s, the translations in line order)."""
    from mtrain.serve import Limits, Translator

    translator = Translator([checkpoint], "cpu", "fp32", False, None)
    jobs = [translator.job({"text": [line], **({"tag": tag} if tag else {})}, Limits()) for line in lines]
    todo, live, answers = iter(jobs), 0, {}
    start = time.perf_counter()
    with translator.decoding():  # as the server's worker thread
        while True:
            while live < n and (job := next(todo, None)) is not None:
                translator.admit(job)
                live += 1
            if not live:
                break
            for job, answer in translator.step():
                answers[id(job)] = answer["translations"][0]["text"]
                live -= 1
    return len(lines) / (time.perf_counter() - start), [answers[id(job)] for job in jobs]


def rss_mb(pid: int) -> float:
    """A process's resident memory now (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(checkpoint: str, extra: list[str], env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """`mtrain serve` on 127.0.0.1 and a free port, once it answers /health."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mtrain", "serve", checkpoint, "--port", str(port),
                               "--device", "cpu", *extra], cwd=ROOT, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit("bench_serve: the server did not start")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return server, port
        except OSError:
            time.sleep(0.2)


def soak(args) -> int:
    """--soak: see the module's docstring."""
    import random

    from mtrain import checkpoint
    from mtrain.corpus import open_text

    lines = [x.strip() for _, x in zip(range(args.lines), open_text(args.input)) if x.strip()]
    _, toks, cfg = checkpoint.load_for_inference([args.checkpoint])
    stream = [p for ids in toks.src.encode_batch(lines) for p in ids]  # the input's pieces, one after another
    tags = list(cfg.data.tags)
    clients = max(map(int, args.clients.split(",")))
    server, port = start_server(args.checkpoint, ["--precision", args.precision])
    lock, stop = threading.Lock(), time.monotonic() + args.seconds
    served, errors, samples = [], [], []  # (time, ...) of each answer, each error; (time, RSS MB)

    def body(rng: random.Random) -> dict:
        text = []
        for _ in range(rng.randint(1, 4)):
            n = rng.randint(1, 200)
            at = rng.randrange(max(1, len(stream) - n))
            text.append(toks.src.sp.decode(stream[at:at + n]).replace("\n", " ").strip() or "a")
        beam = rng.choice([1, 2, 4, 5])
        b = {"text": text, "beam": beam, "nbest": rng.randint(1, min(beam, 2)), "lenpen": rng.choice([0.6, 1.0, 1.4]),
             "max_len_b": rng.choice([5, 10, 20])}
        if tags:
            b["tag"] = rng.choice(tags)
        if rng.random() < 0.05:
            b["attention"] = True
        return b

    def client(n: int):
        rng = random.Random(n)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while time.monotonic() < stop:
            connection.request("POST", "/translate", json.dumps(body(rng)), {"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = response.read()
            with lock:
                (served if response.status == 200 else errors).append((time.monotonic(), response.status, answer[:200]))

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    start = time.monotonic()
    try:
        for t in threads:
            t.start()
        while time.monotonic() < stop:
            samples.append((time.monotonic(), rss_mb(server.pid)))
            time.sleep(1)
        for t in threads:
            t.join(600)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    print(f"\nsoak: model {args.checkpoint}, server --precision {args.precision}, {clients} clients without pauses, "
          f"{args.seconds:.0f} s; requests of 1-4 lines of 1-200 pieces, random options\n")
    print("| seconds | requests answered | errors | server peak RSS MB |")
    print("|---|---|---|---|")
    windows = []
    count = int(args.seconds // args.window)
    for w in range(count):  # the last window also takes the answers to requests sent before the end
        lo, hi = start + w * args.window, start + (w + 1) * args.window if w < count - 1 else float("inf")
        rss = max((r for at, r in samples if lo <= at < hi), default=float("nan"))
        windows.append(rss)
        print(f"| {w * args.window:.0f}-{(w + 1) * args.window:.0f} | {sum(lo <= x[0] < hi for x in served)} | "
              f"{sum(lo <= x[0] < hi for x in errors)} | {rss:.0f} |")
    print(f"\n{len(served)} requests answered, {len(errors)} errors" +
          (f" (first: {errors[0][1]} {errors[0][2]!r})" if errors else ""))
    per_minute = int(60 // args.window) or 1
    if len(windows) >= 3 * per_minute:
        second, last = max(windows[per_minute:2 * per_minute]), max(windows[-per_minute:])
        print(f"peak RSS: second minute {second:.0f} MB, last minute {last:.0f} MB ({last / second:.2f}x)")
    return 1 if errors else 0


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def screenshot(url: str, line: str, tag: str | None, path: Path) -> None:
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=760,640"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        driver.get(url + "/")
        if tag:
            WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#tag option"))
            Select(driver.find_element(By.ID, "tag")).select_by_visible_text(tag)
        driver.find_element(By.ID, "source").send_keys(line)
        driver.find_element(By.ID, "translate").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "results").get_attribute("data-done"))
        words = driver.find_elements(By.CSS_SELECTOR, "#results .out .word")
        ActionChains(driver).move_to_element(words[min(1, len(words) - 1)]).perform()
        path.parent.mkdir(parents=True, exist_ok=True)
        # The whole page, below the window's edge too (Chrome's DevTools protocol).
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(shot["data"]))
    finally:
        driver.quit()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--checkpoint", required=True)
    p.add_argument("-i", "--input", required=True, help="source sentences, one per line (.gz is fine)")
    p.add_argument("--lines", type=int, default=1000, help="input lines used [1000]")
    p.add_argument("--clients", default="1,4,16", help="concurrent clients per setting [1,4,16]")
    p.add_argument("--seconds", type=float, default=300, help="at most this long per setting [300]")
    p.add_argument("--single", type=int, default=100, help="lines decoded alone for the single-line time [100]")
    p.add_argument("--tag", help="a tag of the model, sent with every line")
    p.add_argument("--max-wait-ms", default="0", help="the server's --max-wait-ms [0]")
    p.add_argument("--server-threads", type=int, default=0,
                   help="the server's intra-op threads (OMP_NUM_THREADS; default: all cores, as mtrain picks)")
    p.add_argument("--screenshot", type=Path, help="save a picture of the page here")
    p.add_argument("--soak", action="store_true", help="hold the server busy with random requests instead")
    p.add_argument("--precision", default="fp32", help="the soak server's --precision [fp32]")
    p.add_argument("--window", type=float, default=30, help="the soak's reporting window, seconds [30]")
    args = p.parse_args()
    if args.soak:
        return soak(args)

    import torch

    from mtrain import checkpoint
    from mtrain.corpus import open_text
    from mtrain.device import pick_device
    from mtrain.translate import tag_piece, translate_lines, translate_texts

    lines = [x.strip() for _, x in zip(range(args.lines), open_text(args.input))]
    model, toks, cfg = checkpoint.load_for_inference([args.checkpoint])
    dev = pick_device("cpu", "fp32")
    tag = tag_piece(args.tag, toks, cfg.data.tags) if args.tag else None
    def file_rate() -> tuple[float, list[str]]:
        start = time.perf_counter()
        with torch.inference_mode():
            out = list(translate_lines(lines, model, toks, cfg.decode, dev, tag=tag))
        return len(lines) / (time.perf_counter() - start), out

    def file_in_batches(size: int) -> tuple[float, list[str]]:
        """The lines sorted by length as the file's are, translated `size` at a time: the file's
        batching with no more sentences in a step than `size` clients can keep in flight."""
        pieces = toks.src.encode_batch(lines)
        order = sorted(range(len(lines)), key=lambda i: len(pieces[i]))
        out = [""] * len(lines)
        start = time.perf_counter()
        with torch.inference_mode():
            for at in range(0, len(order), size):
                chunk = order[at:at + size]
                for i, done in zip(chunk, translate_texts([lines[i] for i in chunk], model, toks, cfg.decode, dev,
                                                          tag=tag)):
                    out[i] = done.texts[0] if done.texts else ""
        return len(lines) / (time.perf_counter() - start), out

    def single_times() -> list[float]:
        times = []
        with torch.inference_mode():
            for line in lines[:args.single]:
                start = time.perf_counter()
                translate_texts([line], model, toks, cfg.decode, dev, tag=tag)
                times.append(time.perf_counter() - start)
        return times

    # This machine's speed may drift within a run: each setting is compared with the file and the
    # lone line timed just before it, with the server idle.
    _, reference = file_rate()  # warm up, and the translations every answer must equal
    file_before = file_rate()[0]
    n = max(map(int, args.clients.split(",")))
    engine = (n, *in_flight(args.checkpoint, lines, n, args.tag), file_before)
    same_batch = file_in_batches(n)

    server, port = start_server(args.checkpoint, ["--max-wait-ms", args.max_wait_ms],
                                {"OMP_NUM_THREADS": str(args.server_threads)} if args.server_threads else None)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        post(url + "/translate", {"text": lines[:4], **({"tag": args.tag} if args.tag else {})})  # warm up
        for clients in map(int, args.clients.split(",")):
            file_before, single = file_rate()[0], single_times()
            before = json.loads(urllib.request.urlopen(url + "/health").read())
            rate, latencies, answers = load(port, lines, clients, args.seconds, args.tag)
            after = json.loads(urllib.request.urlopen(url + "/health").read())
            wrong = sum(answers[i] != reference[i] for i in answers)
            steps = after["steps"] - before["steps"]
            rows.append((f"serve, {clients} client{'s' * (clients > 1)}", len(answers), rate,
                         percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000,
                         (after["request_steps"] - before["request_steps"]) / max(steps, 1), wrong,
                         file_before, statistics.median(single) * 1000))
        if args.screenshot:
            screenshot(url, lines[0], args.tag, args.screenshot)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)

    print(f"\nmodel {args.checkpoint}, beam {cfg.decode.beam}, {len(lines)} lines of {args.input}, "
          f"{torch.get_num_threads()} threads; server --max-wait-ms {args.max_wait_ms}"
          + (f", {args.server_threads} thread{'s' * (args.server_threads > 1)}" if args.server_threads else "")
          + "\n")
    print("| setting | sentences | sentences/s | the file just before, sentences/s | p50 latency ms | "
          "a line alone just before, p50 ms | p99 latency ms | requests per step | answers unlike the file's |")
    print("|---|---|---|---|---|---|---|---|---|")
    n, rate, texts, file_before = engine
    print(f"| the file in sorted batches of {n} sentences, no server | {len(lines)} | {same_batch[0]:.1f} "
          f"(**{same_batch[0] / file_before:.2f}×** the file) | {file_before:.1f} | | | | | "
          f"{sum(a != b for a, b in zip(same_batch[1], reference))} |")
    print(f"| the server's decoding alone, {n} lines in flight, no HTTP | {len(lines)} | {rate:.1f} "
          f"(**{rate / file_before:.2f}×** the file) | {file_before:.1f} | | | | {n} | "
          f"{sum(a != b for a, b in zip(texts, reference))} |")
    for name, n, rate, p50, p99, per_step, wrong, file_before, single_ms in rows:
        print(f"| {name} | {n} | {rate:.1f} (**{rate / file_before:.2f}×** the file) | {file_before:.1f} | "
              f"{p50:.1f} (**{p50 / single_ms:.2f}×** alone) | {single_ms:.1f} | {p99:.1f} | {per_step:.1f} | {wrong} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
