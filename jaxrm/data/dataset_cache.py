"""Prepared datasets kept across runs, so that a second run on the same files does not tokenise them.

A run tokenises its JSONL files into a TFDS dataset under its own ``<workdir>/data``
(:func:`jaxrm.data.build_preference_dataset`), and a fresh workdir built it again: the README's
HH run spent 0.9-1.2 s of its 15 s in that phase on the 2-core CPU, 0.4-0.6 s with the cache
(BUILD_NOTES.md, "Issue 14, session 48"); a large file with a subword tokenizer takes minutes. With the cache on, a finished build is also
copied to ``<cache>/<key>``, and a later build of the same dataset into an empty directory
copies it from there instead. The run's directory still holds its own full copy, checked
against the files' SHA-256 and the settings as before, so a run never depends on the cache.

``key`` (:func:`key`) is a SHA-256 of everything the dataset is a function of: the builder's
settings and input fingerprints (the caller's), the source of every ``jaxrm/data`` module (the
tokenisation and truncation code) and the TFDS version. Entries are written to a temporary
directory and renamed, so a reader sees a complete entry or none, and two processes that build
the same dataset at once both succeed. A cache that cannot be read or written, or an entry
damaged on disk, costs only the build (a logged warning).

Enabled with the compilation cache by :func:`jaxrm.io.compile_cache.enable_compilation_cache`
(every script), in ``<cache dir>/datasets``; a library user who never enables it builds in
the data directory only. An entry is a full copy (as large as the dataset in a workdir), and
entries are never removed; delete the directory to reclaim the space.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
from typing import Any
import uuid

from absl import logging

_directory: str | None = None


def enable(directory: str | None) -> None:
  """Keeps prepared datasets in ``directory`` (created on first store); ``None`` turns it off."""
  global _directory
  _directory = None if directory is None else os.path.abspath(directory)


def directory() -> str | None:
  """The enabled cache directory, or ``None``."""
  return _directory


@functools.cache
def _code_digest() -> str:
  """SHA-256 of the path and source of every module of ``jaxrm/data`` and the TFDS version."""
  root = os.path.dirname(os.path.abspath(__file__))
  h = hashlib.sha256(importlib.metadata.version("tensorflow-datasets").encode())
  for name in sorted(n for n in os.listdir(root) if n.endswith(".py")):
    h.update(name.encode())
    with open(os.path.join(root, name), "rb") as f:
      h.update(f.read())
  return h.hexdigest()


def key(parts: Mapping[str, Any]) -> str:
  """The entry name of a dataset determined by ``parts`` (JSON-serialisable: its settings and
  its inputs' fingerprints) and by the ``jaxrm/data`` code that builds it."""
  text = json.dumps({"parts": parts, "code": _code_digest()}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:32]


def _copy_atomically(src: str, dest: str) -> bool:
  """Copies the directory ``src`` to ``dest`` through a temporary sibling renamed at the end;
  False (nothing left behind) when ``dest`` appeared meanwhile."""
  parent = os.path.dirname(dest)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}")
  try:
    shutil.copytree(src, tmp)
    os.rename(tmp, dest)
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.isdir(dest):  # another process renamed its copy first
      return False
    raise
  return True


def fetch(entry: str, dest: str | os.PathLike) -> bool:
  """Copies the cached dataset ``entry`` (a :func:`key`) to the directory ``dest``, which must
  not exist. Returns whether it did (False: the cache is off, has no such entry, or failed)."""
  if _directory is None:
    return False
  src = os.path.join(_directory, entry)
  if not os.path.isdir(src):
    return False
  try:
    return _copy_atomically(src, os.fspath(dest))
  except OSError as e:
    logging.warning("dataset cache: could not copy %s (%s); building the dataset", src, e)
    return False


def store(entry: str, src: str | os.PathLike) -> None:
  """Copies the prepared dataset directory ``src`` into the cache as ``entry`` (a :func:`key`)
  unless it is there already; does nothing when the cache is off."""
  if _directory is None:
    return
  dest = os.path.join(_directory, entry)
  if os.path.isdir(dest):
    return
  try:
    _copy_atomically(os.fspath(src), dest)
  except OSError as e:
    logging.warning("dataset cache: could not store %s in %s (%s)", src, _directory, e)
