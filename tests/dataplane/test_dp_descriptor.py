import struct
import uuid

import pytest
from hearth.dataplane.descriptor import FORMAT, NO_SLOT, SIZE, Descriptor, Kind, Status


def full() -> Descriptor:
    return Descriptor(
        dst=0xDEADBEEF,
        src=7,
        slot=42,
        gen=0xFFFFFFFE,
        length=233 * 10**6,
        kind=Kind.REPLY,
        flags=3,
        status=Status.HANDLER_ERROR,
        corr=uuid.uuid4().bytes,
        sent_ns=2**63 + 5,
        meta_len=123,
        aux=99,
    )


def test_round_trip_all_fields():
    d = full()
    b = d.pack()
    assert len(b) == SIZE == 64 == struct.calcsize(FORMAT)
    assert Descriptor.unpack(b) == d
    assert Descriptor.unpack(memoryview(bytearray(b))) == d


def test_layout_offsets_are_the_documented_ones():
    d = full()
    b = d.pack()
    # the BPF program reads dst at 0 and length at 16, little-endian
    assert struct.unpack_from("<I", b, 0)[0] == d.dst
    assert struct.unpack_from("<I", b, 8)[0] == d.slot
    assert struct.unpack_from("<Q", b, 16)[0] == d.length
    assert struct.unpack_from("<H", b, 24)[0] == Kind.REPLY
    assert b[32:48] == d.corr
    assert struct.unpack_from("<Q", b, 48)[0] == d.sent_ns
    assert struct.unpack_from("<I", b, 60)[0] == 99


@pytest.mark.parametrize("n", [0, 63, 65, 128])
def test_wrong_size_rejected(n):
    with pytest.raises(ValueError, match="exactly 64 bytes"):
        Descriptor.unpack(b"\0" * n)


def test_defaults_and_kinds():
    d = Descriptor.unpack(Descriptor().pack())
    assert d.slot == NO_SLOT and not d.has_slot
    assert [k.value for k in Kind] == [1, 2, 3, 4, 5, 6, 7]
    # an unknown kind from a newer peer passes through as an int
    raw = bytearray(Descriptor().pack())
    raw[24:26] = (77).to_bytes(2, "little")
    assert Descriptor.unpack(bytes(raw)).kind == 77


def test_out_of_range_field_is_a_value_error():
    with pytest.raises(ValueError, match="64-byte layout"):
        Descriptor(dst=2**32).pack()


def test_reply_keeps_correlation():
    d = full()
    r = d.reply(length=5)
    assert (r.dst, r.src, r.corr, r.kind, r.length) == (d.src, d.dst, d.corr, Kind.REPLY, 5)
    assert d.invocation_id == uuid.UUID(bytes=d.corr)
