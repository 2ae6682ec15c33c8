"""Keep secrets out of what lorasweep sends to MLflow: a tracking server is often shared by a team, and params
and tags are visible to everyone who can read the experiment.

Three rules, applied to every param and tag value before it leaves the process:

* a key whose last part names a secret (``hf_token``, ``api_key``, ``aws_secret_access_key``, ``password``,
  ``tags.MY_SECRET``) has its value replaced; ``keep_tokens`` or ``max_token_length`` do not match;
* the value of any environment variable whose name contains TOKEN, KEY, SECRET or PASSWORD (``HF_TOKEN``,
  ``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``) is cut out wherever it appears in a value;
* the password of a URL (``postgresql://user:pw@host/db``, ``https://user:pw@server``) is replaced.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

REDACTED = "[redacted]"
_SECRET_KEY = re.compile(r"(^|[_\-.])(token|key|secret|password|passwd|pwd|credentials?|auth)$", re.IGNORECASE)
_SECRET_ENV = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]+:)(?P<password>[^@/\s]+)(?=@)")
_MIN_SECRET_LENGTH = 6  # shorter values ("1", "true") would blank out ordinary text


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment's secret-named variables, longest first (so a secret that contains another
    is cut out whole)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if _SECRET_ENV.search(k) and len(v) >= _MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact_value(value: str, secrets: list[str]) -> str:
    for secret in secrets:
        value = value.replace(secret, REDACTED)
    return _URL_PASSWORD.sub(lambda m: m["head"] + REDACTED, value)


def redact(items: Mapping[str, str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``items`` (MLflow params or tags, dotted keys) with secrets replaced by ``[redacted]``."""
    secrets = secret_values(environ)
    out = {}
    for key, value in items.items():
        leaf = key.rsplit(".", 1)[-1]
        out[key] = REDACTED if _SECRET_KEY.search(leaf) and value not in ("", "None") else redact_value(
            str(value), secrets)
    return out
