"""Redaction: nothing secret reaches logs, MLflow params/tags, artifacts or reports.

Removes values under secret-looking keys (``*secret*``, ``*token*``, ``*password*``, ...),
URL user-info (``https://user:pass@host``), ``key=value`` and Bearer secrets, AWS key shapes,
private-key blocks, and the value of any secret-named environment variable. Used by
:mod:`persrep.tracking` and :mod:`persrep.report`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["REDACTED", "SECRET_KEY_RE", "secret_env_values", "redact_text", "redact_value",
           "redact_obj", "redact_params"]

REDACTED = "***"
SECRET_KEY_RE = re.compile(r"(?i)(secret|token|password|passwd|credential|access_key|api_key|"
                           r"apikey|private_key|auth)")
_FLAG_WORDS = {"", "0", "1", "true", "false", "yes", "no", "none", "null", "on", "off",
               "token", "disabled", "enabled", "default", "testing"}
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^/\s@]+)@")
_AWS_KEY_ID = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{16}(?![A-Z0-9])")
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)",
                          re.S)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{8,}")
_KV_SECRET = re.compile(
    r"(?i)([\w.\-]*(?:secret|token|password|passwd|credential|access_key|api_key|apikey|"
    r"private_key|signature)[\w.\-]*[\"']?\s*[:=]\s*[\"']?)"
    r"(?!(?:null|none|true|false)\b)([^\s\"',&}\]]+)")


def secret_env_values() -> list[str]:
    """Values of environment variables whose names look secret (longest first)."""
    vals = {v for k, v in os.environ.items()
            if SECRET_KEY_RE.search(k) and v and len(v) >= 4 and v.strip().lower() not in _FLAG_WORDS}
    return sorted(vals, key=len, reverse=True)


def _looks_like_aws_secret(s: str) -> bool:
    return (any(c.isupper() for c in s) and any(c.islower() for c in s)
            and any(c.isdigit() for c in s))


def redact_text(text: str, env_values: Iterable[str] | None = None) -> str:
    """Remove secrets from free text: env secret values, URL user-info, key=value secrets, AWS keys."""
    if not text:
        return text
    for v in (secret_env_values() if env_values is None else env_values):
        if v in text:
            text = text.replace(v, REDACTED)
    text = _PRIVATE_KEY.sub(REDACTED, text)
    text = _URL_USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _KV_SECRET.sub(lambda m: m.group(1) + REDACTED, text)
    text = _AWS_KEY_ID.sub(REDACTED, text)
    text = _AWS_SECRET.sub(lambda m: REDACTED if _looks_like_aws_secret(m.group(0)) else m.group(0),
                           text)
    return text


def redact_value(key: str, value: Any, env_values: Iterable[str] | None = None) -> Any:
    """A value safe to log under ``key``: secret-named keys lose their value entirely."""
    if value is None or isinstance(value, (bool, int, float)):
        return value  # a number is a count or a size (max_new_tokens), never a credential
    if SECRET_KEY_RE.search(str(key).rsplit(".", 1)[-1]) or SECRET_KEY_RE.search(str(key)):
        return REDACTED
    return redact_text(str(value), env_values)


def redact_obj(obj: Any, env_values: Iterable[str] | None = None, key: str = "") -> Any:
    """Recursively redact a JSON/YAML-like structure (dicts, lists, scalars)."""
    env_values = secret_env_values() if env_values is None else list(env_values)
    if isinstance(obj, Mapping):
        return {k: (REDACTED if SECRET_KEY_RE.search(str(k)) and v is not None
                    and not isinstance(v, (Mapping, list, tuple, bool, int, float))
                    else redact_obj(v, env_values, str(k)))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v, env_values, key) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj, env_values)
    return obj


def redact_params(params: Mapping[str, Any]) -> dict[str, Any]:
    env_values = secret_env_values()
    return {k: redact_value(k, v, env_values) for k, v in params.items()}
