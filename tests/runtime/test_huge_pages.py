"""prunert.runtime.huge_pages: which ranges a session's opening grew, and that the kernel really backs them (and the KV
cache) with huge pages where THP is available, leaving their contents as they were."""

from __future__ import annotations

import numpy as np
import pytest

from prunert.config import RuntimeConfig
from prunert.runtime import huge_pages
from prunert.runtime.huge_pages import HUGE_PAGE, Collapse, Range, grown, huge_empty

MIB = 1 << 20
needs_thp = pytest.mark.skipif(not huge_pages.available(), reason="no transparent huge pages here (not Linux, or THP never)")


def smaps_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding `address`."""
    fields: dict[str, str] = {}
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                low, high = (int(x, 16) for x in head[0].split("-"))
                if inside:
                    break
                inside = low <= address < high
            elif inside:
                fields[head[0].rstrip(":")] = " ".join(head[1:])
    return fields


def anon_huge_kb(array: np.ndarray) -> int:
    """AnonHugePages of the mapping around the inside of `array` (numpy's own hint makes that a VMA of its own)."""
    return int(smaps_of(array.ctypes.data + HUGE_PAGE)["AnonHugePages"].split()[0])


def test_grown_takes_new_mappings_whole_and_grown_ones_by_their_tail() -> None:
    before = {0x1000_0000: (0x1000_0000 + 8 * MIB, 8 * MIB)}  # a heap of 8 MiB, all resident
    after = {
        0x1000_0000: (0x1000_0000 + 20 * MIB, 20 * MIB),  # grew by 12 MiB, resident
        0x4000_0000: (0x4000_0000 + 6 * MIB, 6 * MIB),  # new, resident
        0x5000_0000: (0x5000_0000 + 64 * MIB, 4 * MIB),  # new but sparse: collapsing would grow RSS
        0x6000_0000: (0x6000_0000 + MIB, MIB),  # new, under one huge page
    }
    assert grown(before, after) == [Range(0x1000_0000 + 8 * MIB, 0x1000_0000 + 20 * MIB), Range(0x4000_0000, 0x4000_0000 + 6 * MIB)]
    assert grown(after, after) == []


def test_grown_takes_a_new_mmap_merged_below_an_old_mapping_without_the_old_part() -> None:
    before = {0x2000_0000: (0x2000_0000 + 4 * MIB, 4 * MIB)}  # an old mapping, resident
    after = {0x2000_0000 - 10 * MIB: (0x2000_0000 + 4 * MIB, 14 * MIB)}  # the kernel merged a new 10 MiB mmap below it
    assert grown(before, after) == [Range(0x2000_0000 - 10 * MIB, 0x2000_0000)]
    sparse = {0x2000_0000 - 10 * MIB: (0x2000_0000 + 4 * MIB, 6 * MIB)}  # the new part only 2 of 10 MiB resident
    assert grown(before, sparse) == []


def test_anonymous_ranges_see_a_touched_array() -> None:
    before = huge_pages.anonymous_ranges()
    array = np.ones(32 * MIB // 8)  # 32 MiB: its own mmap, every page touched
    found = grown(before, huge_pages.anonymous_ranges())
    low, high = array.ctypes.data, array.ctypes.data + array.nbytes
    covered = sum(max(0, min(high, r.end) - max(low, r.start)) for r in found)
    assert covered >= array.nbytes - 2 * HUGE_PAGE  # all but its unaligned ends (numpy marks the inside: its own VMA)


@needs_thp
def test_collapse_backs_what_grew_with_huge_pages_and_keeps_its_contents() -> None:
    with Collapse() as collapse:
        array = np.random.default_rng(0).standard_normal(24 * MIB // 8)  # [3M] float64: 24 MiB, touched
    expected = np.random.default_rng(0).standard_normal(24 * MIB // 8)
    assert collapse.bytes >= 20 * MIB  # the aligned inside of the array's mapping, at least
    assert anon_huge_kb(array) >= 20 * 1024
    np.testing.assert_array_equal(array, expected)


def test_collapse_disabled_does_nothing() -> None:
    with Collapse(enabled=False) as collapse:
        array = huge_empty((24 * MIB // 8,), np.dtype(np.float64), enabled=False)  # without numpy's own hint
        array[:] = 1.0
    assert collapse.bytes == 0 and anon_huge_kb(array) == 0


@needs_thp
def test_huge_empty_marks_the_buffer_before_it_is_touched() -> None:
    buffer = huge_empty((2, 4, 1024, 256), np.dtype(np.float32))  # 8 MiB
    assert buffer.shape == (2, 4, 1024, 256) and buffer.dtype == np.float32
    assert "hg" in smaps_of(buffer.ctypes.data + HUGE_PAGE)["VmFlags"].split()  # MADV_HUGEPAGE
    buffer[:] = 1.0  # faults in: as huge pages
    assert anon_huge_kb(buffer) >= 4 * 1024
    plain = huge_empty((2, 4, 1024, 256), np.dtype(np.float32), enabled=False)
    assert "nh" in smaps_of(plain.ctypes.data + HUGE_PAGE)["VmFlags"].split()  # numpy's own hint undone
    plain[:] = 1.0
    assert anon_huge_kb(plain) == 0


@needs_thp
@pytest.mark.parametrize("huge", [True, False])
def test_shared_buffer_kv_cache_follows_the_runtime_setting(tiny_artifact, huge: bool) -> None:
    from prunert.config import FUSED_DECODER, GraphPrecisions
    from prunert.runtime import Artifact
    from prunert.runtime.pipeline import decoder_graph, make_runner

    artifact = Artifact(tiny_artifact)
    graph = decoder_graph(artifact, "onnxruntime", GraphPrecisions())
    runner = make_runner(artifact, graph, "onnxruntime", GraphPrecisions(), RuntimeConfig(threads=1, huge_pages=huge))
    session = runner.decoder_session(artifact.manifest.decoder.num_layers)
    if graph != FUSED_DECODER:
        pytest.skip(f"the tiny artifact's decoder is {graph}, not the shared-buffer one")
    session.reset(1)
    session.reset(4 * HUGE_PAGE // session.buffers[0][0].nbytes + 1)  # rows enough for a buffer over 4 huge pages
    flags = smaps_of(session.buffers[0].ctypes.data + HUGE_PAGE)["VmFlags"].split()  # inside the aligned part
    assert ("hg" if huge else "nh") in flags
    assert runner.runtime.huge_pages == huge and (runner.huge_page_bytes == 0 or huge)
