"""sglang.utils: the helpers the test files import."""

from __future__ import annotations

import base64
import os


def encode_image_base64(image) -> str:
    """Base64 text of an image given as a file path, raw bytes, or something with .save() (a PIL image)."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif isinstance(image, str) and os.path.isfile(image):
        with open(image, "rb") as f:
            data = f.read()
    elif hasattr(image, "save"):
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        raise ValueError(f"cannot encode {type(image).__name__} as an image")
    return base64.b64encode(data).decode("ascii")
