"""Whether the Hugging Face Hub can be asked: offline mode (`hub_offline`), one bounded probe per
process (`hub_reachable`), and `require_hub`, which fails in seconds, in one line, where the
libraries would retry for minutes."""

from __future__ import annotations

import os
import threading

from simpo_ray.errors import UserError


HUB_TIMEOUT_S = 5.0


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


_REACHABLE: dict[str, bool] = {}  # endpoint -> answered, asked once per process


def hub_offline() -> str | None:
    """The name of the offline setting in force (the Hugging Face libraries then read only their
    local cache and make no request), else None."""
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return var
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else None


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT  # HF_ENDPOINT (a mirror) or https://huggingface.co


def hub_reachable(timeout: float | None = None) -> bool:
    """Whether the Hub endpoint answers an HTTP request within ``timeout`` seconds (default
    `HUB_TIMEOUT_S`; any HTTP status counts; name resolution included). Asked once per process
    and endpoint."""
    timeout = HUB_TIMEOUT_S if timeout is None else timeout
    endpoint = hub_endpoint()
    if endpoint not in _REACHABLE:
        import urllib.error
        import urllib.request

        answered = []

        def ask() -> None:
            try:
                urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
                answered.append(True)
            except urllib.error.HTTPError:  # an HTTP status is an answer
                answered.append(True)
            except Exception:
                answered.append(False)

        asker = threading.Thread(target=ask, daemon=True)  # bounds DNS too, which ignores timeout=
        asker.start()
        asker.join(timeout)
        _REACHABLE[endpoint] = bool(answered and answered[0])
    return _REACHABLE[endpoint]


def require_hub(what: str) -> None:
    """A `UserError` within seconds when ``what`` (e.g. "model 'org/name'") must come from the
    Hub and the Hub does not answer; the libraries would retry for minutes. Nothing is checked
    in offline mode (the local Hugging Face cache is used, and its own error is quick)."""
    if hub_offline() is None and not hub_reachable():
        raise UserError(
            f"cannot load {what} from the Hugging Face Hub: {hub_endpoint()} did not answer within "
            f"{HUB_TIMEOUT_S:g} s; use a local path, or set HF_HUB_OFFLINE=1 to load it from the local "
            "Hugging Face cache"
        )
