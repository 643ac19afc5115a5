"""``vllm serve`` on a nested artifact under load, the budget switched over HTTP while requests run.

32 concurrent completions (the openai client, greedy) are sent; while they run the budget is
switched with ``POST /flexc/budget``. Every request must be answered with all its tokens, and
each answer must be a greedy trajectory that starts at the old budget and continues at the new
one: its tokens agree with the old budget's reference up to some point t, and from t on they are
the new budget's greedy continuation of the prompt plus those t tokens (greedy decoding is
consistent, so any later split point of a true trajectory passes too). Requests sent after the
switch must equal the new budget's reference.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: serving tests run where the serve-cpu extra is "
                                   "installed (tests/test_serving_suite.py runs this file in vLLM's environment)")
openai = pytest.importorskip("openai", reason="the openai client comes with vLLM")

import torch  # noqa: E402

from serving_artifacts import BUDGETS, source_model, write_artifacts  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = ["def main():\n    ", "import os\nimport sys\n", "class Config:\n    def __init__(self", "for i in range("]
COPIES = 8  # 4 prompts x 8 = 32 concurrent requests
MAX_TOKENS = 64  # long enough that requests are still decoding when the switch lands


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def nested_artifact(tmp_path_factory):
    model, tokenizer = source_model("tiny")
    return write_artifacts(model, tokenizer, tmp_path_factory.mktemp("online"))["nested"], tokenizer


def _serve(nested, tmp_path_factory, *flags: str):
    """``flexc serve`` (vLLM's own server with the plugin named and the budget as hf_overrides) on a free
    port, once it answers /health: yields the base URL."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flexc.cli", "serve", str(nested), "--budget", str(BUDGETS[0]), *flags, "--port",
         str(port), "--", "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
         "--kv-cache-memory-bytes", str(64 << 20), "--max-num-seqs", "32"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited ({proc.returncode}); see {log.name}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2):
                break
        except OSError:
            time.sleep(1)
    else:
        proc.terminate()
        pytest.fail(f"vllm serve did not start in 240 s; see {log.name}")
    yield base
    proc.terminate()
    proc.wait(timeout=60)
    log.close()


@pytest.fixture(scope="module")
def server(nested_artifact, tmp_path_factory):
    nested, tokenizer = nested_artifact
    for base in _serve(nested, tmp_path_factory):
        yield base, nested, tokenizer


class Greedy:
    """flexc.load + transformers greedy continuations at one budget, memoised."""

    def __init__(self, directory, budget):
        import flexc

        self.model = flexc.load(str(directory), budget=budget)
        self.cache: dict[tuple[int, ...], list[int]] = {}

    def __call__(self, ids: list[int], n: int) -> list[int]:
        key = (*ids, -n)
        if key not in self.cache:
            x = torch.tensor([ids])
            with torch.no_grad():
                y = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                        pad_token_id=0)
            self.cache[key] = y[0, len(ids):].tolist()
        return self.cache[key]


def _running_requests(base: str) -> float:
    """The engine's ``vllm:num_requests_running`` gauge from its Prometheus metrics."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running"))


async def _complete(client, ids: list[int], budget: float | None = None,
                    max_tokens: int = MAX_TOKENS) -> tuple[list[int], float]:
    extra = {"return_token_ids": True, "ignore_eos": True}
    if budget is not None:
        extra["vllm_xargs"] = {"flexc_budget": budget}
    response = await client.completions.create(
        model=client.served_model, prompt=ids, max_tokens=max_tokens, temperature=0.0, extra_body=extra)
    return list(response.choices[0].token_ids), time.perf_counter()


async def _load_with_switch(base: str, prompts: list[list[int]], keep: float):
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
    client.served_model = (await client.models.list()).data[0].id
    tasks = [asyncio.create_task(_complete(client, ids)) for ids in prompts]
    loop = asyncio.get_running_loop()
    # Switch once the engine reports requests decoding (a fixed sleep was too long on a quiet machine).
    deadline = time.time() + 60
    while await loop.run_in_executor(None, _running_requests, base) == 0 and time.time() < deadline:
        await asyncio.sleep(0.02)
    status, state = await loop.run_in_executor(None, _http, base + "/flexc/budget", {"keep": keep})
    switched_at = time.perf_counter()
    results = await asyncio.gather(*tasks)
    after = await asyncio.gather(*[_complete(client, ids) for ids in prompts[:: COPIES]])
    await client.close()
    return status, state, switched_at, results, after


def test_32_concurrent_requests_survive_a_live_budget_switch(server):
    base, nested, tokenizer = server
    status, state = _http(base + "/flexc/budget")
    assert status == 200, state
    assert state["budget"] == pytest.approx(BUDGETS[0]) and state["budgets"] == [1.0, *BUDGETS]

    prompts = [tokenizer(p).input_ids for p in PROMPTS for _ in range(COPIES)]
    status, state, switched_at, results, after = asyncio.run(_load_with_switch(base, prompts, BUDGETS[1]))
    assert status == 200, state
    assert state["budget"] == pytest.approx(BUDGETS[1])
    assert _http(base + "/flexc/budget")[1]["budget"] == pytest.approx(BUDGETS[1])

    old, new = Greedy(nested, BUDGETS[0]), Greedy(nested, BUDGETS[1])
    assert all(old(p, MAX_TOKENS) != new(p, MAX_TOKENS) for p in prompts[::COPIES]), "budgets must differ"
    finished_after_switch = sum(done > switched_at for _, done in results)
    assert finished_after_switch > 0, "the switch came after every request had finished: no live switch"
    mixed = 0
    for ids, (tokens, _) in zip(prompts, results):
        assert len(tokens) == MAX_TOKENS  # nothing dropped or cut short
        reference = old(ids, MAX_TOKENS)
        t = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), MAX_TOKENS)
        if t < MAX_TOKENS:
            mixed += t > 0
            assert tokens[t:] == new(ids + tokens[:t], MAX_TOKENS - t), f"request corrupted after token {t}"
    for ids, (tokens, _) in zip(prompts[::COPIES], after):
        assert tokens == new(ids, MAX_TOKENS)
    print(f"switch {state['switch_s'] * 1e3:.2f} ms on the worker, {state['total_s'] * 1e3:.1f} ms round trip; "
          f"{finished_after_switch}/32 finished after it, {mixed} switched mid-answer")


def test_bad_budget_requests_are_refused_with_the_reason(server):
    base, _, _ = server
    status, body = _http(base + "/flexc/budget", {"keep": 0.33})
    assert status == 400 and "no width table for keep 0.33" in body["error"]
    status, body = _http(base + "/flexc/budget", {"budget": "half"})
    assert status == 400 and '{"keep": <keep ratio>}' in body["error"]


# ------------------------------------------------------------------ per-request budgets

PER_REQUEST_TOKENS = 24


@pytest.fixture(scope="module")
def mixed_server(nested_artifact, tmp_path_factory):
    nested, tokenizer = nested_artifact
    for base in _serve(nested, tmp_path_factory, "--per-request-budgets"):
        yield base, nested, tokenizer


async def _mixed(base: str, jobs: list[tuple[list[int], float | None]]):
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
    client.served_model = (await client.models.list()).data[0].id
    results = await asyncio.gather(*[_complete(client, ids, b, PER_REQUEST_TOKENS) for ids, b in jobs])
    refused = []
    for bad in (0.33, 1.5):
        try:
            await _complete(client, jobs[0][0], bad, 2)
            refused.append(None)
        except openai.BadRequestError as exc:
            refused.append(str(exc))
    await client.close()
    return [tokens for tokens, _ in results], refused


def test_concurrent_requests_at_their_own_budgets(mixed_server):
    """``flexc serve --per-request-budgets``: 16 concurrent requests, each prompt at the engine's budget
    and at three named ones (``vllm_xargs``), all batched together: every answer equals flexc.load's
    greedy tokens at its request's budget; a budget the artifact lacks and a keep above 1 are refused
    with 400 and the reason."""
    base, nested, tokenizer = mixed_server
    budgets = [None, 1.0, BUDGETS[0], BUDGETS[1]]
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    jobs = [(ids, b) for ids in prompts for b in budgets]
    tokens, refused = asyncio.run(_mixed(base, jobs))
    greedy = {b: Greedy(nested, b) for b in (None, BUDGETS[0], BUDGETS[1])}
    for (ids, b), got in zip(jobs, tokens):
        want = greedy[BUDGETS[0] if b is None else (None if b == 1.0 else b)](ids, PER_REQUEST_TOKENS)
        assert got == want, f"request at keep {b}"
    assert len({tuple(t) for t in tokens[:len(budgets)]}) > 1  # the budgets give different answers
    assert refused[0] is not None and "flexc_budget 0.33 is not a budget of the served artifact" in refused[0]
    assert refused[1] is not None and "keep ratio in (0, 1]" in refused[1]
    status, state = _http(base + "/flexc/budget")
    assert status == 200 and state["most_budgets_in_a_pass"] >= 3
