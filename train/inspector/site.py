"""The static site of `train inspect`: files that open from disk (file://) with no server and no
network, and the crash-safe way they are written.

    DIR/index.html, app.js, style.css     the app (train/inspector/assets/, copied as they are)
    DIR/data/meta.js                      SAE_DATA.meta = {...}: run, SAE, cache, pass, notes
    DIR/data/index.js                     SAE_DATA.index = {...}: one column per figure, one entry per latent
    DIR/data/vocab.js                     SAE_DATA.vocab = {"id": "decoded token", ...} (used ids only)
    DIR/data/chunks/NNNNNN.js             SAE_DATA.chunk(N, [latent record, ...]): latents N*C .. N*C+C-1

Data are JSON inside .js files, because browsers refuse fetch() of local files but load <script
src> from the same folder; the app injects a chunk's <script> when one of its latents is opened.

Writes: the site is built in `.DIR.inspect-tmp-<pid>-<random>` beside DIR, each file fsynced, then
renamed into place. An existing non-empty DIR is refused unless force; with force it is first
renamed to `.DIR.inspect-old-<pid>` and removed only once the new site is in place, so a kill at
any moment leaves either the old site or the new one (and at worst a hidden folder to delete).
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Iterable

from shared.durable import fsync_path
from train.inspector.loading import InspectError

ASSETS = Path(__file__).with_name("assets")
ASSET_FILES = ("index.html", "app.js", "style.css")


class SiteError(InspectError):
    """The site cannot be written where asked; the message says what to do."""


def check_out(out: str | os.PathLike, force: bool) -> Path:
    """The output folder, refused if it is a file or (without force) a non-empty folder."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise SiteError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SiteError(f"--out {out} exists and is not empty; choose another folder or pass --force "
                        "(the old folder is replaced only once the new site is complete)")
    return out


def js_assign(name: str, value: Any) -> bytes:
    """`SAE_DATA.<name> = <json>;` as a file body."""
    return (f"window.SAE_DATA = window.SAE_DATA || {{}};\nSAE_DATA.{name} = " + _json(value) + ";\n").encode()


def js_chunk(n: int, records: list[dict]) -> bytes:
    return f"SAE_DATA.chunk({n}, {_json(records)});\n".encode()


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Temp folders of earlier inspects of the same DIR whose process is gone (killed mid-write)."""
    for p in out.parent.glob(f".{out.name}.inspect-tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def write_site(out: str | os.PathLike, files: Iterable[tuple[str, bytes]], force: bool = False) -> Path:
    """Write the app's assets and `files` ((relative path, bytes) pairs, produced lazily) as the
    site DIR, crash-safely (module docstring). Returns DIR."""
    out = check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = out.parent / f".{out.name}.inspect-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for name in ASSET_FILES:
            _write(tmp / name, (ASSETS / name).read_bytes())
        for rel, data in files:
            _write(tmp / rel, data)
        for d in sorted({p.parent for p in tmp.rglob("*")}, key=lambda p: len(p.parts), reverse=True):
            fsync_path(d)
        check_out(out, force)  # nothing appeared there meanwhile
        old = None
        if out.is_dir() and any(out.iterdir()):
            old = out.parent / f".{out.name}.inspect-old-{os.getpid()}"
            os.rename(out, old)
        os.replace(tmp, out)  # onto an absent or empty folder
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- --serve


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


def make_server(site: str | os.PathLike, port: int = 0) -> http.server.ThreadingHTTPServer:
    """An HTTP server for the site on 127.0.0.1 (port 0: a free port; see .server_address)."""
    handler = partial(_QuietHandler, directory=str(site))
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)


def serve(site: str | os.PathLike, port: int = 0, announce=print) -> None:
    """Serve the site on 127.0.0.1 until Ctrl-C (KeyboardInterrupt), announcing its URL first."""
    try:
        server = make_server(site, port)
    except OSError as e:
        raise SiteError(f"cannot listen on 127.0.0.1:{port} ({e.strerror}); choose another --port") from None
    host, bound = server.server_address[:2]
    announce(f"serving {site} at http://{host}:{bound}/index.html (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
