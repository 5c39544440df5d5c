"""Image loading and decoding: real files, a real local HTTP server, typed errors."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import numpy as np
import pytest
from PIL import Image

from backend.errors import (
    ImageNotFound,
    ImageTooLarge,
    ImageUnreachable,
    NotAnImage,
    TruncatedImage,
    URLNotAllowed,
)
from backend.images import ImageLoader, decode
from backend.ls.connection import LabelStudioConnection
from backend.sections import ImageSettings
from backend.settings import Settings


def image_settings(**overrides) -> ImageSettings:
    base = dict(max_bytes=5_000_000, http_timeout_s=5.0, allowed_hosts=[], local_roots=[])
    return Settings().images.with_changes(**{**base, **overrides})


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width × height pixels (no real pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_local_file_and_content_key(tmp_path, sample_images):
    loader = ImageLoader(image_settings())
    blob = loader.fetch(str(sample_images["chelsea"]))
    copy = tmp_path / "renamed.png"
    copy.write_bytes(blob.data)
    assert loader.fetch(str(copy)).key == blob.key  # keyed by content, not name
    assert loader.fetch(copy.as_uri()).key == blob.key  # file:// URLs too
    img = decode(blob, 64_000_000)
    assert img.mode == "RGB" and img.size == (451, 300)


def test_exif_orientation_is_applied(tmp_path):
    # 40 wide × 20 high, left half red; EXIF orientation 6 = rotate 90° clockwise on display.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode(ImageLoader(image_settings()).fetch(str(path)), 64_000_000)
    assert out.size == (20, 40)
    top, bottom = np.asarray(out)[2, 10], np.asarray(out)[37, 10]
    assert top[0] > 200 and top[1] < 60  # the red half is now on top
    assert bottom[0] < 60


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "CMYK", "P", "I;16"])
def test_modes_become_rgb(tmp_path, mode):
    if mode in ("RGBA", "LA"):
        img = Image.new(mode, (8, 8), (0, 0) if mode == "LA" else (0, 0, 0, 0))  # fully transparent
        expected = (255, 255, 255)  # composited on white
    elif mode == "CMYK":
        img = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
        expected = (255, 0, 0)
    elif mode == "P":
        img = Image.new("RGB", (8, 8), (0, 0, 255)).convert("P")
        expected = (0, 0, 255)
    elif mode == "I;16":
        img = Image.fromarray(np.full((8, 8), 40000, np.uint16))
        img.putpixel((0, 0), 0)
        expected = (255, 255, 255)  # stretched to the 8-bit range
    else:
        img = Image.new("L", (8, 8), 128)
        expected = (128, 128, 128)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    path = tmp_path / f"img.{fmt.lower()}"
    img.save(path, fmt, quality=100) if fmt == "JPEG" else img.save(path, fmt)
    out = decode(ImageLoader(image_settings()).fetch(str(path)), 64_000_000)
    assert out.mode == "RGB"
    pixel = out.getpixel((4, 4))
    assert all(abs(a - b) <= 3 for a, b in zip(pixel, expected)), (mode, pixel)


def test_bad_inputs_give_typed_errors(tmp_path, sample_images):
    loader = ImageLoader(image_settings())
    with pytest.raises(ImageNotFound, match="file not found"):
        loader.fetch(str(tmp_path / "missing.jpg"))

    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    with pytest.raises(NotAnImage):
        decode(loader.fetch(str(text)), 64_000_000)

    full = io.BytesIO()
    Image.open(sample_images["chelsea"]).convert("RGB").save(full, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    with pytest.raises(TruncatedImage):
        decode(loader.fetch(str(truncated)), 64_000_000)

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(30000, 30000))
    with pytest.raises(ImageTooLarge, match="max_pixels") as refused:
        decode(loader.fetch(str(bomb)), 64_000_000)
    assert "900000000 pixels" in str(refused.value)  # refused from the header's size
    # Below PIL's own bound, ours still applies.
    bomb.write_bytes(bomb_png(9000, 9000))
    with pytest.raises(ImageTooLarge, match="9000x9000"):
        decode(loader.fetch(str(bomb)), 64_000_000)

    with pytest.raises(ImageTooLarge, match="max_bytes"):
        ImageLoader(image_settings(max_bytes=1000)).fetch(str(sample_images["chelsea"]))


def test_local_roots_restrict_paths(tmp_path, sample_images):
    loader = ImageLoader(image_settings(), local_roots=[tmp_path])
    inside = tmp_path / "ok.png"
    inside.write_bytes(sample_images["coffee"].read_bytes())
    assert loader.fetch(str(inside)).data == inside.read_bytes()
    with pytest.raises(URLNotAllowed):
        loader.fetch(str(sample_images["coffee"]))  # outside the roots
    with pytest.raises(URLNotAllowed):
        loader.fetch(str(tmp_path / ".." / sample_images["coffee"].parent.name / "coffee.png"))


def test_data_uri(sample_images):
    data = sample_images["rocket"].read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    assert ImageLoader(image_settings()).fetch(uri).data == data


class _StandIn(BaseHTTPRequestHandler):
    """A tiny stand-in for the parts of Label Studio and of an image host the loader uses."""

    files: dict[str, bytes] = {}
    legacy_token = "legacy-token-123"
    secret = "semlabel-test-secret-of-32-bytes!"
    seen_auth: list[str] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/octet-stream"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        if self.path.rstrip("/") == "/api/token/refresh":
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            claims = jwt.decode(body.get("refresh", ""), self.secret, algorithms=["HS256"])
            assert claims["token_type"] == "refresh"
            access = jwt.encode(
                {"token_type": "access", "exp": int(time.time()) + 300}, self.secret, algorithm="HS256"
            )
            return self._send(200, json.dumps({"access": access}).encode(), "application/json")
        self._send(404, b"")

    def do_GET(self):
        auth = self.headers.get("Authorization", "")
        path = self.path.split("?")[0]
        if path.startswith("/public/"):
            name = path[len("/public/"):]
            return self._send(200, self.files[name]) if name in self.files else self._send(404, b"")
        type(self).seen_auth.append(auth)
        ok = auth == f"Token {self.legacy_token}"
        if auth.startswith("Bearer "):
            try:
                ok = jwt.decode(auth[7:], self.secret, algorithms=["HS256"])["token_type"] == "access"
            except jwt.InvalidTokenError:
                ok = False
        if not ok:
            return self._send(401, b"unauthorised")
        if self.path.startswith("/storage-data/uploaded/"):
            key = self.path.split("filepath=")[-1]
            name = key.rsplit("/", 1)[-1]
            return self._send(200, self.files[name]) if name in self.files else self._send(404, b"")
        if path.startswith("/data/upload/"):
            name = path.rsplit("/", 1)[-1]
            return self._send(200, self.files[name]) if name in self.files else self._send(404, b"")
        self._send(404, b"")


@pytest.fixture()
def stand_in(sample_images):
    _StandIn.files = {"chelsea.png": sample_images["chelsea"].read_bytes()}
    _StandIn.seen_auth = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_allow_list(stand_in, tmp_path):
    url = f"{stand_in}/public/chelsea.png"
    with pytest.raises(URLNotAllowed):
        ImageLoader(image_settings()).fetch(url)
    loader = ImageLoader(image_settings(allowed_hosts=["127.0.0.*"]))
    assert loader.fetch(url).data == _StandIn.files["chelsea.png"]
    with pytest.raises(ImageUnreachable, match="404"):
        loader.fetch(f"{stand_in}/public/nothing.png")
    with pytest.raises(ImageTooLarge):
        ImageLoader(image_settings(allowed_hosts=["127.0.0.1"], max_bytes=100)).fetch(url)
    closed = "http://127.0.0.1:9/x.png"  # discard port: nothing listens
    with pytest.raises(ImageUnreachable):
        ImageLoader(image_settings(allowed_hosts=["127.0.0.1"])).fetch(closed)


def test_label_studio_urls_with_legacy_token(stand_in, tmp_path):
    conn = LabelStudioConnection(stand_in, _StandIn.legacy_token)
    loader = ImageLoader(image_settings(), label_studio=conn, cache_dir=tmp_path)
    blob = loader.fetch("/data/upload/1/chelsea.png")
    assert blob.data == _StandIn.files["chelsea.png"]
    assert _StandIn.seen_auth[-1] == f"Token {_StandIn.legacy_token}"
    with pytest.raises(ImageUnreachable):
        loader.fetch("/data/upload/1/missing.png")
    # An absolute URL on the Label Studio host is fetched with the token, not the allow-list.
    assert loader.fetch(f"{stand_in}/data/upload/1/chelsea.png").data == blob.data
    wrong = ImageLoader(image_settings(), label_studio=LabelStudioConnection(stand_in, "nope"), cache_dir=tmp_path / "x")
    with pytest.raises(ImageUnreachable, match="401"):
        wrong.fetch("/data/upload/1/chelsea.png")


def test_label_studio_urls_with_personal_access_token(stand_in, tmp_path):
    refresh = jwt.encode(
        {"token_type": "refresh", "exp": int(time.time()) + 3600}, _StandIn.secret, algorithm="HS256"
    )
    loader = ImageLoader(image_settings(), label_studio=LabelStudioConnection(stand_in, refresh), cache_dir=tmp_path)
    assert loader.fetch("/data/upload/2/chelsea.png").data == _StandIn.files["chelsea.png"]
    assert _StandIn.seen_auth[-1].startswith("Bearer ")
    assert refresh not in _StandIn.seen_auth[-1]  # the refresh token was exchanged


def test_label_studio_url_without_host_is_a_clear_error():
    with pytest.raises(ImageUnreachable, match="no Label Studio host"):
        ImageLoader(image_settings()).fetch("/data/upload/1/a.png")
