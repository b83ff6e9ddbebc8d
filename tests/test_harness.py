"""harness/: free_port never hands out a port twice, nor one in the kernel's ephemeral range (a process binds
its ports only after its engine is up; until then another pick, or vLLM's own ephemeral binds, could take it)."""

import pathlib

from harness.processes import free_port


def test_free_ports_are_distinct_and_below_the_ephemeral_range():
    low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    singles = [free_port() for _ in range(500)]
    spans = [free_port(span=4) for _ in range(50)]
    taken = singles + [p + r for p in spans for r in range(4)]
    assert len(taken) == len(set(taken)), "a port was handed out twice"
    assert all(10_000 <= p < low for p in taken)
