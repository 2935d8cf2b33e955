"""Boot snapshots of pods with network interfaces, without a VM: the shape holds the NIC devices and
not their backends, the snapshot VM's placeholder NICs, a restored VM's NICs on the pod's backends
with the snapshot's MACs, and the NETWORK frame that tells the agent to set the pod's MACs.
The restores themselves are in tests/e2e/test_snapshot_net.py."""

from __future__ import annotations

import dataclasses

import pytest

from kvmpod.agent import protocol as p
from kvmpod.boot import snapshot
from kvmpod.net.spec import GuestInterface, GuestNetwork, Route, pod_mac
from kvmpod.vm.config import Nic, qemu_argv
from tests.unit.test_snapshot import files, vm_config  # noqa: F401  (files is a fixture)


USER = Nic("02:11:22:33:44:00", user_options=("net=10.0.2.0/24", "hostfwd=tcp:127.0.0.1:8080-:80"))
TAP = Nic("02:aa:bb:cc:dd:00", tap_fd=17)


def netdevs(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv) if word == "-netdev"]


def nic_devices(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv) if word == "-device" and "virtio-net" in argv[i + 1]]


def test_pods_with_network_interfaces_may_start_from_a_snapshot(files):
    assert snapshot.unfit(vm_config(files, nics=[USER])) is None
    assert snapshot.unfit(vm_config(files, nics=[TAP, dataclasses.replace(TAP, tap_fd=18)])) is None


def test_the_shape_has_the_nic_devices_and_not_their_backends_or_macs(files):
    def key(*nics: Nic) -> str:
        return snapshot.SnapshotShape.of(vm_config(files, nics=list(nics)), files["qemu"]).key

    one = key(USER)
    # slirp with forwards, a tap, another pod's MAC: one shape (the backend and the MAC are each pod's)
    assert key(TAP) == one
    assert key(dataclasses.replace(USER, mac="02:99:99:99:99:00", user_options=())) == one
    assert key() != one and key(TAP, TAP) != one          # the number of devices is the shape's
    assert key(USER, TAP) == key(TAP, TAP)
    assert snapshot.SnapshotShape.of(vm_config(files, nics=[TAP]), files["qemu"]).nics == 1


def test_device_macs_are_unicast_locally_administered_and_never_a_pods():
    macs = snapshot.device_macs(3)
    assert len(set(macs)) == 3
    for mac in macs:
        first = int(mac.split(":")[0], 16)
        assert first & 0x02 and not first & 0x01, mac           # locally administered, unicast
        assert mac.split(":")[0] != pod_mac("12345678-0000-0000-0000-000000000000", 0).split(":")[0]


def test_the_snapshot_vm_gets_placeholder_nics_on_hub_ports_of_their_own(files):
    maker = dataclasses.replace(vm_config(files), nics=[Nic(mac, placeholder=True)
                                                         for mac in snapshot.device_macs(2)])
    argv = qemu_argv(maker)
    assert netdevs(argv) == ["hubport,id=net0,hubid=0", "hubport,id=net1,hubid=1"]
    assert nic_devices(argv) == [f"virtio-net-device,netdev=net{i},mac={mac}"
                                 for i, mac in enumerate(snapshot.device_macs(2))]


def test_a_restored_vm_has_the_pods_backends_under_the_same_ids_and_the_snapshots_macs(files, tmp_path):
    restored = snapshot.BootSnapshot(tmp_path).restore_config(vm_config(files, nics=[USER, TAP]))
    argv = qemu_argv(restored)
    assert netdevs(argv) == ["user,id=net0,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:8080-:80",
                             "tap,id=net1,fd=17,vhost=off"]
    macs = snapshot.device_macs(2)
    assert nic_devices(argv) == [f"virtio-net-device,netdev=net0,mac={macs[0]}",
                                 f"virtio-net-device,netdev=net1,mac={macs[1]}"]
    # the cold-boot fallback's config is untouched: the pod's own MACs
    assert [n.mac for n in vm_config(files, nics=[USER, TAP]).nics] == [USER.mac, TAP.mac]


def test_the_network_frame_names_each_device_by_its_snapshot_mac_when_restored():
    network = GuestNetwork([GuestInterface("02:00:00:00:00:01", "eth0", 1500, ("10.0.2.15/24",),
                                           (Route("0.0.0.0/0", "10.0.2.2"),)),
                            GuestInterface("02:00:00:00:00:02", "eth1", 9000)])
    macs = snapshot.device_macs(2)
    decoded = p.Network.decode(network.frame(macs).payload)
    assert decoded.net_interface == [f"02:00:00:00:00:01 eth0 1500 {macs[0]}".encode(),
                                     f"02:00:00:00:00:02 eth1 9000 {macs[1]}".encode()]
    # addresses and routes keep naming the interface by the pod's MAC, which the agent has set by then
    assert decoded.net_address == [b"02:00:00:00:00:01 10.0.2.15/24"]
    assert decoded.net_route == [b"02:00:00:00:00:01 0.0.0.0/0 10.0.2.2"]
    cold = p.Network.decode(network.frame().payload)
    assert cold.net_interface == [b"02:00:00:00:00:01 eth0 1500", b"02:00:00:00:00:02 eth1 9000"]
    with pytest.raises(ValueError):
        network.frame(macs[:1])
