"""Image prompts in the HTTP front: check the images against the model and the server's role, expand each
placeholder token to the image's embedding rows, and say where the embeddings come from.

| server | embeddings |
|---|---|
| unified / prefill with a vision tower | images loaded and preprocessed here, encoded in the engine |
| text / prefill --encoder-disaggregated | the `epd` field a balancer added (encode servers hold them); |
|   | with --encoder-urls and no `epd`, this front has its encoders encode first |
| decode | none: only the row counts (from `epd`, else the model's fixed count); the KV comes from the prefill |
"""

from __future__ import annotations

import asyncio
import logging

from pdserve.config import EngineConfig
from pdserve.epd.images import ImageError, load_and_preprocess
from pdserve.epd.mm import MultimodalInput, RemoteImage, expand_placeholders
from pdserve.epd.vlm import VLMSpec
from pdserve.server.errors import APIError, BadRequestError

logger = logging.getLogger(__name__)

MAX_IMAGES = 32


class MultimodalFront:
    def __init__(self, hf_dir: str, config: EngineConfig, api_key: str | None = None):
        self.spec = VLMSpec.from_dir(hf_dir)
        self.config = config
        self.api_key = api_key
        self._session = None  # aiohttp, for --encoder-urls
        self._http = None  # httpx, for image URLs

    @property
    def image_token(self) -> str:
        """Text that stands for one image in a chat template ('' for text-only models)."""
        return (self.spec.image_token or "") if self.spec is not None else ""

    async def prepare(self, ids: list[int], images: list[str], epd: object = None,
                      param: str = "image_data") -> tuple[list[int], MultimodalInput | None]:
        """(expanded prompt ids, multimodal input or None). Raises BadRequestError / APIError."""
        spec = self.spec
        if not images:
            if spec is not None and spec.image_token_id in ids:
                raise BadRequestError("the prompt contains image placeholder tokens but no images", param=param)
            return ids, None
        if spec is None:
            raise BadRequestError("this model takes no images (it is not a vision-language model)", param=param)
        if len(images) > MAX_IMAGES:
            raise BadRequestError(f"at most {MAX_IMAGES} images per request, got {len(images)}", param=param)
        if spec.image_token_id not in ids:  # /generate text without placeholders: images go first
            ids = [spec.image_token_id] * len(images) + list(ids)
        cfg = self.config
        if cfg.disaggregation_mode == "decode":
            remote = _parse_epd(epd, len(images)) if epd is not None else None
            rows = [r.rows for r in remote[1]] if remote else [spec.tokens_per_image] * len(images)
            out, spans = self._expand(ids, rows, (), param)
            return out, MultimodalInput(spans)
        if cfg.language_only:
            if epd is None:
                if not cfg.encoder_urls:
                    raise BadRequestError(
                        "this server takes image embeddings from encode servers: send image requests through an "
                        "EPD balancer (python -m pdserve.mini_lb --encode ...), or start it with --encoder-urls",
                        param=param)
                epd = await self._encode_remote(images)
            room, remote, digests = _parse_epd(epd, len(images))
            out, spans = self._expand(ids, [r.rows for r in remote], digests, param)
            return out, MultimodalInput(spans, room=room, remote=tuple(remote))
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(follow_redirects=True)
        loaded = await asyncio.gather(*(load_and_preprocess(src, spec.processor, self._http) for src in images),
                                      return_exceptions=True)
        for i, r in enumerate(loaded):
            if isinstance(r, ImageError):
                raise BadRequestError(f"image {i}: {r}", param=param)
            if isinstance(r, BaseException):
                raise r
        out, spans = self._expand(ids, [spec.tokens_per_image] * len(images), [d for _, d in loaded], param)
        return out, MultimodalInput(spans, pixel_values=tuple(px for px, _ in loaded))

    def _expand(self, ids, rows, digests, param):
        try:
            return expand_placeholders(ids, self.spec.image_token_id, rows, digests)
        except ValueError as e:
            raise BadRequestError(str(e), param=param) from None

    async def _encode_remote(self, images: list[str]) -> dict:
        import aiohttp

        from pdserve.epd.dispatch import EncodeFailure, encode_images

        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        try:
            return await encode_images(self._session, self.config.encoder_urls, images, headers)
        except EncodeFailure as f:
            raise APIError(f.message, status=f.status) from None


def _parse_epd(epd: object, n: int) -> tuple[int, list[RemoteImage], list[str]]:
    """The `epd` field a balancer adds: {"room": int, "images": [{"encoder": "tcp://...", "rows": int}]}."""
    if not isinstance(epd, dict):
        raise BadRequestError("epd must be an object", param="epd")
    room, images = epd.get("room"), epd.get("images")
    if not isinstance(room, int) or isinstance(room, bool) or not 0 <= room < (1 << 63):
        raise BadRequestError("epd.room must be an integer in [0, 2^63-1]", param="epd")
    if not isinstance(images, list) or len(images) != n:
        raise BadRequestError(f"epd.images must list one entry per image ({n})", param="epd")
    remote, digests = [], []
    for i, im in enumerate(images):
        enc = im.get("encoder") if isinstance(im, dict) else None
        rows = im.get("rows") if isinstance(im, dict) else None
        if not (isinstance(enc, str) and enc.startswith("tcp://") and isinstance(rows, int) and 0 < rows < 1 << 20):
            raise BadRequestError(f"epd.images[{i}] must be {{\"encoder\": \"tcp://host:port\", \"rows\": int > 0}}",
                                  param="epd")
        remote.append(RemoteImage(enc, rows))
        digests.append(im.get("digest") if isinstance(im.get("digest"), str) else "")
    return room, remote, digests
