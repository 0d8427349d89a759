"""Where captions come from: a ``transformers`` model (causal or seq2seq, by id or local
directory) or an OpenAI-compatible HTTP endpoint (``/chat/completions``).

Both take a batch of instructions and a seed and return one completion per instruction. The
endpoint's API key is read from an environment variable (``OPENAI_API_KEY`` by default) and is
never logged: it only goes into the ``Authorization`` header, and error messages are redacted.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol

from persrep.errors import CaptionError  # noqa: F401 (re-exported)
from persrep.hashing import directory_digest, sha256_hex


class Backend(Protocol):
    identity: dict
    def complete(self, instructions: list[str], seed: int, *, max_new_tokens: int,
                 temperature: float, top_p: float) -> list[str]: ...


def model_identity(model: str) -> dict:
    """What identifies a model for unit keys: its id, or for a local directory its files
    (names, sizes, and the hash of its small config/tokenizer files), not its path."""
    p = Path(model).expanduser()
    if not p.is_dir():
        return {"model": model}

    def entry(rel: str, f: Path) -> bytes:  # name and size; the content's digest for small files
        size = f.stat().st_size
        small = bytes.fromhex(sha256_hex(f.read_bytes())) if size < 4_000_000 else b""
        return f"{rel}:{size}\n".encode() + small

    return {"model_dir_sha256": directory_digest(p, entry, 24)}


class TransformersBackend:
    def __init__(self, model: str, device: str | None = None):
        import torch
        from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                                  AutoTokenizer)

        self.model_name = model
        self.identity = {"backend": "transformers", **model_identity(model)}
        src = str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else model
        try:
            config = AutoConfig.from_pretrained(src)
            self.seq2seq = bool(getattr(config, "is_encoder_decoder", False))
            cls = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
            self.tokenizer = AutoTokenizer.from_pretrained(src)
            self.model = cls.from_pretrained(src)
        except Exception as exc:  # noqa: BLE001 - many loader errors; one line for the user
            msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise CaptionError(f"captions model {model}: cannot load ({msg}): give a local directory "
                               "written by save_pretrained, or a model id already in the Hugging Face "
                               "cache (nothing is downloaded offline)") from None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        if not self.seq2seq:
            tok.padding_side = "left"  # generation continues after the prompt's last token

    def _format(self, text: str) -> str:
        if not self.seq2seq and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                      tokenize=False, add_generation_prompt=True)
        return text

    def complete(self, instructions: list[str], seed: int, *, max_new_tokens: int,
                 temperature: float, top_p: float) -> list[str]:
        import torch

        tok = self.tokenizer
        chat = not self.seq2seq and bool(getattr(tok, "chat_template", None))
        # a chat template already holds the special tokens: do not add a second BOS
        enc = tok([self._format(t) for t in instructions], return_tensors="pt", padding=True,
                  add_special_tokens=not chat)
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        torch.manual_seed(seed)  # sampling is seeded per call: same seed, same captions
        with torch.no_grad():
            out = self.model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                                      max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        if not self.seq2seq:
            out = out[:, enc["input_ids"].shape[1]:]
        return tok.batch_decode(out, skip_special_tokens=True)


class EndpointBackend:
    """An OpenAI-compatible server: ``POST {url}/chat/completions`` (or ``url`` itself if it
    already ends with ``/chat/completions``), one request per instruction in the batch."""

    def __init__(self, url: str, model: str | None, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0):
        if not url.startswith(("http://", "https://")):
            raise CaptionError(f"captions endpoint {url!r}: not an http(s) URL "
                               "(e.g. http://127.0.0.1:8000/v1)")
        self.url = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
        self.model = model or "default"
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.identity = {"backend": "endpoint", "url": url, "model": self.model}

    def _post(self, body: dict) -> dict:
        key = os.environ.get(self.api_key_env, "")
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200].decode("utf-8", "replace")
            raise CaptionError(self._redact(f"captions endpoint {self.url}: HTTP {exc.code} "
                                            f"({detail.strip()}): check the URL, the model name and "
                                            f"${self.api_key_env}")) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise CaptionError(self._redact(f"captions endpoint {self.url}: {exc}: is the server "
                                            "running and reachable?")) from None

    def _redact(self, text: str) -> str:
        key = os.environ.get(self.api_key_env, "")
        return text.replace(key, "***") if key else text

    def complete(self, instructions: list[str], seed: int, *, max_new_tokens: int,
                 temperature: float, top_p: float) -> list[str]:
        out = []
        for i, text in enumerate(instructions):
            doc = self._post({"model": self.model, "messages": [{"role": "user", "content": text}],
                              "temperature": temperature, "top_p": top_p,
                              "max_tokens": max_new_tokens, "seed": seed + i, "n": 1})
            try:
                out.append(str(doc["choices"][0]["message"]["content"]))
            except (KeyError, IndexError, TypeError):
                raise CaptionError(f"captions endpoint {self.url}: reply has no "
                                   "choices[0].message.content: is it OpenAI-compatible?") from None
        return out
