"""Sizing the VM from resource isolators: quantities, sums, pod bounds, explicit flags."""

from __future__ import annotations

from decimal import Decimal

import pytest

from kvmpod.errors import UsageError
from kvmpod.image.manifest import Isolator
from kvmpod.pod.resources import (DEFAULT_POD_MEMORY_MIB, GUEST_OVERHEAD_MIB, AppResources, app_resources,
                                  parse_quantity, size_vm)


@pytest.mark.parametrize("text, value", [("500m", Decimal("0.5")), ("2", 2), ("1.5", Decimal("1.5")),
                                         ("1G", 10**9), ("512Mi", 512 << 20), ("1Gi", 1 << 30), ("100k", 10**5)])
def test_quantities(text, value):
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "1Q", "-1", "1 G", "G", "1.2.3"])
def test_bad_quantities(text):
    with pytest.raises(ValueError, match="resource quantity"):
        parse_quantity(text)


def mem(name: str, limit: str | None = None, cpu: str | None = None) -> AppResources:
    isolators = []
    if limit:
        isolators.append(Isolator("resource/memory", {"limit": limit}))
    if cpu:
        isolators.append(Isolator("resource/cpu", {"limit": cpu}))
    return app_resources(name, isolators)


def test_no_isolators_give_the_default_size():
    size = size_vm([mem("a"), mem("b")], host_cpus=2)
    assert (size.memory_mib, size.cpus, size.notices) == (DEFAULT_POD_MEMORY_MIB, 1, ())


def test_app_limits_add_up_with_the_guest_overhead():
    size = size_vm([mem("a", "256Mi", "500m"), mem("b", "128Mi", "1")], host_cpus=4)
    assert (size.memory_mib, size.cpus) == (256 + 128 + GUEST_OVERHEAD_MIB, 2)
    size = size_vm([mem("a", "1G"), mem("b")], host_cpus=4)  # b has no limit: the per-app default
    assert size.memory_mib == 954 + 128 + GUEST_OVERHEAD_MIB


def test_pod_limits_bound_the_apps():
    pod = mem("pod", "512Mi", "1")
    assert size_vm([mem("a", "256Mi")], pod, host_cpus=2).memory_mib == 256 + GUEST_OVERHEAD_MIB
    assert size_vm([mem("a"), mem("b")], pod, host_cpus=2).memory_mib == 512 + GUEST_OVERHEAD_MIB
    with pytest.raises(UsageError, match=r"limits \(768 MiB\) exceed the pod's \(512 MiB\)"):
        size_vm([mem("a", "512Mi"), mem("b", "256Mi")], pod)
    with pytest.raises(UsageError, match="resource/cpu limits"):
        size_vm([mem("a", cpu="2")], pod)


def test_explicit_flags_win_with_a_notice_when_they_undercut():
    size = size_vm([mem("a", "512Mi")], memory_mib=256, cpus=2, host_cpus=2)
    assert (size.memory_mib, size.cpus) == (256, 2)
    assert size.notices == ("--memory 256M is below the 576 MiB the apps' memory limits need",)


def test_cpus_are_capped_by_the_host():
    size = size_vm([mem("a", cpu="8")], host_cpus=2)
    assert size.cpus == 2 and "ask for 8 vCPUs" in size.notices[0]


def test_a_bad_limit_names_the_app():
    with pytest.raises(UsageError, match=r"web: resource/memory limit: '1Q' is not a resource quantity"):
        mem("web", "1Q")
