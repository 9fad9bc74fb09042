"""This user's signing key for store records (see ``_store/trust.py``), kept outside every store.

The key is ``$NBBATCH_SECRET`` when set (ranks of a cluster that do not share a home directory
set the same value on every machine), else the file ``$XDG_DATA_HOME/nbbatch/secret`` (default
``~/.local/share/nbbatch/secret``), created on first use with mode 0600, as Jupyter keeps its
notebook secret. Must not import anything from nbbatch but ``_errors``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat

from nbbatch._errors import StoreError

__all__ = ["ENV_SECRET", "key_id", "load_secret", "secret_path"]

ENV_SECRET = "NBBATCH_SECRET"


def secret_path() -> str:
    """Where this user's secret lives: ``$XDG_DATA_HOME/nbbatch/secret`` or ``~/.local/share/nbbatch/secret``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "nbbatch", "secret")


def load_secret(create: bool = True) -> bytes | None:
    """This user's signing key: ``$NBBATCH_SECRET``, else the secret file (created when ``create``).

    Returns None only when there is no secret and ``create`` is False.

    Raises:
        StoreError: the secret file is readable by others, or cannot be read or created.
    """
    env = os.environ.get(ENV_SECRET)
    if env:
        return env.encode()
    path = secret_path()
    try:
        try:
            return _read_secret(path)
        except FileNotFoundError:
            if not create:
                return None
        _create_secret(path)
        return _read_secret(path)
    except OSError as exc:
        raise StoreError(
            f"cannot read or create the signing secret `{path}` ({exc.strerror or exc}); make its folder "
            f"writable, or set `{ENV_SECRET}` to a long random value (the same on every machine of a cluster)"
        ) from exc


def _read_secret(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        info = os.fstat(fd)
        if info.st_mode & 0o077 or info.st_uid != os.getuid():
            raise StoreError(
                f"the signing secret `{path}` is not private to this user (mode {stat.filemode(info.st_mode)}); "
                f"`chmod 600 {path}`, or delete it to make a new one (stores you signed must then be trusted again)"
            )
        data = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    if len(data) < 32:
        raise StoreError(f"the signing secret `{path}` is empty or truncated; delete it and nbbatch makes a new one")
    return data


def _create_secret(path: str) -> None:
    """Write a new secret to a private temporary file, then link it into place (the first writer wins)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    tmp = os.path.join(folder, f".secret-{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.write(fd, secrets.token_hex(32).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)  # atomic and exclusive: two first uses end with one secret
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def key_id(secret: bytes) -> str:
    """A short public name of a secret, shown to tell keys apart; it reveals nothing of the secret."""
    return hashlib.sha256(b"nbbatch-key-id\0" + secret).hexdigest()[:12]
