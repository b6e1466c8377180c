"""The segment log under the embedded bus and the Kafka bus's spool: per topic a folder of
segment files, each named by the byte offset of its first record and holding CRC-protected
frames. A write torn by a crash is detected and skipped, never misread (:class:`_TopicReader`);
the next writer to open the log truncates a torn tail (:func:`_recover_tail`). Several processes
may append to one topic: :class:`_TopicWriter` serialises appends with an ``flock``."""
from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib
from pathlib import Path

log = logging.getLogger("stratarank.bus")

# frame: magic, body length, crc32(body); body: publish time (f64 seconds), key length, key, value
MAGIC = b"SRL\x01"
_HEAD = struct.Struct("<4sII")
_BODY = struct.Struct("<dH")
MAX_RECORD = 16 << 20
_READ_CHUNK = 1 << 20


def _frame(ts: float, key: bytes, value: bytes) -> bytes:
    body = _BODY.pack(ts, len(key)) + key + value
    return _HEAD.pack(MAGIC, len(body), zlib.crc32(body)) + body


def _frames(ts: float, encoded) -> bytes:
    """``b"".join(_frame(ts, key, value) for key, value in encoded)``, the same bytes made cheaper: the
    body's head (time, key length, key) packed and its CRC taken once per distinct key (a request's
    records share their user's), then one join of all the pieces."""
    parts = []
    append, pack_head, crc32 = parts.append, _HEAD.pack, zlib.crc32
    prefixes: dict = {}
    for key, value in encoded:
        got = prefixes.get(key)
        if got is None:
            prefix = _BODY.pack(ts, len(key)) + key
            got = prefixes[key] = (prefix, len(prefix), crc32(prefix))
        prefix, size, crc = got
        append(pack_head(MAGIC, size + len(value), crc32(value, crc)))
        append(prefix)
        append(value)
    return b"".join(parts)


def _parse(buf, start: int, end: int, base: int = 0, limit: int = -1):
    """Parse frames of ``buf[start:end]``. Yields ``(base + pos, base + next, ts, key, value)`` and
    stops at the first frame that is incomplete or invalid, or after ``limit`` frames (``'end'``);
    returns ``(frames, stop_pos, why)`` with ``why`` one of ``'end'`` (clean end), ``'partial'``
    (frame runs past ``end``), ``'bad'`` (corrupt)."""
    frames = []
    pos = start
    head_size, unpack_head, unpack_body, body_size = _HEAD.size, _HEAD.unpack_from, _BODY.unpack_from, _BODY.size
    crc32 = zlib.crc32
    view = memoryview(buf)
    while True:
        if pos == end or limit == 0:
            return frames, pos, "end"
        if end - pos < head_size:
            return frames, pos, ("partial" if MAGIC.startswith(bytes(buf[pos:end])[:4]) else "bad")
        magic, blen, crc = unpack_head(buf, pos)
        if magic != MAGIC or blen < body_size or blen > MAX_RECORD + body_size:
            return frames, pos, "bad"
        b0 = pos + head_size
        nxt = b0 + blen
        if nxt > end:
            return frames, pos, "partial"
        if crc32(view[b0:nxt]) != crc:
            return frames, pos, "bad"
        ts, klen = unpack_body(buf, b0)
        k0 = b0 + body_size
        if k0 + klen > nxt:
            return frames, pos, "bad"
        frames.append((base + pos, base + nxt, ts, buf[k0:k0 + klen], buf[k0 + klen:nxt]))
        pos = nxt
        limit -= 1


def _resync(buf, start: int, end: int) -> int | None:
    """The position of the next valid frame after a corrupt one at ``start``, or None."""
    pos = start + 1
    while True:
        pos = buf.find(MAGIC, pos, end)
        if pos < 0:
            return None
        frames, _, why = _parse(buf, pos, end)
        if frames or why == "end":
            return pos
        pos += 1


def _segments(folder: Path) -> list[int]:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(int(n[:-4]) for n in names if n.endswith(".log") and n[:-4].isdigit())


def _seg_path(folder: Path, base: int) -> Path:
    return folder / f"{base:020d}.log"


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries durable (a rename or a new file in it survives a crash)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _TopicWriter:
    """Appends frames to one topic's active segment; safe with several writer processes."""

    def __init__(self, folder: Path, segment_bytes: int, fsync: str):
        self.folder = folder
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        folder.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        self._fd = -1
        self._base = -1
        self.dirty = False
        self.rolled = False  # set when this writer started a new segment (retention may delete old ones)
        self.truncated_bytes = 0
        with self._locked():
            self._open_latest(recover=True)

    def _locked(self):
        writer = self

        class _Lock:
            def __enter__(self):
                fcntl.flock(writer._lock_fd, fcntl.LOCK_EX)

            def __exit__(self, *exc):
                fcntl.flock(writer._lock_fd, fcntl.LOCK_UN)

        return _Lock()

    def _open_latest(self, recover: bool) -> None:
        segs = _segments(self.folder)
        if not segs:
            base = 0
            fd = os.open(_seg_path(self.folder, base), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            fsync_dir(self.folder)
        else:
            base = segs[-1]
            path = _seg_path(self.folder, base)
            if recover:
                self.truncated_bytes += _recover_tail(path)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._base = fd, base

    def append(self, data: bytes) -> None:
        with self._locked():
            size = os.fstat(self._fd).st_size
            if size >= self.segment_bytes:
                segs = _segments(self.folder)
                if segs and segs[-1] > self._base:  # another process rolled already
                    self._open_latest(recover=False)
                    size = os.fstat(self._fd).st_size
                if size >= self.segment_bytes:
                    self._sync()
                    new_base = self._base + size
                    fd = os.open(_seg_path(self.folder, new_base), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                    fsync_dir(self.folder)
                    os.close(self._fd)
                    self._fd, self._base = fd, new_base
                    self.rolled = True
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            if self.fsync == "always":
                os.fdatasync(self._fd)
            else:
                self.dirty = True

    def _sync(self) -> None:
        if self._fd >= 0 and self.fsync != "never":
            os.fdatasync(self._fd)
        self.dirty = False

    def sync(self) -> None:
        with self._locked():
            self._sync()

    def close(self) -> None:
        if self._fd >= 0:
            if self.fsync != "never":
                os.fdatasync(self._fd)
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _recover_tail(path: Path) -> int:
    """Truncate a torn tail (after the last valid frame) of a segment; returns bytes dropped."""
    data = path.read_bytes()
    end, pos = 0, 0
    while pos < len(data):
        frames, stop, why = _parse(data, pos, len(data))
        if frames:
            end = frames[-1][1]
        if why == "end":
            end = stop
            break
        nxt = _resync(data, stop, len(data))
        if nxt is None:
            break
        pos = nxt
    dropped = len(data) - end
    if dropped:
        log.warning("embedded log %s: dropping a torn tail of %d bytes at %d", path, dropped, end)
        with open(path, "r+b") as fh:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
    return dropped


class _TopicReader:
    """Reads frames of one topic from a byte position, across segments; never misreads a torn
    frame: a corrupt frame followed by valid data is skipped, an incomplete tail is waited on."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._segs: list[int] = []
        self._fh = None
        self._fh_base = -1
        self.skipped_bytes = 0
        self.retention_skipped_bytes = 0  # positions deleted by retention before this reader got there

    def _segment_for(self, pos: int, refresh: bool = False) -> tuple[int, int | None]:
        if refresh or not self._segs or pos >= (self._segs[-1] if self._segs else 0):
            self._segs = _segments(self.folder)
        segs = self._segs
        if not segs:
            return -1, None
        if pos < segs[0]:
            return segs[0], (segs[1] if len(segs) > 1 else None)
        lo, hi = 0, len(segs) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if segs[mid] <= pos:
                lo = mid
            else:
                hi = mid - 1
        return segs[lo], (segs[lo + 1] if lo + 1 < len(segs) else None)

    def _file(self, base: int):
        if self._fh_base != base:
            if self._fh is not None:
                self._fh.close()
            self._fh = open(_seg_path(self.folder, base), "rb", buffering=0)
            self._fh_base = base
        return self._fh

    def read(self, pos: int, max_records: int):
        """``(frames, new_pos)``: up to ``max_records`` frames from ``pos``."""
        out = []
        refresh = False
        while len(out) < max_records:
            base, nxt_base = self._segment_for(pos, refresh)
            if base < 0:
                return out, pos
            if pos < base:  # retention deleted what lies before ``base``
                self._retention_skip(pos, base)
                pos = base
            try:
                fh = self._file(base)
            except FileNotFoundError:  # deleted by retention since the last listing
                if refresh:
                    self._segs = _segments(self.folder)
                    if base in self._segs:
                        raise
                refresh = True
                continue
            rel = pos - base
            size = os.fstat(fh.fileno()).st_size
            if rel >= size:
                if nxt_base is not None:
                    pos = nxt_base
                    continue
                if not refresh:
                    refresh = True  # a writer may have rolled a segment since the last listing
                    continue
                return out, pos
            refresh = False
            fh.seek(rel)
            buf = fh.read(min(size - rel, _READ_CHUNK))
            frames, stop, why = _parse(buf, 0, len(buf), pos, max_records - len(out))
            if frames:
                out += frames
                pos = frames[-1][1]
                continue
            if why == "partial" and len(buf) >= _HEAD.size:
                blen = _HEAD.unpack_from(buf, 0)[1]
                if rel + _HEAD.size + blen <= size:  # a frame larger than the chunk: read it whole
                    fh.seek(rel)
                    big = fh.read(_HEAD.size + blen)
                    more, _, _ = _parse(big, 0, len(big))
                    if more:
                        fpos, fnext, ts, key, value = more[0]
                        out.append((pos, pos + fnext, ts, key, value))
                        pos += fnext
                        continue
                    why = "bad"
            if why == "partial":
                if nxt_base is None:
                    return out, pos  # a write in progress, or a torn tail the next writer truncates
                self._skip(pos, nxt_base - pos, "a torn tail")
                pos = nxt_base
                continue
            # a corrupt frame: skip to the next valid frame of this segment, else to the next segment
            fh.seek(rel)
            rest = fh.read(size - rel)
            nxt = _resync(rest, 0, len(rest))
            if nxt is not None:
                self._skip(pos, nxt, "corrupt bytes")
                pos += nxt
            elif nxt_base is not None:
                self._skip(pos, nxt_base - pos, "a torn tail")
                pos = nxt_base
            else:
                return out, pos  # a torn tail: the next writer truncates it
        return out, pos

    def _retention_skip(self, pos: int, base: int) -> None:
        self.retention_skipped_bytes += base - pos
        log.warning("embedded log %s: positions [%d, %d) were deleted by retention before they were read; "
                    "continuing at the earliest retained record (%d bytes lost to this reader)",
                    self.folder, pos, base, base - pos)

    def _skip(self, pos: int, n: int, what: str) -> None:
        self.skipped_bytes += n
        log.warning("embedded log %s: skipping %s of %d bytes at %d", self.folder, what, n, pos)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            self._fh_base = -1

