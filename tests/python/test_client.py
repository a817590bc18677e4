"""End-to-end test of Ferrospike with the official Python client (`pip install aerospike`, 19.x).

Run against a running server:   FERROSPIKE_PORT=3000 python tests/python/test_client.py
(or with pytest: FERROSPIKE_PORT=3000 pytest tests/python/test_client.py).
`cargo test --test server_python` starts a server and runs this script.
Exits non-zero on the first failure.
"""

import os
import sys
import time

import aerospike
from aerospike import exception as ex
from aerospike_helpers.operations import operations as op

HOST = os.environ.get("FERROSPIKE_HOST", "127.0.0.1")
PORT = int(os.environ.get("FERROSPIKE_PORT", "3000"))

_client = None


def client():
    global _client
    if _client is None:
        _client = aerospike.client({"hosts": [(HOST, PORT)]}).connect()
    return _client


def test_put_get_remove_flow():
    # The flow from the Aerospike Python client documentation.
    c = client()
    key = ("test", "demo", "key1")
    c.put(key, {"name": "John Doe", "age": 32})
    (k, meta, bins) = c.get(key)
    assert bins == {"name": "John Doe", "age": 32}, bins
    assert meta["gen"] == 1, meta
    assert k[0:2] == ("test", "demo") and len(k[3]) == 20, k
    c.remove(key)
    try:
        c.get(key)
        raise AssertionError("get after remove should raise RecordNotFound")
    except ex.RecordNotFound:
        pass
    try:
        c.remove(key)
        raise AssertionError("remove of a missing key should raise RecordNotFound")
    except ex.RecordNotFound:
        pass


def test_types_select_exists():
    c = client()
    key = ("test", "demo", "types")
    bins = {
        "i": 1,
        "s": "abc",
        "f": 1.5,
        "b": bytearray(b"\x00\x01"),
        "l": [1, "x", 2.5, None, True],
        "m": {"k": 2, "n": [1]},
        "t": True,
    }
    c.put(key, bins, meta={"ttl": 100})
    (_, meta, got) = c.get(key)
    assert got["i"] == 1 and got["s"] == "abc" and got["f"] == 1.5, got
    assert bytes(got["b"]) == b"\x00\x01", got
    assert got["l"] == [1, "x", 2.5, None, True], got
    assert got["m"] == {"k": 2, "n": [1]}, got
    assert got["t"] is True, got
    assert 90 <= meta["ttl"] <= 100, meta
    (_, _, sel) = c.select(key, ["s", "i"])
    assert sel == {"s": "abc", "i": 1}, sel
    (_, meta) = c.exists(key)
    assert meta is not None and meta["gen"] == 1, meta
    (_, meta) = c.exists(("test", "demo", "no-such-key"))
    assert meta is None, meta
    c.remove_bin(key, ["t"])
    (_, _, got) = c.get(key)
    assert "t" not in got, got


def test_increment_append_prepend_touch():
    c = client()
    key = ("test", "demo", "counters")
    c.put(key, {"n": 10, "s": "mid"})
    c.increment(key, "n", 5)
    c.increment(key, "fresh", 2)
    c.append(key, "s", ">")
    c.prepend(key, "s", "<")
    (_, meta, got) = c.get(key)
    assert got == {"n": 15, "s": "<mid>", "fresh": 2}, got
    gen = meta["gen"]
    c.touch(key, 500)
    (_, meta) = c.exists(key)
    assert meta["gen"] == gen + 1 and 490 <= meta["ttl"] <= 500, meta


def test_operate_and_policies():
    c = client()
    key = ("test", "demo", "operate")
    c.put(key, {"i": 6, "s": "__abcdef"})
    (_, _, got) = c.operate(key, [op.increment("i", 10), op.read("i"), op.append("s", "!"), op.read("s")])
    assert got == {"i": 16, "s": "__abcdef!"}, got
    try:
        c.put(key, {"x": 1}, policy={"exists": aerospike.POLICY_EXISTS_CREATE})
        raise AssertionError("create-only on an existing record should fail")
    except ex.RecordExistsError:
        pass
    try:
        c.put(key, {"x": 1}, meta={"gen": 99}, policy={"gen": aerospike.POLICY_GEN_EQ})
        raise AssertionError("generation mismatch should fail")
    except ex.RecordGenerationError:
        pass
    (_, meta) = c.exists(key)
    c.put(key, {"x": 1}, meta={"gen": meta["gen"]}, policy={"gen": aerospike.POLICY_GEN_EQ})
    c.put(key, {"only": 1}, policy={"exists": aerospike.POLICY_EXISTS_REPLACE})
    (_, _, got) = c.get(key)
    assert got == {"only": 1}, got
    try:
        c.put(("test", "demo", "never-there"), {"a": 1}, policy={"exists": aerospike.POLICY_EXISTS_UPDATE})
        raise AssertionError("update-only of a missing record should fail")
    except ex.RecordNotFound:
        pass
    # send key: a stored key comes back with the record
    skey = ("test", "demo", 42)
    c.put(skey, {"v": 42}, policy={"key": aerospike.POLICY_KEY_SEND})
    (k, _, _) = c.get(skey, policy={"key": aerospike.POLICY_KEY_SEND})
    assert k[2] == 42, k
    # TTL expiry
    short = ("test", "demo", "short")
    c.put(short, {"a": 1}, meta={"ttl": 1})
    time.sleep(2.5)
    (_, meta) = c.exists(short)
    assert meta is None, meta


def test_batch_read():
    c = client()
    keys = [("test", "batch", i) for i in range(10)]
    for i in range(0, 10, 2):
        c.put(keys[i], {"v": i, "w": -i})
    res = c.batch_read(keys)
    assert len(res.batch_records) == 10
    for i, br in enumerate(res.batch_records):
        if i % 2 == 0:
            assert br.result == 0 and br.record[2] == {"v": i, "w": -i}, (i, br.result, br.record)
        else:
            assert br.result == 2 and br.record is None, (i, br.result, br.record)
    res = c.batch_read(keys[:4], ["w"])
    assert res.batch_records[2].record[2] == {"w": -2}, res.batch_records[2].record
    res = c.batch_read(keys[:2], [])
    assert res.batch_records[0].result == 0 and res.batch_records[1].result == 2


def test_scan_and_query():
    c = client()
    for i in range(30):
        c.put(("test", "scanset", i), {"x": i}, policy={"key": aerospike.POLICY_KEY_SEND})
    c.put(("test", "otherset", 1), {"x": -1})
    recs = c.scan("test", "scanset").results()
    assert len(recs) == 30, len(recs)
    assert sorted(r[0][2] for r in recs) == list(range(30))
    assert sorted(r[2]["x"] for r in recs) == list(range(30))
    q = c.query("test", "scanset")
    q.select("x")
    recs = q.results()
    assert len(recs) == 30, len(recs)
    assert all(set(r[2].keys()) == {"x"} for r in recs)


def test_info():
    c = client()
    res = c.info_all("build")
    assert len(res) == 1, res
    (err, value) = list(res.values())[0]
    assert err is None and value == "8.1.0.0\n", res
    res = c.info_all("namespaces")
    assert list(res.values())[0][1].strip() == "test", res


def test_truncate_and_sets():
    c = client()
    for i in range(50):
        c.put(("test", "pytrunc", i), {"v": i})
        c.put(("test", "pykeep", i), {"v": i})
    sets = list(c.info_all("sets").values())[0][1]
    assert "set=pytrunc:objects=50:" in sets, sets
    c.truncate("test", "pytrunc", 0)
    for i in (0, 25, 49):
        (_, meta) = c.exists(("test", "pytrunc", i))
        assert meta is None, f"pytrunc {i} survived the truncate"
    (_, meta) = c.exists(("test", "pykeep", 7))
    assert meta is not None
    sets = list(c.info_all("sets").values())[0][1]
    assert "set=pytrunc:objects=0:" in sets, sets
    assert "set=pykeep:objects=50:" in sets, sets
    assert len(c.scan("test", "pykeep").results()) == 50
    assert len(c.scan("test", "pytrunc").results()) == 0


def main():
    tests = [(n, f) for n, f in sorted(globals().items()) if n.startswith("test_") and callable(f)]
    failed = 0
    for name, f in tests:
        try:
            f()
            print(f"ok      {name}")
        except Exception as e:  # noqa: BLE001 - report every failure
            failed += 1
            print(f"FAILED  {name}: {type(e).__name__}: {e}")
    if _client is not None:
        _client.close()
    print(f"{len(tests) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
