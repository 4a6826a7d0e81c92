"""A request's image: a `data:` URL, or a plain file name under `--images` (confined to it); nothing is fetched.

Decoding is halp.data's, with the run's EXIF policy (the run's features were read from upright or from stored
pixels, and the probe knows only those): `decode_image_bytes` for data URLs, `load_image` for files. An image's
size is read from its header before it is decoded, so an oversized upload costs no decoding.
"""

from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

from halp.data import decode_embedded_text, decode_image_bytes, load_image
from halp.errors import ImageError, ServeRequestError


def load_request_image(
    reference: str, images_dir: Path | None, exif_orientation: bool, max_pixels: int, param: str = "messages"
) -> Image.Image:
    """The RGB image a request names; a 400 saying why not."""
    try:
        if reference.startswith("data:"):
            return _data_url(reference, exif_orientation, max_pixels, param)
        scheme = urlsplit(reference).scheme
        if scheme in ("http", "https"):
            raise ServeRequestError(
                "image URLs are not fetched (the server fetches nothing): send the image as a data: URL "
                "(data:image/png;base64,...)", 400, param, "image_url_not_supported",
            )  # fmt: skip
        if len(scheme) > 1:  # a one-letter "scheme" is a Windows drive, i.e. a path: refused below
            raise ServeRequestError(f"image URL scheme {scheme!r} is not supported; send a data: URL", 400, param,
                                    "image_url_not_supported")  # fmt: skip
        if images_dir is None:
            raise ServeRequestError(
                "a plain image file name needs the server to be started with --images DIR; send a data: URL",
                400, param, "image_url_not_supported",
            )  # fmt: skip
        image = load_image(images_dir, reference, exif_orientation)
        _check_pixels(image.size, max_pixels, param)
        return image
    except ImageError as err:
        raise ServeRequestError(str(err), 400, param, "invalid_image") from err


def _data_url(url: str, exif_orientation: bool, max_pixels: int, param: str) -> Image.Image:
    header = url.partition(",")[0]
    if not header.startswith("data:image/"):
        raise ServeRequestError(f"a data: URL of an image is expected (data:image/...;base64,...), got {header[:40]!r}",
                                400, param, "invalid_image")  # fmt: skip
    data = decode_embedded_text(url, "the request's image")
    try:
        with Image.open(io.BytesIO(data)) as header_only:  # reads the header, decodes no pixels
            size = header_only.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ServeRequestError(f"the request's image cannot be read: {type(err).__name__}: {err}", 400, param,
                                "invalid_image") from err  # fmt: skip
    _check_pixels(size, max_pixels, param)
    return decode_image_bytes(data, "the request's image", exif_orientation)[0]


def _check_pixels(size: tuple[int, int], max_pixels: int, param: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ServeRequestError(
            f"the image has {width} x {height} = {width * height} pixels; this server takes at most {max_pixels}",
            400, param, "image_too_large",
        )  # fmt: skip
