"""Routing chunks to shards by the layout, through the native client,
against fake shards (no daemon): each chunk reaches its owner at its
offset, pulls put every value back, and malformed pushes or layouts are
refused before anything is sent."""

import numpy as np
import pytest

import paramd
from fakes import serve
from paramd.layout import as_f32
from paramd.v1 import paramd_pb2 as pb

MESSAGE_BYTES = 4 << 20


def layout(params, chunk_elems, owners):
    return lambda urls: pb.LayoutResponse(
        shards=urls,
        chunk_elems=chunk_elems,
        params=[pb.ParamSpec(name=n, shape=s) for n, s in params],
        owners=owners,
    )


@pytest.fixture
def cluster():
    stops = []

    def start(n, params, chunk_elems, owners):
        shards, urls, stop = serve(n, layout(params, chunk_elems, owners))
        stops.append(stop)
        return shards, paramd.Client(urls[0], retries=0, timeout=30)

    yield start
    for stop in stops:
        stop()


def received(shard):
    """(param, offset, values) of every segment of the shard's last push."""
    return sorted((p, o, v) for p, o, v in shard.pushes[-1][2])


def test_chunks_go_to_their_owner_at_their_offset(cluster):
    # a: 10 elements in chunks of 4 -> chunks 0,1,2; b: scalar -> chunk 3;
    # c: 8 elements -> chunks 4,5.
    shards, c = cluster(3, [("a", [2, 5]), ("b", []), ("c", [8])], 4, [0, 2, 1, 1, 2, 0])
    a = np.arange(10, dtype=np.float32).reshape(2, 5)
    grads = {"a": a, "b": np.float32(7.5), "c": -np.arange(8, dtype=np.float32)}
    c.push("j", 0, 0, grads)
    assert received(shards[0]) == [("a", 0, [0, 1, 2, 3]), ("c", 4, [-4, -5, -6, -7])]
    assert received(shards[1]) == [("a", 8, [8, 9]), ("b", 0, [7.5])]
    assert received(shards[2]) == [("a", 4, [4, 5, 6, 7]), ("c", 0, [0, -1, -2, -3])]


def test_consecutive_chunks_of_one_shard_travel_as_one_run(cluster):
    shards, c = cluster(3, [("w", [12])], 4, [1, 1, 0])
    c.push("j", 0, 0, {"w": np.arange(12, dtype=np.float32)})
    assert [(o, len(v)) for _, o, v in received(shards[1])] == [(0, 8)]
    assert [(o, len(v)) for _, o, v in received(shards[0])] == [(8, 4)]
    # A shard holding none of the chunks still gets the (empty) push.
    assert received(shards[2]) == []


def test_push_then_pull_round_trips_every_element(cluster):
    rng = np.random.default_rng(0)
    params = [("enc.weight", [7, 9]), ("enc.bias", [9]), ("head", [9, 3, 2]), ("s", []), ("empty", [0, 3])]
    ce = 5
    n_chunks = sum(-(-int(np.prod(s, dtype=np.int64)) // ce) for _, s in params)
    owners = rng.integers(0, 4, n_chunks).tolist()
    shards, c = cluster(4, params, ce, owners)
    values = {n: rng.standard_normal(s).astype(np.float32) for n, s in params}
    c.push("j", 0, 0, values)
    pulled = c.pull("j", 1)
    for n, shape in params:
        assert pulled.params[n].shape == tuple(shape)
        np.testing.assert_array_equal(pulled.params[n], values[n])
    # pull_into writes into the caller's arrays.
    out = {n: np.zeros(s, np.float32) for n, s in params}
    c.pull_into("j", 1, out)
    for n, _ in params:
        np.testing.assert_array_equal(out[n], values[n])


def test_large_tensors_are_cut_below_the_message_size(cluster):
    n = MESSAGE_BYTES // 4 * 2 + 3
    shards, c = cluster(1, [("big", [n]), ("small", [2])], n, [0, 0])
    big = np.arange(n, dtype=np.float32)
    c.push("j", 0, 0, {"big": big, "small": np.ones(2, np.float32)})
    assert [(p, o) for p, o, _ in shards[0].pushes[-1][2]] == [
        ("big", 0),
        ("big", MESSAGE_BYTES // 4),
        ("big", MESSAGE_BYTES // 2),
        ("small", 0),
    ]
    np.testing.assert_array_equal(c.pull("j", 1).params["big"], big)


def test_pushes_that_do_not_cover_the_job_exactly_are_refused_before_sending(cluster):
    shards, c = cluster(3, [("w", [2, 4]), ("b", [])], 4, [1, 2, 0])
    ok = {"w": np.ones((2, 4), np.float32), "b": np.ones((), np.float32)}
    with pytest.raises(paramd.InvalidArgument, match=r"unknown parameter 'nope' \(job 'j' has 'w', 'b'\)"):
        c.push("j", 0, 0, dict(ok, nope=np.ones(3, np.float32)))
    with pytest.raises(paramd.InvalidArgument, match=r"'w' has 5 values; its shape \[2, 4\] holds 8"):
        c.push("j", 0, 0, dict(ok, w=np.ones(5, np.float32)))
    with pytest.raises(paramd.InvalidArgument, match=r"parameter 'b' missing; a push covers every parameter"):
        c.push("j", 0, 0, {"w": ok["w"]})
    with pytest.raises(paramd.Error, match="dtype"):
        c.push("j", 0, 0, dict(ok, b=np.array(["x"])))
    assert all(s.pushes == [] for s in shards)


@pytest.mark.parametrize(
    "chunk_elems,owners,match",
    [(4, [0, 1, 1], "3 owners for 2 chunks"), (4, [0, 5], "names shard 5 of 3"), (0, [], "chunk_elems is 0")],
)
def test_a_layout_that_does_not_add_up_is_refused(cluster, chunk_elems, owners, match):
    shards, c = cluster(3, [("w", [8])], chunk_elems, owners)
    with pytest.raises(paramd.Error, match=match):
        c.push("j", 0, 0, {"w": np.ones(8, np.float32)})


def test_inputs_are_converted_without_copies_when_possible():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.shares_memory(as_f32("a", a), a)
    d = as_f32("d", np.arange(3, dtype=np.float64))
    assert d.dtype == np.dtype("<f4") and d.tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(paramd.Error, match="dtype"):
        as_f32("s", np.array(["x"]))
