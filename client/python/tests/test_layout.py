"""Routing chunks to shards from a layout, without a server."""

import numpy as np
import pytest

import paramd
from paramd.layout import MESSAGE_BYTES, Assembler, Route, pack, segments
from paramd.v1 import paramd_pb2 as pb


def layout(params, chunk_elems, owners, shards=3):
    return pb.LayoutResponse(
        shards=["http://127.0.0.1:%d" % (1000 + i) for i in range(shards)],
        chunk_elems=chunk_elems,
        params=[pb.ParamSpec(name=n, shape=s) for n, s in params],
        owners=owners,
    )


def covered(segs, name):
    """(offset, values) of every segment of `name`."""
    return [(s.offset, np.frombuffer(s.data, "<f4")) for s in segs if s.param == name]


def test_chunks_go_to_their_owner_at_their_offset():
    # a: 10 elements in chunks of 4 -> chunks 0,1,2; b: scalar -> chunk 3;
    # c: 8 elements -> chunks 4,5.
    params = [("a", [2, 5]), ("b", []), ("c", [8])]
    owners = [0, 2, 1, 1, 2, 0]
    r = Route(layout(params, 4, owners), "job")
    a = np.arange(10, dtype=np.float32).reshape(2, 5)
    b = np.float32(7.5)
    c = -np.arange(8, dtype=np.float32)
    per_shard = r.split({"a": a.reshape(-1), "b": np.asarray([b]), "c": c})
    assert len(per_shard) == 3
    expect = {
        0: [("a", 0, [0, 1, 2, 3]), ("c", 4, [-4, -5, -6, -7])],
        1: [("a", 8, [8, 9]), ("b", 0, [7.5])],
        2: [("a", 4, [4, 5, 6, 7]), ("c", 0, [0, -1, -2, -3])],
    }
    for shard, want in expect.items():
        got = [(s.param, s.offset, np.frombuffer(s.data, "<f4").tolist()) for s in per_shard[shard]]
        assert sorted(got) == sorted((n, o, [float(x) for x in v]) for n, o, v in want), shard


def test_consecutive_chunks_of_one_shard_travel_as_one_run():
    r = Route(layout([("w", [12])], 4, [1, 1, 0]), "job")
    per_shard = r.split({"w": np.arange(12, dtype=np.float32)})
    assert [(s.offset, len(s.data) // 4) for s in per_shard[1]] == [(0, 8)]
    assert [(s.offset, len(s.data) // 4) for s in per_shard[0]] == [(8, 4)]
    assert per_shard[2] == []


def test_split_then_assemble_round_trips_every_element():
    rng = np.random.default_rng(0)
    params = [("enc.weight", [7, 9]), ("enc.bias", [9]), ("head", [9, 3, 2]), ("s", [])]
    numel = {"enc.weight": 63, "enc.bias": 9, "head": 54, "s": 1}
    ce = 5
    n_chunks = sum(-(-n // ce) for n in numel.values())
    owners = rng.integers(0, 4, n_chunks).tolist()
    r = Route(layout(params, ce, owners, shards=4), "job")
    values = {n: rng.standard_normal(numel[n]).astype(np.float32) for n in numel}
    per_shard = r.split(values)
    asm = Assembler(r.shapes)
    for segs in per_shard:
        for s in segs:
            asm.place(s)
    out = asm.arrays(r.order)
    for n, shape in params:
        assert out[n].shape == tuple(shape)
        np.testing.assert_array_equal(out[n].reshape(-1), values[n])
    # Each chunk was sent to its owner and nowhere else.
    first = 0
    for n, _ in params:
        for k in range(-(-numel[n] // ce)):
            owner = owners[first + k]
            for shard, segs in enumerate(per_shard):
                hit = any(s.param == n and s.offset <= k * ce < s.offset + len(s.data) // 4 for s in segs)
                assert hit == (shard == owner), (n, k, shard, owner)
        first += -(-numel[n] // ce)


def test_pushes_that_do_not_cover_the_job_exactly_are_refused_before_sending():
    r = Route(layout([("w", [2, 4]), ("b", [])], 4, [1, 2, 0]), "job")
    ok = {"w": np.ones(8, np.float32), "b": np.ones(1, np.float32)}
    r.check(ok, "push")
    with pytest.raises(paramd.InvalidArgument, match=r"push: unknown parameter 'nope' \(job 'job' has 'w', 'b'\)"):
        r.check(dict(ok, nope=np.ones(3, np.float32)), "push")
    with pytest.raises(paramd.InvalidArgument, match=r"push: 'w' has 5 values; its shape \[2, 4\] holds 8"):
        r.check(dict(ok, w=np.ones(5, np.float32)), "push")
    with pytest.raises(paramd.InvalidArgument, match=r"push: parameter 'b' missing; a push covers every parameter"):
        r.check({"w": ok["w"]}, "push")


def test_large_tensors_are_cut_below_the_message_size():
    n = MESSAGE_BYTES // 4 * 2 + 3
    flat = np.arange(n, dtype=np.float32)
    segs = segments("big", flat)
    assert [s.offset for s in segs] == [0, MESSAGE_BYTES // 4, MESSAGE_BYTES // 2]
    assert all(len(s.data) <= MESSAGE_BYTES for s in segs)
    messages = pack(segs + segments("small", np.ones(2, np.float32)))
    assert len(messages) >= 3
    assert all(sum(len(s.data) for s in m) <= MESSAGE_BYTES for m in messages)
    asm = Assembler({"big": (n,), "small": (2,)})
    for m in messages:
        for s in m:
            asm.place(s)
    np.testing.assert_array_equal(asm.arrays(["big"])["big"], flat)


def test_a_layout_that_does_not_add_up_is_refused():
    with pytest.raises(paramd.Error, match="3 owners for 2 chunks"):
        Route(layout([("w", [8])], 4, [0, 1, 1]), "job")
    with pytest.raises(paramd.Error, match="names shard 5 of 3"):
        Route(layout([("w", [8])], 4, [0, 5]), "job")
    with pytest.raises(paramd.Error, match="chunk_elems is 0"):
        Route(layout([("w", [8])], 0, []), "job")


def test_an_incomplete_pull_is_an_error():
    asm = Assembler({"w": (4,)})
    asm.place(pb.Segment(param="w", offset=0, data=np.ones(2, "<f4").tobytes()))
    with pytest.raises(paramd.Error, match="pulled 2 of the 4 values of 'w'"):
        asm.arrays(["w"])
    with pytest.raises(paramd.Error, match="no values for 'v'"):
        Assembler({"v": (3,)}).arrays(["v"])
    with pytest.raises(paramd.Error, match="not a multiple of 4"):
        asm.place(pb.Segment(param="w", offset=0, data=b"abc"))


def test_inputs_are_converted_without_copies_when_possible():
    from paramd.layout import as_f32

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.shares_memory(as_f32("a", a), a)
    d = as_f32("d", np.arange(3, dtype=np.float64))
    assert d.dtype == np.dtype("<f4") and d.tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(paramd.Error, match="dtype"):
        as_f32("s", np.array(["x"]))
