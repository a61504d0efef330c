"""Large payloads out of Temporal's history: stored once by content hash, referenced by hash.

A long agent conversation sends the whole conversation to every model call, so the inputs grow
with each turn and the history grows with the square of the turns. This codec cuts each large
payload into chunks at JSON element boundaries (``},{`` and ``],[``), choosing where to cut from
the content itself, so the chunks of a conversation's first N messages are the same bytes in
every later call: each is stored once, and the history holds a list of 16-byte hashes.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from hashlib import blake2b

from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

from .._errors import StoreError
from ..stores.blobs import BlobStore

ENCODING = b"binary/corral-blobs"
_ORIGINAL = "corral-encoding"  # the payload's own encoding, while it is offloaded
_HASH = 16
_BOUNDARY = re.compile(rb"[}\]],[{\[]")
_MIN_CHUNK = 512
_MAX_CHUNK = 32 * 1024


def chunks(data: bytes) -> list[bytes]:
    """Cut ``data`` where the content says so: after an element whose CRC ends in 3 zero bits
    (one in eight), no smaller than 512 bytes and no larger than 32 KiB."""
    out: list[bytes] = []
    start = last = 0
    for match in _BOUNDARY.finditer(data):
        end = match.start() + 1
        size = end - start
        if size >= _MAX_CHUNK:
            out.extend(_fixed(data[start:end]))
            start = end
        elif size >= _MIN_CHUNK and zlib.crc32(data[last:end]) & 7 == 0:
            out.append(data[start:end])
            start = end
        last = end
    out.extend(_fixed(data[start:]))
    return out


def _fixed(data: bytes) -> list[bytes]:
    return [data[i:i + _MAX_CHUNK] for i in range(0, len(data), _MAX_CHUNK)] or [b""]


class OffloadCodec(PayloadCodec):
    """Payloads over ``threshold`` bytes go to the blob store; a local cache keeps hot chunks."""

    def __init__(self, blobs: BlobStore, *, threshold: int = 4096,
                 cache_bytes: int = 64 * 1024 * 1024) -> None:
        self.blobs = blobs
        self.threshold = threshold
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._stored: OrderedDict[bytes, None] = OrderedDict()  # hashes known to be stored

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out: list[Payload] = []
        new: dict[bytes, bytes] = {}
        for payload in payloads:
            if len(payload.data) < self.threshold:
                out.append(payload)
                continue
            refs = []
            for chunk in chunks(payload.data):
                key = blake2b(chunk, digest_size=_HASH).digest()
                refs.append(key)
                if key not in self._stored:
                    new[key] = chunk
            metadata = dict(payload.metadata)
            metadata[_ORIGINAL] = metadata.get("encoding", b"")
            metadata["encoding"] = ENCODING
            out.append(Payload(metadata=metadata, data=b"".join(refs)))
        if new:
            await asyncio.to_thread(self.blobs.put, new)
            for key, chunk in new.items():
                self._remember(key, chunk)
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        wanted = {
            p.data[i:i + _HASH]
            for p in payloads if p.metadata.get("encoding") == ENCODING
            for i in range(0, len(p.data), _HASH)
        }
        # what the cache has now: another encode or decode may evict it while we wait below
        found = {key: self._cache[key] for key in wanted if key in self._cache}
        missing = [key for key in wanted if key not in found]
        if missing:
            fetched = await asyncio.to_thread(self.blobs.get, missing)
            lost = [key.hex() for key in missing if key not in fetched]
            if lost:
                raise StoreError(
                    f"{len(lost)} payload chunk(s) are missing from the blob store (first "
                    f"{lost[0]}); the database the workers use is not the one that stored "
                    "them: point every client and worker at the same database",
                )
            for key, chunk in fetched.items():
                self._remember(key, chunk)
            found.update(fetched)
        out: list[Payload] = []
        for payload in payloads:
            if payload.metadata.get("encoding") != ENCODING:
                out.append(payload)
                continue
            keys = (payload.data[i:i + _HASH] for i in range(0, len(payload.data), _HASH))
            parts = [found[k] for k in keys]
            metadata = dict(payload.metadata)
            metadata["encoding"] = metadata.pop(_ORIGINAL)
            out.append(Payload(metadata=metadata, data=b"".join(parts)))
        return out

    def _remember(self, key: bytes, chunk: bytes) -> None:
        self._stored[key] = None
        if len(self._stored) > 1_000_000:
            self._stored.popitem(last=False)
        if key in self._cache:
            self._cache.move_to_end(key)
            return
        self._cache[key] = chunk
        self._cached += len(chunk)
        while self._cached > self._cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached -= len(old)
