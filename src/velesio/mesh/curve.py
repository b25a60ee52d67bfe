"""CurveZMQ for the mesh link: the router is a CURVE server with its own key pair and admits only workers
whose public keys are in an allow-list directory (checked at every handshake, so adding a key file admits
a worker without a restart). Keys are pyzmq certificate files made by ``velesio-keys``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

log = logging.getLogger("velesio.mesh.curve")


class CurveError(ValueError):
    """A key file is missing or unreadable."""


def _load(path: str | os.PathLike, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as exc:
        raise CurveError(f"cannot read CURVE key file {path}: {exc}") from None
    if secret and secret_key is None:
        raise CurveError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret_key


def allowed_keys(directory: str | os.PathLike) -> set[bytes]:
    keys = set()
    for path in sorted(Path(directory).glob("*.key")):
        try:
            keys.add(_load(path, secret=False)[0])
        except CurveError as exc:
            log.warning("%s", exc)
    return keys


class CurveServer:
    """Router side: ``secret_key`` (router's .key_secret file), ``allowed_workers`` (a directory of .key files)."""

    def __init__(self, secret_key: str, allowed_workers: str):
        self.public, self.secret = _load(secret_key, secret=True)
        self.allowed_dir = allowed_workers
        if not Path(allowed_workers).is_dir():
            raise CurveError(f"allowed_workers: {allowed_workers} is not a directory")
        self.auth: AsyncioAuthenticator | None = None

    def callback(self, domain: str, client_key: bytes) -> bool:
        allowed = client_key in allowed_keys(self.allowed_dir)  # both Z85-encoded
        if not allowed:
            log.warning("refused a worker with unknown CURVE key %s (not in %s)", client_key.decode(),
                        self.allowed_dir)
        return allowed

    def apply_server(self, sock: zmq.Socket, ctx: zmq.Context) -> None:
        self.auth = AsyncioAuthenticator(ctx, log=logging.getLogger("velesio.mesh.zap"))
        self.auth.start()
        self.auth.configure_curve_callback(domain="*", credentials_provider=self)
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        log.info("mesh link encrypted with CurveZMQ; workers admitted from %s", self.allowed_dir)

    def stop(self) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None


class CurveClient:
    """Worker side: ``secret_key`` (the worker's .key_secret file), ``router_public_key`` (the router's .key
    file; with several routers one file for all, or a list in the order of the worker's routers)."""

    def __init__(self, secret_key: str, router_public_key: str | list[str]):
        self.public, self.secret = _load(secret_key, secret=True)
        files = router_public_key if isinstance(router_public_key, list) else [router_public_key]
        if not files:
            raise CurveError("worker.curve.router_public_key: no key file")
        self.server_publics = [_load(str(f), secret=False)[0] for f in files]

    def apply_client(self, sock: zmq.Socket, router: int = 0) -> None:
        """Secure ``sock`` for the worker's ``router``-th router."""
        if len(self.server_publics) > 1 and router >= len(self.server_publics):
            raise CurveError(f"worker.curve.router_public_key lists {len(self.server_publics)} keys; "
                             f"router {router + 1} has none")
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_publics[router if len(self.server_publics) > 1 else 0]


def server_from_config(cfg: dict | None) -> CurveServer | None:
    return CurveServer(str(cfg["secret_key"]), str(cfg["allowed_workers"])) if cfg else None


def client_from_config(cfg: dict | None) -> CurveClient | None:
    if not cfg:
        return None
    keys = cfg["router_public_key"]
    return CurveClient(str(cfg["secret_key"]), [str(k) for k in keys] if isinstance(keys, list) else str(keys))


def main(argv: list[str] | None = None) -> int:
    """``velesio-keys DIR NAME``: write NAME.key (public) and NAME.key_secret (keep private) into DIR."""
    p = argparse.ArgumentParser(prog="velesio-keys", description=main.__doc__)
    p.add_argument("directory")
    p.add_argument("name", help="e.g. router, or the worker's name")
    args = p.parse_args(argv)
    os.makedirs(args.directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(args.directory, args.name)
    os.chmod(secret, 0o600)
    print(f"public key: {public}\nsecret key: {secret} (keep it on this host only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
