"""Unit checks of the hot path's shortcuts (docs/benchmarks.md, second round): the
template-built frames are the bytes ``append_frame`` gives, the decoder keeps only an
incomplete tail, the shared empty in-flight table cannot be written to, and the
histogram's count is still the number of observations."""

from __future__ import annotations

import pytest

from device_adapters.tcp.framing import FrameDecoder, FrameError, append_frame, decode, encode_frame
from device_adapters.tcp.session import TcpSession
from fishchat_iot.core.envelope import KIND_TOPIC, Envelope
from fishchat_iot.core.session import NO_INFLIGHT
from fishchat_iot.roles.monitor_metrics import Histogram


def _bare_session(v1: bool = False) -> TcpSession:
    s = TcpSession.__new__(TcpSession)  # no listener: only the emit_* paths
    s.out = bytearray()
    s.v1 = v1
    s.psk = None  # not a gateway-terminated device
    return s


@pytest.mark.parametrize("v1", [False, True])
def test_template_frames_are_the_bytes_of_append_frame(v1: bool) -> None:
    s = _bare_session(v1)
    ref = bytearray()
    for ts in (1, 1, 1764260000123, 1764260000123, 7):
        env = Envelope('id"1\u00e9', "al\\ice", "bob", 'b\u00f6dy\n"\u2028', ts, 5)
        s.emit_message(env)
        s.emit_accepted(env.id)
        if v1:
            append_frame(ref, "RESP_MESSAGE_P2P", [env.body, env.sender, env.id])
        else:
            append_frame(ref, "RESP_MESSAGE_P2P", [env.body, env.sender, env.id, str(ts)])
            append_frame(ref, "ACCEPTED", [env.id])
    topic = Envelope("t1", "alice", "bob", "hi", 9, 6, KIND_TOPIC, "room")
    s.emit_message(topic)
    if v1:
        append_frame(ref, "RESP_MESSAGE_TOPIC", ["room", "hi", "alice"])
    else:
        append_frame(ref, "RESP_MESSAGE_TOPIC", ["room", "hi", "alice", "t1", "9"])
    assert bytes(s.out) == bytes(ref)


def test_decoder_keeps_only_an_incomplete_tail() -> None:
    frames = [encode_frame("SEND_PING", []), encode_frame("P2P_ACK", ["me", "a", "b"])]
    data = b"".join(frames)
    # Whole frames: nothing kept.
    items, tail = decode(None, data, 65536)
    assert items == [("SEND_PING", []), ("P2P_ACK", ["me", "a", "b"])] and tail is None
    # Every split point: the same frames, and a tail only while one is incomplete.
    for cut in range(1, len(data)):
        first, tail = decode(None, data[:cut], 65536)
        assert (tail is None) == (cut == len(frames[0]))
        rest, tail = decode(tail, data[cut:], 65536)
        assert first + rest == items and tail is None
    dec = FrameDecoder()
    assert dec.feed(data[:3]) == [] and dec.buffered == 3
    assert dec.feed(data[3:]) == items and dec.buffered == 0


def test_decoder_errors_keep_their_messages_and_neighbours() -> None:
    bad = [b"[1]", b'{"Args":[]}', b'{"CmdName":"X","Args":[1]}', b'{"CmdName":"X","Args":7}']
    data = b"".join(len(b).to_bytes(4, "big") + b for b in bad) + encode_frame("X", ["a"])
    items, tail = decode(None, data, 65536)
    assert tail is None
    texts = [i.text for i in items[:4] if isinstance(i, FrameError)]
    assert texts == [
        'frame is not a JSON object {"CmdName", "Args"}',
        "frame has no CmdName string",
        "frame Args must be a list of strings",
        "frame Args must be a list of strings",
    ]
    assert items[4] == ("X", ["a"])
    assert decode(None, encode_frame("X", []) + b"\x00\x00\x00\x00", 65536)[1] is None
    fatal = decode(None, (70000).to_bytes(4, "big"), 65536)[0]
    assert isinstance(fatal[-1], FrameError) and fatal[-1].fatal


def test_the_shared_empty_inflight_table_is_read_only() -> None:
    env = Envelope("m", "a", "b", "x", 1, 1)
    with pytest.raises(TypeError):
        NO_INFLIGHT["m"] = (env, False)
    with pytest.raises(TypeError):
        NO_INFLIGHT.setdefault("m", (env, False))
    with pytest.raises(TypeError):
        NO_INFLIGHT.update({"m": (env, False)})
    assert NO_INFLIGHT.pop("m", None) is None and len(NO_INFLIGHT) == 0


def test_histogram_count_is_the_number_of_observations() -> None:
    h = Histogram()
    for v in (0, 0, 1, 3, 400, 10**7):
        h.observe(v)
    assert h.count == 6 and h.total == 404 + 10**7
    assert h.cumulative()[0] == ("1", 3) and h.cumulative()[-1] == ("+Inf", 6)
