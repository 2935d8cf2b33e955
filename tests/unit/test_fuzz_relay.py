"""Fuzzing kvmpod-relay's frame handling (kvmpod/relay/relay.c; issue 23, docs/reliability.md "Fuzzing"),
through its real binary, as tests/unit/test_relay.py drives it.

The fake guest sends a run of STDOUT/STDERR frames for the relay's streams (payloads of any size up to
the largest frame), then maybe something the relay must leave to kvmpod — any other type, an unknown
stream, reserved flags, a length past the limit, random bytes — then maybe more; split at random
points between the bytes kvmpod had read before the hand-over (--unread) and the socket, which gets
them in random pieces. The promises:
* every relayable frame before the first one for kvmpod reaches its stream's stdout or stderr, whole
  and in order, and nothing else does;
* the relay then execs kvmpod back (--why agent) with --unread holding exactly the bytes from that
  frame's first byte on, as far as it read them (at least its header), so kvmpod judges it; with no such
  frame, the socket's end brings kvmpod back with the partial frame at the end, if any.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpod.agent import protocol as p
from tests.conftest import REPO
from tests.fuzzing import fuzz

RELAY = REPO / "guest-agent" / "build" / "kvmpod-relay"
STREAMS = (1, 3)        # the relay's streams: --stream 1:out:err --stream 3:out:err
RECORDER = """#!/bin/sh
# kvmpod's place after the relay: records its arguments and the unread bytes.
result=$1; shift
printf '%s\\n' "$@" > "$result.args"
cat "/proc/self/fd/$2" > "$result.unread"
"""
BOUND = 30   # seconds the relay may take to come back (it takes milliseconds)
T = p.MessageType


def frame(mtype: int, stream: int, payload: bytes = b"", flags: int = 0, length: int | None = None) -> bytes:
    return struct.pack("<IHHI", len(payload) if length is None else length, mtype, flags, stream) + payload


def _judged_by_header(stop: bytes) -> bool:
    """Whether the relay sees from `stop`'s header alone that it is for kvmpod."""
    length, mtype, flags, stream = struct.unpack_from("<IHHI", stop)
    return length > p.MAX_PAYLOAD or flags != 0 or mtype not in (T.STDOUT, T.STDERR) or stream not in STREAMS


# a payload, or the size of a large one (made by payload(): a failing example stays short to print)
_PAYLOADS = st.binary(max_size=64) | st.sampled_from([4095, 4096, 65536, p.MAX_PAYLOAD - 1, p.MAX_PAYLOAD])


def payload(data: bytes | int) -> bytes:
    return data if isinstance(data, bytes) else bytes(range(251)) * (data // 251) + bytes(range(data % 251))
relayable = st.tuples(st.sampled_from([T.STDOUT, T.STDERR]), st.sampled_from(STREAMS), _PAYLOADS)
for_kvmpod = st.one_of(
    st.builds(frame, (st.sampled_from(T) | st.integers(0, 0xFFFF)).filter(lambda t: t not in (T.STDOUT, T.STDERR)),
              st.sampled_from([0, *STREAMS]), st.binary(max_size=16)),                      # another type
    st.builds(frame, st.sampled_from([T.STDOUT, T.STDERR]), st.sampled_from([0, 2, 4, 2**32 - 1]),
              st.binary(max_size=16)),                                                       # an unknown stream
    st.builds(lambda t, s, f: frame(t, s, b"x", flags=f), st.sampled_from([T.STDOUT, T.STDERR]),
              st.sampled_from(STREAMS), st.integers(1, 0xFFFF)),                             # reserved flags
    st.builds(lambda t, s, n: frame(t, s, length=n), st.sampled_from([T.STDOUT, T.STDERR]),
              st.sampled_from(STREAMS), st.sampled_from([p.MAX_PAYLOAD + 1, 2**31, 2**32 - 1])),  # too long
)


@pytest.fixture(scope="module")
def relay_binary() -> Path:
    subprocess.run(["make", "-s", "-C", str(RELAY.parent.parent), "build/kvmpod-relay"], check=True)
    return RELAY


def _reader(fd: int, into: bytearray) -> threading.Thread:
    def run() -> None:
        while chunk := os.read(fd, 1 << 16):
            into.extend(chunk)
        os.close(fd)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def run_relay(tmp: Path, relay: Path, unread: bytes, sent: list[bytes]) -> dict:
    """One relay run: `unread` handed over, `sent` written to the agent socket piece by piece, then its
    end closed. What came out: stdout and stderr per stream, the way back's arguments and
    unread bytes."""
    agent, agent_relay = socket.socketpair()
    qmp, qmp_relay = socket.socketpair()
    control = socket.socket(socket.AF_UNIX)
    control.bind(str(tmp / "control.sock"))
    control.listen()
    qemu = subprocess.Popen(["sleep", "600"])
    pidfd = os.pidfd_open(qemu.pid)
    outputs = {}
    pipes = []
    for s in STREAMS:
        for name in ("out", "err"):
            r, w = os.pipe()
            outputs[s, name] = bytearray()
            pipes.append((r, w, outputs[s, name]))
    unread_fd = os.memfd_create("unread", 0)
    os.write(unread_fd, unread)
    os.lseek(unread_fd, 0, os.SEEK_SET)
    script = tmp / "recorder.sh"
    script.write_text(RECORDER)
    script.chmod(0o755)
    result = tmp / "result"
    fds = [agent_relay.fileno(), qmp_relay.fileno(), control.fileno(), pidfd, unread_fd, *(w for _, w, _ in pipes)]
    argv = [str(relay), "--agent", str(fds[0]), "--qmp", str(fds[1]), "--control", str(fds[2]),
            "--qemu", str(pidfd), "--unread", str(unread_fd)]
    for i, s in enumerate(STREAMS):
        argv += ["--stream", f"{s}:{pipes[2 * i][1]}:{pipes[2 * i + 1][1]}"]
    argv += ["--", str(script), str(result)]
    proc = subprocess.Popen(argv, pass_fds=fds, preexec_fn=lambda: signal.pthread_sigmask(
        signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}))
    try:
        for fd in (pidfd, unread_fd, *(w for _, w, _ in pipes)):
            os.close(fd)
        for sock in (agent_relay, qmp_relay, control):
            sock.close()
        readers = [_reader(r, into) for r, _, into in pipes]
        agent.settimeout(BOUND)
        try:
            for piece in sent:
                agent.sendall(piece)
            agent.shutdown(socket.SHUT_WR)
        except OSError:
            pass   # the relay has gone back to kvmpod already (the recorder does not read the socket)
        assert proc.wait(BOUND) == 0, "the relay or its way back failed"
        for thread in readers:
            thread.join(BOUND)
            assert not thread.is_alive(), "an output pipe stayed open"
        args = (tmp / "result.args").read_text().splitlines()
        return {"args": args, "unread": (tmp / "result.unread").read_bytes(),
                **{f"{name}{s}": bytes(data) for (s, name), data in outputs.items()}}
    finally:
        for child in (proc, qemu):
            if child.poll() is None:
                child.kill()
            child.wait()
        agent.close()
        qmp.close()
        for leftover in tmp.iterdir():
            leftover.unlink()


@fuzz(max_examples=100)
@given(frames=st.lists(relayable, max_size=6), stop=st.none() | for_kvmpod | st.binary(min_size=p.HEADER_SIZE, max_size=40).filter(_judged_by_header),
       after=st.binary(max_size=32), handed=st.integers(0, 2**20), cuts=st.lists(st.integers(0, 2**20), max_size=4),
       tail=st.integers(0, p.HEADER_SIZE - 1))
def test_the_relay_relays_what_is_its_own_and_hands_back_the_rest(tmp_path_factory, relay_binary, frames, stop,
                                                                  after, handed, cuts, tail):
    tmp = tmp_path_factory.mktemp("relay")
    frames = [(t, s, payload(data)) for t, s, data in frames]
    good = b"".join(frame(t, s, data) for t, s, data in frames)
    if stop is None:   # nothing for kvmpod: the stream ends, maybe with a frame cut short
        last = frame(T.STDOUT, STREAMS[0], b"cut short")[:tail]
        stream, boundary = good + last, len(good)
    else:
        stream, boundary = good + stop + after, len(good)
    handed %= len(stream) + 1
    pieces, start = [], handed
    for cut in sorted(c % (len(stream) + 1) for c in cuts):
        if cut > start:
            pieces.append(stream[start:cut])
            start = cut
    pieces.append(stream[start:])
    out = run_relay(tmp, relay_binary, stream[:handed], pieces)

    assert out["args"][:4] == ["--unread", out["args"][1], "--why", "agent"], out["args"]
    for s in STREAMS:
        assert out[f"out{s}"] == b"".join(d for t, st_, d in frames if st_ == s and t == T.STDOUT)
        assert out[f"err{s}"] == b"".join(d for t, st_, d in frames if st_ == s and t == T.STDERR)
    unread = out["unread"]
    assert stream[boundary:].startswith(unread), "the unread bytes are not the stream from the first frame on"
    if stop is None:
        assert unread == stream[boundary:]
    else:   # the relay judged the frame by its header, and handed that much back at least
        assert len(unread) >= p.HEADER_SIZE

