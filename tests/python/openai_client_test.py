"""The official `openai` Python client against `switchyard up --http`.

Run by tests/tests/openai_client.rs with the interpreter of scripts/python-client.sh's venv, against a cluster the
Rust harness started; SWITCHYARD_HTTP_URL is its HTTP endpoint (http://HOST:PORT). Plain unittest, no pytest:

    SWITCHYARD_HTTP_URL=http://127.0.0.1:8000 python tests/python/openai_client_test.py -v [TestCase]

The built-in tiny model has random weights and a byte-level tokenizer, so its text is noise: the tests check the
structure of what comes back (ids, choices, finish reasons, usage, logprobs, the stream's chunks) and determinism
(the same seed gives the same output, streamed or not, alone or among 63 other streams), never the words.
"""

import asyncio
import json
import math
import os
import time
import unittest
import urllib.error
import urllib.request

import openai

URL = os.environ.get("SWITCHYARD_HTTP_URL", "").rstrip("/")
# Tokens a request of the one-client tests generates: few, to stay fast on 2 cores.
MAX_TOKENS = 12
# Logprobs of the same tokens computed in a batch of a different size: the FP8 matmuls pick their kernel, and so
# their summation order, by row count, so the same sequence's logprobs may differ in the last bits.
LOGPROB_TOLERANCE = 1e-3


def client(strict=True):
    """A synchronous client that never retries (a retried 5xx would hide a failure) and, when `strict`, checks every
    response against the client's own types."""
    return openai.OpenAI(
        base_url=URL + "/v1", api_key="unused", max_retries=0, timeout=120, _strict_response_validation=strict
    )


def async_client(strict=True):
    """The asyncio twin of `client()`."""
    return openai.AsyncOpenAI(
        base_url=URL + "/v1", api_key="unused", max_retries=0, timeout=120, _strict_response_validation=strict
    )


# Streamed completions can only be read leniently: the client's `CompletionChoice.finish_reason` admits no null, yet
# OpenAI's own server (and this one, and vLLM) streams `"finish_reason": null` in every chunk but the last.
LENIENT_FOR = {"completion"}


def post_raw(path, body):
    """POSTs raw bytes (the client cannot send invalid JSON); gives back the status and the parsed error body."""
    request = urllib.request.Request(URL + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def collect_completion_stream(stream):
    """A streamed completion's text, chosen tokens, their logprobs, finish reason and ids, from its chunks."""
    text, tokens, logprobs, reasons, ids = [], [], [], [], set()
    for chunk in stream:
        ids.add(chunk.id)
        assert chunk.object == "text_completion", chunk
        assert len(chunk.choices) == 1, chunk
        choice = chunk.choices[0]
        assert choice.index == 0, chunk
        text.append(choice.text)
        if choice.logprobs is not None:
            tokens += choice.logprobs.tokens
            logprobs += choice.logprobs.token_logprobs
        if choice.finish_reason is not None:
            reasons.append(choice.finish_reason)
    return "".join(text), tokens, logprobs, reasons, ids


class OpenAIClientTest(unittest.TestCase):
    """A completion, a streamed chat completion, and errors, one client at a time."""

    @classmethod
    def setUpClass(cls):
        cls.client = client()
        models = cls.client.models.list().data
        assert len(models) == 1, models
        cls.model = models[0].id

    def test_models_lists_the_served_model(self):
        models = self.client.models.list().data
        self.assertEqual(len(models), 1)
        self.assertEqual(models[0].object, "model")
        self.assertTrue(models[0].id)

    def completion(self, client=None, **options):
        request = dict(model=self.model, prompt="The switchyard", max_tokens=8, seed=7, temperature=0.9, logprobs=0)
        request.update(options)
        return (client or self.client).completions.create(**request)

    def test_completion(self):
        result = self.completion()
        self.assertTrue(result.id)
        self.assertEqual(result.object, "text_completion")
        self.assertEqual(result.model, self.model)
        self.assertIsInstance(result.created, int)
        self.assertEqual(len(result.choices), 1)
        choice = result.choices[0]
        self.assertEqual(choice.index, 0)
        self.assertEqual(choice.finish_reason, "length")
        self.assertIsInstance(choice.text, str)
        usage = result.usage
        self.assertEqual(usage.completion_tokens, 8)
        self.assertGreater(usage.prompt_tokens, 0)
        self.assertEqual(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens)
        # logprobs=0: the chosen token's logprob alone, one per generated token.
        logprobs = choice.logprobs
        self.assertEqual(len(logprobs.tokens), 8)
        self.assertEqual(len(logprobs.token_logprobs), 8)
        self.assertTrue(all(math.isfinite(p) and p <= 0 for p in logprobs.token_logprobs), logprobs)
        self.assertEqual(logprobs.text_offset, sorted(logprobs.text_offset))
        self.assertEqual(logprobs.text_offset[0], 0)

        # The same seed gives the same output; another seed (almost surely) another one.
        again = self.completion()
        self.assertEqual(again.choices[0].text, choice.text)
        self.assertEqual(again.choices[0].logprobs.token_logprobs, logprobs.token_logprobs)
        self.assertNotEqual(again.id, result.id, "every request gets its own id")
        other = self.completion(seed=8)
        self.assertNotEqual(other.choices[0].logprobs.tokens, logprobs.tokens, "seeds 7 and 8 sampled the same")

        # `logprobs=3` adds the 3 most likely tokens at each step, keyed by their text (which two byte tokens can
        # share, both "\ufffd", hence at most 3).
        top = self.completion(logprobs=3)
        self.assertEqual(top.choices[0].text, choice.text, "asking for logprobs does not change the sampling")
        self.assertEqual(len(top.choices[0].logprobs.top_logprobs), 8)
        for alternatives in top.choices[0].logprobs.top_logprobs:
            self.assertTrue(1 <= len(alternatives) <= 3, top.choices[0].logprobs)

        # A prompt of token ids counts exactly those tokens.
        ids = self.completion(prompt=[11, 48, 85, 122, 159], max_tokens=3)
        self.assertEqual(ids.usage.prompt_tokens, 5)
        self.assertEqual(ids.usage.completion_tokens, 3)

    def test_streamed_completion_equals_the_whole_one(self):
        whole = self.completion(max_tokens=MAX_TOKENS, seed=21).choices[0]
        text, tokens, logprobs, reasons, ids = collect_completion_stream(
            self.completion(max_tokens=MAX_TOKENS, seed=21, stream=True, client=client(strict=False))
        )
        self.assertEqual(len(ids), 1, "every chunk carries the request's id")
        self.assertEqual(text, whole.text)
        self.assertEqual(tokens, whole.logprobs.tokens)
        self.assertEqual(logprobs, whole.logprobs.token_logprobs)
        self.assertEqual(reasons, ["length"])

    def test_stop_string_ends_the_completion(self):
        text = self.completion(max_tokens=MAX_TOKENS, seed=5, logprobs=None).choices[0].text
        # A stop string the unstopped output contains, away from its start: two ASCII letters or digits.
        stop = next((text[i : i + 2] for i in range(1, len(text) - 1) if text[i : i + 2].isascii()
                     and text[i : i + 2].isalnum()), None)
        if stop is None:
            self.skipTest(f"seed 5 gave no two ASCII letters in a row to stop at: {text!r}")
        stopped = self.completion(max_tokens=MAX_TOKENS, seed=5, logprobs=None, stop=[stop]).choices[0]
        self.assertEqual(stopped.text, text[: text.index(stop)], f"stop {stop!r} in {text!r}")
        self.assertEqual(stopped.finish_reason, "stop")

    def chat(self, **options):
        request = dict(
            model=self.model,
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, switchyard!"}],
            max_tokens=MAX_TOKENS,
            seed=11,
            temperature=0.8,
            logprobs=True,
        )
        request.update(options)
        return self.client.chat.completions.create(**request)

    def test_streamed_chat_completion(self):
        whole = self.chat()
        self.assertEqual(whole.object, "chat.completion")
        self.assertEqual(whole.model, self.model)
        self.assertEqual(len(whole.choices), 1)
        message = whole.choices[0].message
        self.assertEqual(message.role, "assistant")
        self.assertIsInstance(message.content, str)
        self.assertEqual(whole.choices[0].finish_reason, "length")
        self.assertEqual(whole.usage.completion_tokens, MAX_TOKENS)
        self.assertEqual(len(whole.choices[0].logprobs.content), MAX_TOKENS)

        chunks = list(self.chat(stream=True, stream_options={"include_usage": True}))
        self.assertEqual({c.id for c in chunks}, {chunks[0].id}, "every chunk carries the request's id")
        self.assertNotEqual(chunks[0].id, whole.id)
        self.assertTrue(all(c.object == "chat.completion.chunk" and c.model == self.model for c in chunks))
        # The first chunk names the role; then content deltas; the last choice names the finish reason; then usage.
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        *with_choices, usage_chunk = chunks
        self.assertEqual(usage_chunk.choices, [])
        self.assertEqual(usage_chunk.usage, whole.usage)
        self.assertTrue(all(c.usage is None for c in with_choices), "usage comes only in the last chunk")
        reasons = [c.choices[0].finish_reason for c in with_choices]
        self.assertEqual(reasons[-1], "length")
        self.assertTrue(all(r is None for r in reasons[:-1]), reasons)
        content = "".join(c.choices[0].delta.content or "" for c in with_choices)
        self.assertEqual(content, message.content, "the stream's deltas add up to the whole reply")
        streamed = [l for c in with_choices if c.choices[0].logprobs for l in c.choices[0].logprobs.content]
        self.assertEqual([(l.token, l.logprob) for l in streamed],
                         [(l.token, l.logprob) for l in whole.choices[0].logprobs.content])

        # top_logprobs=3: the 3 most likely tokens at each step, most likely first.
        top = self.chat(top_logprobs=3).choices[0]
        self.assertEqual(top.message.content, message.content, "asking for top logprobs does not change the sampling")
        for step in top.logprobs.content:
            alternatives = [l.logprob for l in step.top_logprobs]
            self.assertEqual(len(alternatives), 3, step)
            self.assertEqual(alternatives, sorted(alternatives, reverse=True), step)

        # Without stream_options there is no usage chunk: the stream ends with the finish reason.
        plain = list(self.chat(stream=True, logprobs=False))
        self.assertEqual(plain[-1].choices[0].finish_reason, "length")
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in plain), message.content)

    def assert_bad_request(self, call, *needles, param=None):
        with self.assertRaises(openai.BadRequestError) as caught:
            call()
        error = caught.exception
        self.assertEqual(error.status_code, 400)
        for needle in needles:
            self.assertIn(needle, error.message, "the message says what was wrong")
        if param is not None:
            self.assertEqual(error.body.get("param"), param, error.body)
        self.assertEqual(error.body.get("type"), "invalid_request_error", error.body)
        return error

    def test_errors_say_what_was_wrong_and_the_server_keeps_serving(self):
        before = self.completion()
        self.assert_bad_request(lambda: self.completion(max_tokens=-1), "max_tokens", "-1", param="max_tokens")
        self.assert_bad_request(lambda: self.chat(max_tokens=-5), "max_tokens", "-5", param="max_tokens")
        # Refused before the stream starts: the client raises from create(), not mid-iteration.
        self.assert_bad_request(lambda: self.chat(max_tokens=-1, stream=True), "max_tokens", param="max_tokens")
        # Over the context limit (4096 positions): the message names the prompt's length and the limit.
        self.assert_bad_request(lambda: self.completion(prompt=[7] * 5000, max_tokens=1), "5000", "4096",
                                param="prompt")
        self.assert_bad_request(lambda: self.completion(prompt=[7] * 4090, max_tokens=10), "4090", "4096",
                                param="max_tokens")
        self.assert_bad_request(lambda: self.chat(messages=[{"role": "user", "content": "x" * 5000}]), "4096",
                                param="messages")
        # A token id outside the 512-token vocabulary.
        self.assert_bad_request(lambda: self.completion(prompt=[1, 2, 100000]), "100000", "512", param="prompt")
        self.assert_bad_request(lambda: self.chat(messages=[]), "messages", param="messages")
        with self.assertRaises(openai.NotFoundError) as caught:
            self.completion(model="no-such-model")
        self.assertIn("no-such-model", caught.exception.message)
        # The client cannot send invalid JSON; a raw request can.
        status, body = post_raw("/v1/completions", b'{"prompt": "x", "max_tokens": ')
        self.assertEqual(status, 400, body)
        self.assertIn("JSON", body["error"]["message"])

        after = self.completion()
        self.assertEqual(after.choices[0].text, before.choices[0].text, "the server keeps serving, the same")
        self.assertEqual(after.choices[0].logprobs.token_logprobs, before.choices[0].logprobs.token_logprobs)


def concurrent_requests(model):
    """64 requests that differ in endpoint, prompt (a few tokens to a few hundred, past the 32-token attention
    chunk), seed, temperature (0 is greedy), top_p and length, so that they join and leave the batch at different
    steps."""
    words = ["switchyard", "expert", "dispatch", "combine", "shard", "lease", "placement", "epoch"]
    requests = []
    for i in range(64):
        prompt = " ".join(words[(i + j) % len(words)] for j in range(1 + (i * 7) % 40))
        common = dict(
            model=model,
            max_tokens=2 + (i * 5) % 31,
            seed=1000 + i,
            temperature=[0.0, 0.6, 1.0, 1.4][i % 4],
            top_p=[1.0, 0.9, 0.5][i % 3],
            stream=True,
        )
        if i % 2:
            requests.append(("chat", dict(common, messages=[{"role": "user", "content": prompt}], logprobs=True)))
        else:
            requests.append(("completion", dict(common, prompt=prompt, logprobs=0)))
    return requests


async def run_stream(client, kind, request):
    """One streamed request: what it produced, and when its first and last tokens came (for the overlap)."""
    text, tokens, logprobs, reasons = [], [], [], []
    first = last = None
    if kind == "chat":
        stream = await client.chat.completions.create(**request)
    else:
        stream = await client.completions.create(**request)
    async for chunk in stream:
        for choice in chunk.choices:
            if kind == "chat":
                text.append(choice.delta.content or "")
                new = [(l.token, l.logprob) for l in choice.logprobs.content] if choice.logprobs else []
            else:
                text.append(choice.text)
                new = list(zip(choice.logprobs.tokens, choice.logprobs.token_logprobs)) if choice.logprobs else []
            if new:
                # Only chunks with tokens count: a chat stream's first chunk (the role) comes before any step.
                first = first or time.monotonic()
                last = time.monotonic()
            tokens += [token for token, _ in new]
            logprobs += [logprob for _, logprob in new]
            if choice.finish_reason is not None:
                reasons.append(choice.finish_reason)
    output = {"text": "".join(text), "tokens": tokens, "logprobs": logprobs, "finish_reasons": reasons}
    return output, (first, last)


class ConcurrentStreamsTest(unittest.TestCase):
    """64 streams at once, each equal to its solo run with the same seed."""

    def test_64_concurrent_streams_equal_their_solo_runs(self):
        model = client().models.list().data[0].id
        requests = concurrent_requests(model)

        async def solo():
            async with async_client() as strict, async_client(strict=False) as lenient:
                clients = {kind: lenient if kind in LENIENT_FOR else strict for kind, _ in requests}
                return [(await run_stream(clients[kind], kind, r))[0] for kind, r in requests]

        async def together():
            async with async_client() as strict, async_client(strict=False) as lenient:
                clients = {kind: lenient if kind in LENIENT_FOR else strict for kind, _ in requests}
                runs = (run_stream(clients[kind], kind, r) for kind, r in requests)
                return await asyncio.gather(*runs)

        started = time.monotonic()
        alone = asyncio.run(solo())
        solo_s = time.monotonic() - started
        started = time.monotonic()
        runs = asyncio.run(together())
        together_s = time.monotonic() - started
        # How many streams were generating at once, at most: from a stream's first token to its last.
        spans = [span for _, span in runs if span[0] is not None]
        overlap = max(sum(1 for a, b in spans if a <= first <= b) for first, _ in spans)
        print(f"64 streams: solo one by one {solo_s:.1f} s, all at once {together_s:.1f} s, "
              f"at most {overlap} streaming at the same time")

        worst = 0.0
        for i, ((kind, request), expected, (got, _)) in enumerate(zip(requests, alone, runs)):
            name = f"request {i} ({kind}, seed {request['seed']}, temperature {request['temperature']})"
            # "stop" where the model sampled its end-of-sequence token: the same token alone and together.
            self.assertIn(expected["finish_reasons"], (["length"], ["stop"]), name)
            self.assertEqual(got["finish_reasons"], expected["finish_reasons"], name)
            self.assertLessEqual(len(got["tokens"]), request["max_tokens"], name)
            if got["finish_reasons"] == ["length"]:
                self.assertEqual(len(got["tokens"]), request["max_tokens"], name)
            self.assertEqual(got["tokens"], expected["tokens"], name)
            self.assertEqual(got["text"], expected["text"], name)
            self.assertEqual(len(got["logprobs"]), len(expected["logprobs"]), name)
            for a, b in zip(got["logprobs"], expected["logprobs"]):
                worst = max(worst, abs(a - b))
        print(f"largest logprob difference between a solo and a concurrent run: {worst:.2e}")
        self.assertLessEqual(worst, LOGPROB_TOLERANCE)
        # The streams ran together: a server that generated for one request at a time would never have two
        # between their first and last tokens.
        self.assertGreater(overlap, 1, "the 64 streams never overlapped")


if __name__ == "__main__":
    if not URL:
        raise SystemExit("set SWITCHYARD_HTTP_URL to the HTTP endpoint of `switchyard up --http` (http://HOST:PORT)")
    unittest.main()
