"""Host side of the executor rules: event handlers and isolators from the manifest to START."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from kvmpod.agent import protocol as p
from kvmpod.agent.session import Isolators, ProcessSpec
from kvmpod.errors import ImageError, ProtocolError
from kvmpod.image.manifest import Isolator, parse_manifest
from kvmpod.pod.spec import AppOverrides, enforced_isolators, isolator_notices, pod_manifest, resolve_app
from kvmpod.store import StoredImage
from tests.unit.test_protocol import _pair, run

F, T = p.Field, p.MessageType


def _image(**app) -> StoredImage:
    manifest = {"acKind": "ImageManifest", "acVersion": "0.8.11", "name": "example.com/exec",
                "app": {"exec": ["/bin/app"], "user": "0", "group": "0", **app}}
    return StoredImage("sha512-" + "0" * 128, Path("/nonexistent"), parse_manifest(json.dumps(manifest).encode()))


def _resolve(image: StoredImage, **overrides):
    return resolve_app(image, AppOverrides(image="x.aci", **overrides), {}, Path("/d.iso"), "img0")


CAPS_RETAIN = {"name": "os/linux/capabilities-retain-set", "value": {"set": ["CAP_NET_ADMIN", "CAP_CHOWN"]}}
CAPS_REMOVE = {"name": "os/linux/capabilities-remove-set", "value": {"set": ["CAP_MKNOD"]}}
NNP = {"name": "os/linux/no-new-privileges", "value": True}
SEC_REMOVE = {"name": "os/linux/seccomp-remove-set", "value": {"set": ["mkdir", "reboot"], "errno": "ENOTSUP"}}
SEC_RETAIN = {"name": "os/linux/seccomp-retain-set", "value": {"set": ["read", "write"]}}


# -- event handlers ------------------------------------------------------------------------

def test_event_handlers_come_from_the_manifest_and_go_into_start():
    image = _image(eventHandlers=[{"name": "post-stop", "exec": ["/bin/down", "-v"]},
                                  {"name": "pre-start", "exec": ["/bin/up"]}])
    app = _resolve(image)
    assert app.event_handlers == {"pre-start": ["/bin/up"], "post-stop": ["/bin/down", "-v"]}
    spec = ProcessSpec("a", "img0", ["/bin/app"], [], pre_start=app.event_handlers["pre-start"],
                       post_stop=app.event_handlers["post-stop"])
    start = p.Start.decode(spec.message().encode())
    assert start.pre_start == [b"/bin/up"] and start.post_stop == [b"/bin/down", b"-v"]


def test_an_app_without_handlers_sends_no_handler_fields():
    app = _resolve(_image())
    assert app.event_handlers == {}
    tags = {tag for tag, _ in p.iter_tlv(ProcessSpec("a", "img0", ["/bin/app"], []).message().encode())}
    assert not tags & {F.PRE_START, F.POST_STOP, F.CAPS_RETAIN, F.CAPS_REMOVE, F.SECCOMP_RETAIN, F.SECCOMP_REMOVE,
                       F.SECCOMP_ERRNO}


def test_handlers_and_isolators_are_in_the_pod_manifest():
    app = _resolve(_image(eventHandlers=[{"name": "pre-start", "exec": ["/bin/up"]}], isolators=[NNP]))
    entry = pod_manifest([app])["apps"][0]["app"]
    assert entry["eventHandlers"] == [{"name": "pre-start", "exec": ["/bin/up"]}]
    assert entry["isolators"] == [NNP]


# -- isolators -----------------------------------------------------------------------------

def _isolators(*raw: dict) -> list[Isolator]:
    return [Isolator(i["name"], i["value"]) for i in raw]


def _start(isolators: Isolators) -> p.Start:
    """The START an app with these isolators gets."""
    return ProcessSpec("a", "img0", ["/bin/app"], [], isolators=isolators).message()


def test_no_isolators_means_the_agent_defaults():
    enforced, unenforced = enforced_isolators("a", [])
    assert enforced == Isolators() and unenforced == []
    start = _start(enforced)
    assert (start.caps_retain, start.caps_remove, start.seccomp_retain, start.seccomp_remove) == ([], [], [], [])
    assert start.seccomp_errno is None


def test_capabilities_retain_set_is_sent_name_by_name():
    enforced, _ = enforced_isolators("a", _isolators(CAPS_RETAIN))
    assert enforced.caps_retain == ("CAP_NET_ADMIN", "CAP_CHOWN") and enforced.caps_remove is None
    assert _start(enforced).caps_retain == [b"CAP_NET_ADMIN", b"CAP_CHOWN"]
    assert [tag for tag, _ in p.iter_tlv(_start(enforced).encode())].count(F.CAPS_RETAIN) == 2


def test_capabilities_remove_set_no_new_privileges_and_seccomp_remove_set():
    enforced, unenforced = enforced_isolators("a", _isolators(CAPS_REMOVE, NNP, SEC_REMOVE))
    assert unenforced == []
    assert enforced == Isolators(caps_remove=("CAP_MKNOD",), seccomp_remove=("mkdir", "reboot"),
                                 seccomp_errno="ENOTSUP", no_new_privileges=True)
    start = _start(enforced)
    assert start.start_flags == p.StartFlag.NO_NEW_PRIVS
    assert (start.caps_remove, start.seccomp_remove, start.seccomp_errno) == (
        [b"CAP_MKNOD"], [b"mkdir", b"reboot"], b"ENOTSUP")


def test_seccomp_retain_set_without_errno_kills():
    enforced, _ = enforced_isolators("a", _isolators(SEC_RETAIN))
    assert enforced.seccomp_retain == ("read", "write") and enforced.seccomp_errno == ""
    assert _start(enforced).seccomp_errno is None  # absent, not empty


def test_no_new_privileges_false_sets_no_flag():
    enforced, _ = enforced_isolators("a", _isolators({"name": "os/linux/no-new-privileges", "value": False}))
    assert _start(enforced).start_flags == 0


@pytest.mark.parametrize("name, value", [
    ("os/linux/seccomp-retain-set", "@appc.io/all"),
    ("os/linux/seccomp-remove-set", "@appc.io/empty"),
])
def test_the_spec_wildcards_pass_to_the_agent(name, value):
    enforced, _ = enforced_isolators("a", [Isolator(name, {"set": [value, "read"]})])
    assert value in (enforced.seccomp_retain or enforced.seccomp_remove)


@pytest.mark.parametrize("name, value", [
    ("os/linux/seccomp-remove-set", "@docker/default-blacklist"),
    ("os/linux/seccomp-retain-set", "@rkt/default-whitelist"),
    ("os/linux/seccomp-remove-set", "@appc.io/all"),     # a wildcard of the other set
    ("os/linux/seccomp-retain-set", "@appc.io/empty"),
])
def test_other_seccomp_groups_are_refused_in_one_line(name, value):
    with pytest.raises(ImageError) as e:
        enforced_isolators("web", [Isolator(name, {"set": ["read", value]})])
    assert str(e.value).startswith(f"app web: isolator {name}: {value} is not supported")
    assert "\n" not in str(e.value)


def test_unenforced_isolators_are_named_and_vm_resources_are_not():
    isolators = _isolators(
        {"name": "resource/memory", "value": {"limit": "1G"}}, {"name": "resource/cpu", "value": {"limit": "1"}},
        {"name": "os/linux/oom-score-adj", "value": 5}, {"name": "os/unix/sysctl", "value": {"net.x": "1"}},
        {"name": "example.com/mine", "value": [1, 2]}, {"name": "resource/network-bandwidth",
                                                        "value": {"default": True, "limit": "1G"}},
        NNP)
    enforced, unenforced = enforced_isolators("a", isolators)
    assert enforced.no_new_privileges
    assert unenforced == ["os/linux/oom-score-adj", "os/unix/sysctl", "example.com/mine",
                          "resource/network-bandwidth"]


def test_notices_are_one_line_per_isolator_and_app():
    one = _resolve(_image(isolators=[{"name": "os/linux/oom-score-adj", "value": 5},
                                     {"name": "os/linux/cpu-shares", "value": 512}]), name="one")
    two = _resolve(_image(isolators=[NNP, {"name": "resource/memory", "value": {"limit": "1G"}}]), name="two")
    assert isolator_notices([one, two]) == ["app one: isolator os/linux/oom-score-adj is not enforced",
                                            "app one: isolator os/linux/cpu-shares is not enforced"]


def test_resolved_app_carries_what_the_guest_enforces():
    app = _resolve(_image(isolators=[CAPS_RETAIN, SEC_REMOVE]))
    assert app.isolators.caps_retain == ("CAP_NET_ADMIN", "CAP_CHOWN")
    assert app.isolators.seccomp_remove == ("mkdir", "reboot") and app.unenforced_isolators == []


# -- the session: a pre-start handler's output comes before STARTED ------------------------

def _early_output(spec: ProcessSpec):
    async def scenario():
        host, guest = await _pair()
        await asyncio.gather(host.handshake(), guest.hello())
        out = bytearray()
        start = asyncio.ensure_future(host.start(spec, out.extend, out.extend))
        mtype, stream, _ = await guest.recv()
        assert mtype is T.START
        guest.send(p.Frame(T.STDOUT, stream, b"from pre-start\n"))
        guest.send(p.frame(p.Started(pid=42), stream))
        try:
            proc = await start
        except ProtocolError as e:
            return e
        guest.send(p.frame(p.Exit(exit_code=0), stream))
        await proc.wait()
        await host.close()
        return bytes(out)
    return run(scenario())


def test_output_before_started_is_accepted_with_a_pre_start_handler():
    spec = ProcessSpec("a", "img0", ["/bin/app"], [], pre_start=["/bin/up"])
    assert _early_output(spec) == b"from pre-start\n"


def test_output_before_started_is_a_protocol_error_without_one():
    error = _early_output(ProcessSpec("a", "img0", ["/bin/app"], []))
    assert isinstance(error, ProtocolError) and "before STARTED" in str(error)


def test_a_pre_start_failure_is_a_start_error_with_exit_code_125():
    from kvmpod.agent.session import _start_error

    error = _start_error("pre-start", None, "app a: pre-start handler /bin/up exited with code 3")
    assert error.exit_code == 125 and str(error) == "app a: pre-start handler /bin/up exited with code 3"
