"""glibc's malloc keeps large freed blocks once a backbone has run on the CPU: a large input's activations are
not page-faulted afresh at every call (the cost per pixel of large keep-aspect inputs, issue 14)."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from patchcore.backbones import cpu_memory, create_backbone

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_the_environment_can_leave_malloc_alone(monkeypatch):
    monkeypatch.setenv(cpu_memory.ENV, "0")
    assert cpu_memory.keep_freed_blocks.__wrapped__() is False


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_a_large_input_is_not_page_faulted_afresh_at_every_call(monkeypatch):
    monkeypatch.delenv(cpu_memory.ENV, raising=False)
    backbone = create_backbone("efficientnet_lite0", None, "random")
    x = torch.zeros(1, 3, 384, 1500)  # activations up to 55 MiB: over glibc's own 32 MiB mmap threshold
    with torch.inference_mode():
        backbone(x)  # sets the thresholds (once per process) and warms the heap
        backbone(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        backbone(x)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert cpu_memory.keep_freed_blocks() is True
    assert faults < 5_000  # without the thresholds: about 90,000 (155,000 per megapixel)
