"""model/memory.py: glibc's allocator is told to keep freed tensors for reuse; elsewhere nothing is changed."""

from __future__ import annotations

import platform

import pytest

from prompt_server.model import memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc")
def test_glibc_accepts_both_thresholds():
    assert memory.keep_freed_memory() is True  # mallopt returned 1 for both settings
    assert memory.MMAP_THRESHOLD == 32 * 1024 * 1024  # glibc refuses anything above 32 MiB on 64-bit


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert memory.keep_freed_memory() is False
