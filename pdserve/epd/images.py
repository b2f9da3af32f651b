"""Images in: load one from a URL, a file path or a base64 data URI, within limits; preprocess it with PIL +
numpy exactly like transformers' PIL image processors (CLIP: shortest-edge resize + center crop; SigLIP:
resize to height x width), into a [3, H, W] float32 array.

Limits (pdserve/envs.py): PDSERVE_IMAGE_MAX_BYTES (encoded size), PDSERVE_IMAGE_MAX_PIXELS (decoded width x
height, checked from the header before decoding), PDSERVE_IMAGE_FETCH_TIMEOUT (URLs). Every problem raises
ImageError with a message that names the image and the cause; HTTP layers answer it with 400.

File paths are read on the machine that loads the image (the encode server in EPD), as SGLang does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re

import numpy as np

from pdserve.envs import ENVS
from pdserve.epd.vlm import ImageProcessorSpec


_B64 = re.compile(r"[A-Za-z0-9+/\s]+={0,2}\s*")


class ImageError(ValueError):
    """A client's image that cannot be used (400)."""


def describe(src: str) -> str:
    """A short, log-safe name of an image source (never a whole data URI)."""
    if src.startswith("data:"):
        return f"data URI ({len(src)} chars)"
    return src if len(src) <= 120 else src[:117] + "..."


async def fetch_bytes(src: str, client=None, max_bytes: int | None = None, timeout: float | None = None) -> bytes:
    """The encoded bytes of an image source. URLs are fetched with httpx (an AsyncClient may be passed)."""
    max_bytes = max_bytes or ENVS.epd_image_max_bytes
    if not isinstance(src, str) or not src:
        raise ImageError("an image must be given as a non-empty string (URL, file path or data URI)")
    if src.startswith(("http://", "https://")):
        return await _fetch_url(src, client, max_bytes, timeout or ENVS.epd_image_fetch_timeout_s)
    if src.startswith("data:"):
        head, sep, payload = src.partition(",")
        if not sep or ";base64" not in head:
            raise ImageError("a data URI image must be base64 encoded (data:image/...;base64,...)")
        return _b64(payload, max_bytes)
    path = src[len("file://"):] if src.startswith("file://") else src
    if os.path.isfile(path):
        size = os.path.getsize(path)
        if size > max_bytes:
            raise ImageError(f"image file {describe(path)} is too large: {size} bytes > {max_bytes} "
                             "(PDSERVE_IMAGE_MAX_BYTES)")
        with open(path, "rb") as f:
            return f.read()
    if len(src) > 64 and _B64.fullmatch(src):
        return _b64(src, max_bytes)  # bare base64, as SGLang accepts
    raise ImageError(f"image {describe(src)} is neither a http(s) URL, a data URI, base64, nor an existing file")


def _b64(payload: str, max_bytes: int) -> bytes:
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageError(f"base64 image is too large: about {len(payload) * 3 // 4} bytes > {max_bytes} "
                         "(PDSERVE_IMAGE_MAX_BYTES)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"invalid base64 image data: {e}") from None


async def _fetch_url(url: str, client, max_bytes: int, timeout: float) -> bytes:
    import httpx

    own = client is None
    client = client or httpx.AsyncClient(timeout=timeout, follow_redirects=True)
    try:
        async with client.stream("GET", url, timeout=timeout) as r:
            if r.status_code != 200:
                raise ImageError(f"cannot fetch image {describe(url)}: HTTP {r.status_code}")
            n = r.headers.get("content-length")
            if n is not None and n.isdigit() and int(n) > max_bytes:
                raise ImageError(f"image {describe(url)} is too large: {n} bytes > {max_bytes} "
                                 "(PDSERVE_IMAGE_MAX_BYTES)")
            chunks, total = [], 0
            async for chunk in r.aiter_bytes():
                total += len(chunk)
                if total > max_bytes:
                    raise ImageError(f"image {describe(url)} is too large: more than {max_bytes} bytes "
                                     "(PDSERVE_IMAGE_MAX_BYTES)")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as e:
        raise ImageError(f"cannot fetch image {describe(url)}: {type(e).__name__}: {e}".rstrip(": ")) from None
    finally:
        if own:
            await client.aclose()


def decode(data: bytes, max_pixels: int | None = None):
    """Encoded bytes -> RGB PIL image, refusing non-images and images over the pixel limit (header check)."""
    from PIL import Image, UnidentifiedImageError

    max_pixels = max_pixels or ENVS.epd_image_max_pixels
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("the data is not an image PIL can read") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt headers
        raise ImageError(f"cannot read the image: {type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"image is too large: {w}x{h} = {w * h} pixels > {max_pixels} (PDSERVE_IMAGE_MAX_PIXELS)")
    if w < 1 or h < 1:
        raise ImageError(f"image has no pixels ({w}x{h})")
    try:
        img.load()
        return img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - truncated / corrupt pixel data
        raise ImageError(f"cannot decode the image: {type(e).__name__}: {e}") from None


def preprocess(img, spec: ImageProcessorSpec) -> np.ndarray:
    """RGB PIL image -> [3, H, W] float32, as transformers' PIL backend computes it."""
    from PIL import Image

    if spec.resize_shortest_edge:
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = spec.resize_shortest_edge, int(spec.resize_shortest_edge * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample=Image.Resampling(spec.resample))
    elif spec.resize_hw:
        h, w = spec.resize_hw
        if img.size != (w, h):
            img = img.resize((w, h), resample=Image.Resampling(spec.resample))
    x = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # [3, H, W]
    if spec.crop_hw:
        x = _center_crop(x, spec.crop_hw)
    x = x.astype(np.float32) * np.float32(spec.rescale_factor)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def _center_crop(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """transformers' center_crop: pad with zeros when the image is smaller than the crop."""
    ch, cw = hw
    _, h, w = x.shape
    if h < ch or w < cw:
        ph, pw = max(ch, h), max(cw, w)
        padded = np.zeros((x.shape[0], ph, pw), dtype=x.dtype)
        top, left = (ph - h) // 2, (pw - w) // 2
        padded[:, top:top + h, left:left + w] = x
        x, h, w = padded, ph, pw
    top, left = int((h - ch) / 2), int((w - cw) / 2)
    return x[:, top:top + ch, left:left + cw]


async def load_and_preprocess(src: str, spec: ImageProcessorSpec, client=None) -> tuple[np.ndarray, str]:
    """(pixel values [3, H, W] float32, sha256 of the encoded image). Decoding runs in a worker thread."""
    import asyncio

    data = await fetch_bytes(src, client)

    def work() -> tuple[np.ndarray, str]:
        return preprocess(decode(data), spec), hashlib.sha256(data).hexdigest()

    return await asyncio.get_running_loop().run_in_executor(None, work)
