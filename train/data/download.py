"""Files a data set downloads once into ``config.data_dir``: md5-checked, written atomically, and a
stalled or failed transfer named in one clear error."""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request

import jax

from train.errors import InputError, MissingDataError

STALL_SECONDS = 60.0  # a download that receives nothing for this long fails


def md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(data_dir: str, url: str, expected_md5: str, *, download: bool) -> str:
    """Path of ``data_dir/<file name of url>``, downloading it when absent; its md5 is checked either way.

    A transfer that fails, or receives nothing for ``STALL_SECONDS``, is a FileNotFoundError naming
    the file, the URL and the cause; nothing half-written is left behind.
    """
    path = os.path.join(data_dir, os.path.basename(url))
    fix = f"download {url} (md5 {expected_md5}) into {data_dir}"
    if os.path.exists(path):
        if (actual := md5(path)) != expected_md5:
            raise InputError(
                f"{path} is corrupt or truncated (md5 {actual}, expected {expected_md5}): delete it and run "
                f"again to download it, or {fix}"
            )
        return path
    if not download:
        raise MissingDataError(f"{path} not found; {fix}, or set --config.download=True")
    os.makedirs(data_dir, exist_ok=True)
    partial_path = f"{path}.part{jax.process_index()}"
    try:
        # The timeout bounds every blocking read: a server that stops sending fails here.
        with urllib.request.urlopen(url, timeout=STALL_SECONDS) as response, open(partial_path, "wb") as file:
            shutil.copyfileobj(response, file)
    except OSError as error:  # URLError, HTTPError and TimeoutError are OSErrors
        if os.path.exists(partial_path):
            os.remove(partial_path)
        cause = f"no data for {STALL_SECONDS:g} s" if isinstance(error, TimeoutError) else str(error)
        raise MissingDataError(f"{path} not found and downloading failed ({cause}); {fix}") from error
    if (actual := md5(partial_path)) != expected_md5:
        os.remove(partial_path)
        raise InputError(f"{url} downloaded with md5 {actual}, expected {expected_md5}; try again")
    os.replace(partial_path, path)
    return path
