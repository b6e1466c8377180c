"""online.ann.AnnIndex against exact inner-product search (numpy), with adds, removes, rebuilds, saves."""
import threading

import numpy as np
import pytest

from online.ann import AnnIndex


def vectors(n, dim=16, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def exact(ids, items, queries, k):
    top = np.argsort(-(queries @ items.T), axis=1)[:, :k]
    return [[ids[j] for j in row] for row in top]


def recall(found, truth):
    return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_search_matches_exact_search(kind):
    items, queries = vectors(4000), vectors(50, seed=1)
    ids = [f"i{k}" for k in range(len(items))]
    index = AnnIndex(16, kind, nprobe=64, ef_search=128)
    index.add(ids, items)
    found, scores = index.search(queries, 20)
    r = recall(found, exact(ids, items, queries, 20))
    assert r == 1.0 if kind == "flat" else r >= 0.9
    assert scores.shape == (50, 20) and np.all(np.diff(scores, axis=1) <= 1e-6)   # best first


def test_removed_ids_are_never_returned_and_a_readded_id_has_its_new_vector():
    items = vectors(2000)
    ids = [f"i{k}" for k in range(len(items))]
    index = AnnIndex(16, "hnsw", compact_fraction=None)
    index.add(ids, items)
    gone = set(ids[:500])
    assert index.remove(list(gone) + ["unknown"]) == 500
    found, _ = index.search(vectors(30, seed=2), 50)
    assert all(not (set(row) & gone) for row in found) and all(len(row) == 50 for row in found)
    target = vectors(1, seed=3)
    index.add(["i1000"], target)               # i1000 moves to a new vector
    assert index.search(target, 1)[0] == [["i1000"]]
    assert index.tombstones == 501


def test_rebuild_swaps_in_a_new_corpus_and_keeps_the_adds_made_while_building():
    old, new = vectors(3000), vectors(3000, seed=5)
    ids = [f"i{k}" for k in range(3000)]
    index = AnnIndex(16, "hnsw")
    index.add(ids, old)
    future = index.rebuild(ids, new)
    fresh = vectors(1, seed=6)
    index.add(["fresh"], fresh)                # during (or just after) the build: never lost
    assert future.result(timeout=60) >= 3000
    assert index.search(fresh, 1)[0] == [["fresh"]]
    q = new[:20]
    assert [row[0] for row in index.search(q, 1)[0]] == ids[:20]   # the new vectors serve


def test_auto_moves_to_a_graph_past_flat_max_items():
    index = AnnIndex(16, "auto", flat_max_items=500, hnsw_max_items=10_000)
    index.add([f"a{k}" for k in range(400)], vectors(400))
    assert index.current_kind == "flat"
    index.add([f"b{k}" for k in range(600)], vectors(600, seed=7))
    index.rebuild_future.result(timeout=60) if index.rebuild_future is not None else index.rebuild().result(60)
    assert index.current_kind == "hnsw"
    assert len(index.search(vectors(1, seed=8), 10)[0][0]) == 10


def test_save_and_load_give_the_same_answers(tmp_path):
    items, queries = vectors(1500), vectors(10, seed=9)
    index = AnnIndex(16, "hnsw")
    index.add([f"i{k}" for k in range(1500)], items)
    index.remove(["i3", "i4"])
    index.save(tmp_path / "ann")
    loaded = AnnIndex.load(tmp_path / "ann")
    assert loaded.search(queries, 15)[0] == index.search(queries, 15)[0]
    (tmp_path / "ann" / "ids.json").write_text("{not json")
    with pytest.raises(ValueError, match="ids.json"):
        AnnIndex.load(tmp_path / "ann")


@pytest.mark.parametrize("call", [
    lambda ix: ix.add(["a"], np.zeros((1, 8), np.float32)),          # wrong dim
    lambda ix: ix.add(["a", "b"], np.zeros((1, 16), np.float32)),    # ids and rows differ
    lambda ix: ix.add([7], np.zeros((1, 16), np.float32)),           # not a string id
    lambda ix: ix.add([""], np.zeros((1, 16), np.float32)),
    lambda ix: ix.search(np.zeros((1, 16), np.float32), 0),
    lambda ix: ix.rebuild(["a"], None),
])
def test_bad_input_is_a_clear_value_error(call):
    with pytest.raises(ValueError):
        call(AnnIndex(16, "flat"))


def test_bad_settings_are_rejected():
    for kwargs in ({"kind": "lsh"}, {"dim": 0}, {"compact_fraction": 1.5},
                   {"flat_max_items": 10, "hnsw_max_items": 5}):
        with pytest.raises(ValueError):
            AnnIndex(**{"dim": 16, **kwargs})


def test_concurrent_searches_adds_and_removes():
    index = AnnIndex(16, "hnsw")
    index.add([f"i{k}" for k in range(2000)], vectors(2000))
    errors = []

    def searcher():
        try:
            for _ in range(50):
                found, _ = index.search(vectors(4, seed=11), 10)
                assert all(len(row) == 10 for row in found)
        except Exception as exc:   # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    for k in range(20):
        index.add([f"n{k}-{j}" for j in range(20)], vectors(20, seed=100 + k))
        index.remove([f"i{k}"])
    for t in threads:
        t.join()
    assert not errors
    assert "n19-0" in index.search(vectors(20, seed=119)[:1], 1)[0][0]
