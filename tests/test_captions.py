"""LLM captions: validation, the bounded-attempt failure of random models (causal and seq2seq),
real generation through a tiny model whose weights make its output known, seeding and dedup,
the OpenAI-compatible endpoint (a server on 127.0.0.1; the key never printed), and the CLI."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from persrep.captions.backends import CaptionError, EndpointBackend, TransformersBackend, model_identity
from persrep.captions.generate import generate_captions
from persrep.captions.validate import Rules, clean, problem
from persrep.cli import main
from persrep.config import LLMCaptionSettings
from tiny_lm import CHAIN, WORDS, chain_lm, random_lm, random_t5

# random models get a vocabulary without the identifier and the category: no valid caption exists
NOISE = "red green blue stone river cloud paper silver quiet north".split()


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory):
    return chain_lm(tmp_path_factory.mktemp("chain") / "model", WORDS, CHAIN)


def test_validation_rules():
    instr = "Write one short vivid photo description of a mug in a real everyday scene"
    ok = "A <new1> mug on a wooden desk next to a laptop"
    assert problem(ok, instr) is None
    assert problem("A mug on a wooden desk", instr) == "no identifier"
    assert problem("A <new1> mug and a <new1> mug on a desk", instr) == "identifier more than once"
    assert problem("A <new1> mug", instr) == "too short"
    assert problem("A <new1> mug " + "very " * 50, instr) == "too long"
    assert problem("Caption: a <new1> mug on a desk", instr) == "instruction echo"
    assert problem("a <new1> mug in a real everyday scene with light", instr) == "instruction echo"
    assert problem("A <new1> mug on a\x00 desk today", instr) == "control characters"
    assert problem("A <new1> mug on a desk", instr, Rules(min_words=8)) == "too short"


def test_clean_inserts_identifier_and_strips_noise():
    assert clean('  "A Mug on a desk."\nSecond line', "mug") == "A <new1> Mug on a desk."
    assert clean("1. a <new1> mug by a window", "mug") == "a <new1> mug by a window"
    assert clean("a cup on a desk", "mug") == "a cup on a desk"  # no category word: left as is
    assert clean("a mug on a desk", "mug", insert_identifier=False) == "a mug on a desk"


def _cfg(**kw):
    base = {"model": "unused", "per_category": 2, "batch_size": 4, "max_new_tokens": 16, "max_rounds": 3}
    return LLMCaptionSettings(**{**base, **kw})


def test_real_model_run_generates_valid_deduplicated_seeded_captions(chain_dir):
    """A real transformers model (weights set, not a stub) through the whole path."""
    cfg = _cfg(model=str(chain_dir))
    caps = generate_captions(["mug"], cfg)
    assert sorted(caps["mug"]) == ["A <new1> mug sits on wooden desk beside laptop in evening light",
                                   "A <new1> mug sits on wooden desk beside laptop in morning light"]
    assert generate_captions(["mug"], cfg) == caps  # seeded: the same captions in the same order
    # only two distinct captions exist: asking for 3 spends the bounded rounds, then says why
    with pytest.raises(CaptionError, match=r"'mug': 2 of 3 valid after 3 rounds of 4 \(12 candidates; "
                                           r"rejected: 10 duplicate\)"):
        generate_captions(["mug"], _cfg(model=str(chain_dir), per_category=3))


@pytest.mark.parametrize("build", [random_lm, random_t5], ids=["causal", "seq2seq"])
def test_random_model_fails_within_the_bound(tmp_path, build):
    d = build(tmp_path / "m", NOISE)
    backend = TransformersBackend(str(d))
    assert backend.seq2seq == (build is random_t5)
    with pytest.raises(CaptionError) as err:
        generate_captions(["mug"], _cfg(model=str(d), max_rounds=2), backend)
    msg = str(err.value)
    assert "'mug': 0 of 2 valid after 2 rounds of 4 (8 candidates; rejected:" in msg
    assert "synthesis.captions_file" in msg and "\n" not in msg


def test_unloadable_model_is_one_line(tmp_path):
    with pytest.raises(CaptionError, match="captions model .*nope: cannot load .*save_pretrained"):
        TransformersBackend(str(tmp_path / "nope"))


def test_model_identity_is_content_not_path(chain_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(chain_dir, copy)
    assert model_identity(str(copy)) == model_identity(str(chain_dir))
    assert model_identity("google/flan-t5-large") == {"model": "google/flan-t5-large"}


class _Server:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 that answers from a list."""

    def __init__(self, replies, status=200):
        self.requests, self.headers = [], []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.headers.append(dict(self.headers))
                if status != 200:
                    data = json.dumps({"error": f"bad key {self.headers.get('Authorization')}"}).encode()
                else:
                    text = replies[(len(outer.requests) - 1) % len(replies)]
                    data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


SECRET = "sk-test-0123456789abcdef"


def test_endpoint_cli_writes_reference_format_and_never_prints_the_key(tmp_path, monkeypatch, capsys):
    replies = ["A mug on a wooden desk next to a laptop.",  # identifier inserted
               "Caption: a <new1> mug",                     # echo, too short
               '"A <new1> mug held by a child in a sunny kitchen"',
               "A mug on a wooden desk next to a laptop.",  # duplicate
               "A <new1> shoe by the door on a rainy day",   # category shoe
               "A <new1> shoe on a shelf in a bright shop"]
    srv = _Server(replies)
    monkeypatch.setenv("MY_LLM_KEY", SECRET)
    out = tmp_path / "caps.json"
    try:
        rc = main(["captions", "generate", "--categories", "mug,shoe", "--per-category", "2",
                   "--endpoint", srv.url, "--model", "tiny-chat", "--api-key-env", "MY_LLM_KEY",
                   "--batch-size", "2", "--max-rounds", "3", "--out", str(out)])
    finally:
        srv.close()
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    caps = json.loads(out.read_text())
    assert caps["mug"] == ["A <new1> mug on a wooden desk next to a laptop.",
                           "A <new1> mug held by a child in a sunny kitchen"]
    assert caps["shoe"] == ["A <new1> shoe by the door on a rainy day", "A <new1> shoe on a shelf in a bright shop"]
    assert all(h.get("Authorization") == f"Bearer {SECRET}" for h in srv.headers)
    assert {r["model"] for r in srv.requests} == {"tiny-chat"}
    assert len({r["seed"] for r in srv.requests}) == len(srv.requests)  # each request its own seed
    assert SECRET not in printed.out + printed.err and SECRET not in out.read_text()


def test_endpoint_error_is_redacted(monkeypatch):
    srv = _Server([], status=401)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    try:
        with pytest.raises(CaptionError) as err:
            EndpointBackend(srv.url, "m").complete(["x"], 0, max_new_tokens=8, temperature=1, top_p=1)
    finally:
        srv.close()
    assert "HTTP 401" in str(err.value) and SECRET not in str(err.value) and "***" in str(err.value)


def test_cli_bad_input_one_line(capsys):
    assert main(["captions", "generate", "--categories", "mug"]) == 2
    assert "give --model ID_OR_DIR or --endpoint URL" in capsys.readouterr().err
    assert main(["captions", "generate", "--categories", "mug", "--endpoint", "ftp://x"]) == 2
    assert "not an http(s) URL" in capsys.readouterr().err
    assert main(["captions", "generate", "--categories", "mug", "--model", "m", "--per-category", "0"]) == 2
    assert "--per-category 0: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_chat_model_path_uses_its_chat_template(chain_dir, tmp_path):
    """A tokenizer with a chat template (any chat model): the instruction is wrapped by it."""
    import shutil

    from transformers import AutoTokenizer

    d = tmp_path / "chat"
    shutil.copytree(chain_dir, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = "{% for m in messages %}[USER] {{ m['content'] }} {% endfor %}[ASSISTANT]"
    tok.save_pretrained(d)
    backend = TransformersBackend(str(d))
    assert backend._format("hi") == "[USER] hi [ASSISTANT]"
    caps = generate_captions(["mug"], _cfg(model=str(d)), backend)
    assert len(caps["mug"]) == 2 and all(c.startswith("A <new1> mug sits") for c in caps["mug"])
