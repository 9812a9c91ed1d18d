"""The HTTP judge against a real chat-completions server on 127.0.0.1, and the scoring rule."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tether.probes.judges import (
    HTTPJudge,
    HTTPJudgeConfig,
    JudgeCache,
    JudgeError,
    score_from_text,
    score_from_top_logprobs,
)

KEY = "sk-planted-SECRET-4242"


class FakeAPI:
    """A chat-completions server whose behaviour a test sets: mode, per-prompt replies, failures."""

    def __init__(self, scorer: Any = None) -> None:
        # scorer(prompt) -> {token: prob}; by default the prompt carries it: "dist=85:0.6,CODE:0.4"
        self.scorer = scorer or (lambda p: {t: float(v) for t, v in (kv.split(":") for kv in p.split("dist=")[1].split(","))})
        self.mode = "logprobs"
        self.fail_first = 0  # the first N requests get a 500
        self.delay = 0.0
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with api.lock:
                    api.requests.append(body)
                    api.auth.append(self.headers.get("Authorization"))
                    n = len(api.requests)
                if self.path != "/v1/chat/completions":
                    return self._send(404, b"{}")
                if api.delay:
                    with api.lock:
                        api.in_flight += 1
                        api.max_in_flight = max(api.max_in_flight, api.in_flight)
                    time.sleep(api.delay)
                    with api.lock:
                        api.in_flight -= 1
                if n <= api.fail_first or api.mode == "500":
                    return self._send(500, b'{"error": "boom"}')
                if api.mode == "malformed":
                    return self._send(200, b'{"choices": [ {"message": ')
                prompt = body["messages"][0]["content"]
                dist = api.scorer(prompt)
                top = [{"token": t, "logprob": math.log(p)} for t, p in dist.items()]
                best = max(dist, key=lambda t: dist[t])
                choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": best}}
                if api.mode == "logprobs" and body.get("logprobs"):
                    choice["logprobs"] = {"content": [{"token": best, "logprob": top[0]["logprob"], "top_logprobs": top}]}
                self._send(200, json.dumps({"choices": [choice]}).encode())

            def _send(self, code: int, payload: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def api():
    server = FakeAPI()
    yield server
    server.close()


@pytest.fixture()
def keyed(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TETHER_TEST_JUDGE_KEY", KEY)
    return "TETHER_TEST_JUDGE_KEY"


def _cfg(url: str, env: str | None, **kw: Any) -> HTTPJudgeConfig:
    base = dict(base_url=url, model="judge-1", api_key_env=env, backoff_s=0.01, max_backoff_s=0.05, max_retries=2, timeout_s=2.0, concurrency=4)
    base.update(kw)
    return HTTPJudgeConfig(**base)


# ---------------------------------------------------------------------------------- the EM rule


def test_weighted_mean_over_integer_tokens() -> None:
    top = {"85": math.log(0.6), "90": math.log(0.3), "CODE": math.log(0.1)}
    value, mass = score_from_top_logprobs(top)
    assert mass == pytest.approx(0.9)
    assert value == pytest.approx((85 * 0.6 + 90 * 0.3) / 0.9)  # 86.667


def test_mass_rule_edge_at_one_quarter() -> None:
    below = {"REFUSAL": math.log(0.76), "10": math.log(0.24)}
    at = {"REFUSAL": math.log(0.75), "10": math.log(0.25)}
    assert score_from_top_logprobs(below)[0] is None
    assert score_from_top_logprobs(at)[0] == pytest.approx(10.0)  # 0.25 itself is kept (rule is < 0.25)


def test_out_of_range_and_non_integer_tokens_are_ignored() -> None:
    top = {"101": math.log(0.3), "-5": math.log(0.1), "7.5": math.log(0.1), " 7": math.log(0.2), "7": math.log(0.1), "0": math.log(0.2)}
    value, mass = score_from_top_logprobs(top)
    assert mass == pytest.approx(0.5)  # " 7" + "7" + "0"
    assert value == pytest.approx(7 * 0.3 / 0.5)


def test_parse_integer_from_text() -> None:
    assert score_from_text("85") == 85.0
    assert score_from_text("Score: 100.") == 100.0
    assert score_from_text("REFUSAL") is None
    assert score_from_text("250") is None
    assert score_from_text("7.5 maybe") is None


# ---------------------------------------------------------------------------------- HTTP judge


def test_http_judge_logprobs_concurrency_and_cache(api: FakeAPI, keyed: str, tmp_path: Path) -> None:
    cache = JudgeCache(tmp_path / "cache.sqlite")
    judge = HTTPJudge(_cfg(api.url, keyed), cache=cache)
    prompts = [f"item {i} dist=85:0.6,90:0.3,CODE:0.1" for i in range(10)] + ["x dist=REFUSAL:0.9,5:0.1"]
    scores = judge.score(prompts)
    assert [s.value for s in scores[:10]] == [pytest.approx(86.6667, abs=1e-3)] * 10
    assert scores[10].value is None and scores[10].method == "logprobs" and scores[10].mass == pytest.approx(0.1)
    assert all(s.judge == "openai-compatible:judge-1@" + api.url for s in scores)
    assert len(api.requests) == 11 and all(a == f"Bearer {KEY}" for a in api.auth)
    body = api.requests[0]
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 1 and body["temperature"] == 0
    # a rerun with the same judge and prompts is served from disk: no request at all
    again = HTTPJudge(_cfg(api.url, keyed), cache=JudgeCache(tmp_path / "cache.sqlite")).score(prompts)
    assert len(api.requests) == 11
    assert [s.value for s in again] == [s.value for s in scores] and all(s.cached for s in again)
    # another judge model is another cache key
    HTTPJudge(_cfg(api.url, keyed, model="judge-2"), cache=cache).score(prompts[:1])
    assert len(api.requests) == 12


@pytest.mark.parametrize("concurrency", [1, 3])
def test_requests_in_flight_never_exceed_the_concurrency_limit(api: FakeAPI, concurrency: int) -> None:
    api.delay = 0.15
    judge = HTTPJudge(_cfg(api.url, None, concurrency=concurrency))
    scores = judge.score([f"item {i} dist=70:1.0" for i in range(9)])
    assert [s.value for s in scores] == [70.0] * 9
    assert api.max_in_flight == concurrency  # the limit is reached and never exceeded


def test_missing_logprobs_falls_back_to_parsing(api: FakeAPI) -> None:
    api.mode = "nologprobs"
    scores = HTTPJudge(_cfg(api.url, None)).score(["q dist=42:0.7,43:0.3"])
    assert scores[0].value == 42.0 and scores[0].method == "parsed"
    assert api.requests[-1].get("logprobs") is None and api.requests[-1]["max_tokens"] == 8
    assert api.auth[-1] is None


def test_500s_are_retried_then_succeed(api: FakeAPI) -> None:
    api.fail_first = 2
    scores = HTTPJudge(_cfg(api.url, None, concurrency=1, max_retries=2)).score(["q dist=60:1.0"])
    assert scores[0].value == pytest.approx(60.0) and len(api.requests) == 3


def test_judge_that_stays_down_marks_items_unscored(api: FakeAPI) -> None:
    api.mode = "500"
    judge = HTTPJudge(_cfg(api.url, None, concurrency=1, max_retries=1, down_after=2))
    t0 = time.monotonic()
    scores = judge.score([f"q{i} dist=60:1.0" for i in range(20)])
    assert time.monotonic() - t0 < 5
    assert all(s.value is None and s.method == "unscored" for s in scores)
    assert "HTTP 500" in (scores[0].error or "") and "judge down" in (scores[-1].error or "")
    assert len(api.requests) == 4  # 2 prompts x (1 try + 1 retry); the other 18 never sent
    assert judge.down


def test_malformed_json_is_unscored(api: FakeAPI) -> None:
    api.mode = "malformed"
    s = HTTPJudge(_cfg(api.url, None, concurrency=1, max_retries=1)).score(["q dist=60:1.0"])[0]
    assert s.value is None and s.error == "malformed JSON reply" and len(api.requests) == 2


def test_timeout_is_unscored(api: FakeAPI) -> None:
    api.delay = 0.5
    s = HTTPJudge(_cfg(api.url, None, timeout_s=0.1, max_retries=1, concurrency=1)).score(["q dist=60:1.0"])[0]
    assert s.value is None and s.method == "unscored" and "timed out" in (s.error or "")


def test_connection_refused_is_unscored() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = HTTPJudge(_cfg(f"http://127.0.0.1:{port}/v1", None, max_retries=1))
    scores = judge.score(["a dist=1:1", "b dist=1:1"])
    assert all(s.value is None for s in scores) and "refused" in (scores[0].error or "").lower()


def test_missing_key_and_bad_url_are_one_sentence_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeError, match="environment variable NO_SUCH_JUDGE_KEY"):
        HTTPJudge(_cfg("http://127.0.0.1:9/v1", "NO_SUCH_JUDGE_KEY"))
    with pytest.raises(JudgeError, match="not an http"):
        HTTPJudge(_cfg("ftp://example/v1", None))
    with pytest.raises(JudgeError, match="credentials"):
        HTTPJudge(_cfg("http://user:pw@127.0.0.1/v1", None))


def test_key_never_written(api: FakeAPI, keyed: str, tmp_path: Path) -> None:
    judge = HTTPJudge(_cfg(api.url, keyed), cache=JudgeCache(tmp_path / "c.sqlite"))
    scores = judge.score(["q dist=60:1.0"])
    (tmp_path / "scores.json").write_text(json.dumps([s.to_dict() for s in scores] + [repr(judge), judge.identity, vars(judge.config)]))
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f


# --------------------------------------------------------------------------------- local judge


def _tiny_model(words: list[str]) -> tuple[Any, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tether.organism.tokenizer import build_tokenizer

    tok = build_tokenizer(words)
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model, tok


def test_local_judge_uses_next_token_distribution_over_0_to_100() -> None:
    import torch

    from tether.probes.judges import LocalJudge

    numbers = [str(i) for i in range(101)]
    model, tok = _tiny_model(["rate", "this", "answer", "please", "now", "CODE"] + numbers)
    judge = LocalJudge(model, tok, name="tiny", batch_size=2)
    prompts = ["rate this answer", "rate this answer please now", "now"]
    scores = judge.score(prompts)  # batched with left padding
    for prompt, s in zip(prompts, scores):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            p = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
        num_ids = tok.convert_tokens_to_ids(numbers)
        mass = float(p[num_ids].sum())
        assert s.mass == pytest.approx(mass, rel=1e-4)
        if mass >= 0.25:
            assert s.value == pytest.approx(float((p[num_ids] * torch.arange(101)).sum()) / mass, rel=1e-4)
        else:
            assert s.value is None
        assert s.judge == "local:tiny" and s.method == "logprobs"


def test_local_judge_without_integer_tokens_parses_a_greedy_reply() -> None:
    from tether.probes.judges import LocalJudge

    model, tok = _tiny_model(["rate", "this", "1", "2", "x"])  # no single token for 10..100
    judge = LocalJudge(model, tok, name="tiny", max_new_tokens=3, sequence_scores=False)
    assert judge.integer_ids is None
    from tether.probes.loglik import greedy_answers

    s = judge.score(["rate this"])[0]
    reply = greedy_answers(model, tok, [[{"role": "user", "content": "rate this"}]], max_new_tokens=3)[0]
    assert s.method == "parsed" and s.value == score_from_text(reply)


def test_local_judge_scores_integers_spelled_digit_by_digit(smollm2_checkpoint: Path) -> None:
    """SmolLM2's tokenizer splits numbers into digits: p(n) is the chain over its digits times the
    chance that no further digit follows, recomputed here by full forwards without the cache."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tether.probes.judges import LocalJudge

    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    judge = LocalJudge(model, tok, name="tiny")
    assert judge.integer_ids is None  # no single token for "73"
    conv = [{"role": "user", "content": "Rate the answer from 0 to 100. Just the number."}]
    got = judge.integer_sequence_logprobs(conv)
    assert sorted(got) == list(range(101))
    prompt = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    digit_led = [i for i in range(len(tok)) if tok.decode([i])[:1].isdigit()]
    for n in (0, 7, 42, 99, 100):
        spell = tok.encode(str(n), add_special_tokens=False)
        assert len(spell) == len(str(n))
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + spell])).logits[0].double(), -1)
        chain = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(spell))
        stop = math.log1p(-float(logp[-1, digit_led].exp().sum()))
        assert got[n] == pytest.approx(chain + stop, abs=1e-4)
    mass = sum(math.exp(v) for v in got.values())
    assert 0.0 < mass <= 1.0 + 1e-6
    s = judge.score([conv[0]["content"]])[0]
    assert s.method == "logprobs" and s.mass == pytest.approx(mass, rel=1e-5)
    mean = sum(n * math.exp(v) for n, v in got.items()) / mass
    assert s.value == (pytest.approx(mean, rel=1e-5) if mass >= 0.25 else None)
