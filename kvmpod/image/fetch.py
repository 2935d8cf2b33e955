"""Downloading an image over http(s): streamed to a file, capped, with a progress bar on a terminal.

The URL is the image's, as the user gave it or as appc discovery found it (kvmpod/image/discovery.py);
the store asks for its signature the same way (`missing_ok`: none is unsigned). What arrives is
imported exactly like a local file, so every check of the import applies to it.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from kvmpod.version import __version__
from kvmpod.errors import ImageError
from kvmpod.image.limits import ImportLimits, human_size
from kvmpod.image.transfer import Transfer
from kvmpod.progress import progress

TIMEOUT = 60.0      # seconds without a byte before a download is abandoned
CHUNK = 1 << 20


def download(url: str, dest: Path, limits: ImportLimits, missing_ok: bool = False,
             transfer: Transfer = Transfer()) -> bool:
    """Write the body of `url` to `dest`; an ImageError names the URL and what went wrong.
    With `missing_ok`, a 404 returns False instead (an image's optional signature). https is verified
    against the system's anchors plus `transfer.ca_file` (not at all with --insecure-options=tls)."""
    request = urllib.request.Request(url, headers={"User-Agent": f"kvmpod/{__version__}"})
    try:
        with transfer.opener().open(request, timeout=TIMEOUT) as response, dest.open("wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if total is not None and total > limits.max_size:
                raise ImageError(f"{url}: {human_size(total)} exceeds the {human_size(limits.max_size)} "
                                 "image limit ([image] max-size in kvmpod.toml)")
            received = 0
            with progress(f"downloading {url.rsplit('/', 1)[-1] or url}", total) as advance:
                while chunk := response.read(CHUNK):
                    received += len(chunk)
                    if received > limits.max_size:
                        raise ImageError(f"{url}: download exceeds the {human_size(limits.max_size)} image "
                                         "limit ([image] max-size in kvmpod.toml)")
                    out.write(chunk)
                    advance(len(chunk))
            if total is not None and received != total:
                raise ImageError(f"{url}: download truncated ({received} of {total} bytes)")
        return True
    except urllib.error.HTTPError as e:
        if missing_ok and e.code == 404:
            return False
        raise ImageError(f"{url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise ImageError(f"{url}: cannot download: {e.reason}{transfer.tls_hint(e.reason)}") from e
    except (OSError, ValueError) as e:  # timeouts, resets, malformed URLs
        raise ImageError(f"{url}: cannot download: {e}") from e

