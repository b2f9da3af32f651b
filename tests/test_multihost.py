"""Faults across machines: 2 prefill + 2 decode servers, each in its own network namespace (pdserve/bench/netns.py),
the router in front; one fault at a time under a streaming load (pdserve/bench/faults.py, the same scenarios as
benchmarks/faults.py). Nothing a client sent is lost while a healthy replica exists, and every answer equals an
undisturbed run's."""

from __future__ import annotations

import os
import time

import pytest

from pdserve.bench import faults
from pdserve.bench.netns import Network, skip_reason

BACKEND = os.environ.get("PDSERVE_TEST_FAILURE_BACKEND", "nixl")
_SKIP = skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=f"multi-host harness: {_SKIP}")


@pytest.fixture(scope="module")
def deployment():
    net = Network()
    dep = None
    try:
        dep = faults.Deployment(net, 2, 2, BACKEND, faults.ROUTER_ARGS)
        yield dep, faults.references(dep, 24)
    finally:
        if dep is not None:
            dep.close()
        net.close()


def test_requests_cross_real_links(deployment):
    dep, refs = deployment
    assert all(refs.values())
    hosts = {dep.host_of(p).ip for p in dep.servers}
    assert len(hosts) == 4 and dep.router.host not in hosts  # every server on its own address


@pytest.mark.parametrize("scenario", faults.SCENARIOS, ids=lambda s: s.__name__)
def test_fault(deployment, scenario):
    dep, refs = deployment
    result = scenario(dep, refs)
    print("\n" + faults.format_results([result]))
    assert result.requests >= 3
    assert result.succeeded == result.requests, f"{result.requests - result.succeeded} requests failed"
    assert result.unchanged == result.requests  # greedy answers equal the undisturbed run's
    assert "did not rejoin" not in result.note
    deadline = time.monotonic() + 30
    for p in dep.servers:  # the deployment is whole again
        assert p.proc.poll() is None, f"{p.name} exited"
        while not dep.healthy_in_router(p):
            assert time.monotonic() < deadline, f"{p.name} is out of rotation"
            time.sleep(0.1)
