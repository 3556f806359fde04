"""A Ray cluster by address, checked before any work is sent to it: one answer for `-m` sweeps on
`hydra/launcher=ray_cluster` and for `command=infer infer.engine=ray`.

Addresses are Ray's own: `auto` (RAY_ADDRESS, or the head that `ray start --head` last started on
this machine), `HOST:PORT` (a head's GCS port, 6379 by default), `ray://HOST:PORT` (Ray Client,
10001 by default); `local` starts a Ray inside the command instead of joining one.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from image_classifier.errors import UserError

CONNECT_TIMEOUT_S = 5.0


def _host_port(address: str) -> tuple[str, int] | None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return (host.strip("[]"), int(port)) if host and port.isdigit() else None


def client_environment() -> None:
    """What a driver of this process needs before it imports Ray to join a cluster:
    - Ray's uv hook off: it would rebuild a driver's `uv run` environment on every worker from
      this folder (and fail with a project-local uv); a cluster's nodes hold their environment.
    - token authentication on when this machine holds a Ray token (`ray start` and a new local
      Ray make one, and a head started after that requires it; Ray's client side does not turn
      it on by itself). A token sent to a cluster without authentication is ignored."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def address_problem(address: str | None, setting: str) -> str | None:
    """Why no Ray cluster answers at `address` (the value of `setting`), with the fix; None when
    one does (a TCP connection to its port opens) or when `address` is local."""
    if address in (None, "local"):
        return None
    client_environment()
    fix = (
        f"Start one with `ray start --head --port=6379` and set {setting}=HOST:6379 (or "
        f"{setting}=local to start Ray inside this command on this machine)."
    )
    given = address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            address = canonicalize_bootstrap_address("auto") or ""
        except ConnectionError:
            return (
                f"{setting}=auto, but no Ray cluster runs on this machine and RAY_ADDRESS is "
                f"unset. {fix}"
            )
    hp = _host_port(str(address))
    if hp is None:
        return (
            f"{setting}={address!r} is not a Ray address (auto, HOST:PORT, ray://HOST:PORT or "
            "local)."
        )
    try:
        socket.create_connection(hp, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        return (
            f"{setting}={given!r}: no Ray cluster answers at {hp[0]}:{hp[1]} "
            f"({e.strerror or type(e).__name__}). {fix}"
        )
    return None


def connect(address: str | None, setting: str, **init_kwargs):
    """`ray`, initialised on the cluster at `address` (or a new local one), quietly; UserError
    naming the address and the fix when none answers."""
    client_environment()
    if problem := address_problem(address, setting):
        raise UserError(problem)
    import logging

    import ray

    local = address in (None, "local")
    ray.init(
        address=None if local else address,
        include_dashboard=False if local else None,
        logging_level=logging.WARNING,
        log_to_driver=False,
        **init_kwargs,
    )
    return ray
