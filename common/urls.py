"""Joining a name onto a local path or an fsspec URL."""

from __future__ import annotations


def join_url(base: str, name: str) -> str:
    """``base/name`` with one '/', keeping the caller's spelling of ``base`` (a URL stays a URL, a relative path stays
    relative): os.path.join would mangle "s3://bucket" on Windows and posixpath.join keeps a doubled slash."""
    return f"{base.rstrip('/')}/{name}"
