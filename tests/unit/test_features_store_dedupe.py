"""The hard bound on the feature store's dedupe keys (memory backend; Redis in
tests/integration/test_redis_store.py): at most ``dedupe_max_keys``, the oldest forgotten first."""
import pytest

from online.features import open_store
from online.nearline import NearlineConfig
from strategy.errors import ValidationError

T0 = 1.7e9


def events(lo, hi, item="i1"):
    return [{"event_id": f"e{i}", "type": "click", "user_id": "u1", "item_id": item, "ts": T0 + i}
            for i in range(lo, hi)]


def test_a_million_distinct_ids_keep_the_dedupe_set_bounded():
    store = open_store("memory://", dedupe_max_keys=50_000)
    n, batch, peak = 1_000_000, 10_000, 0
    for lo in range(0, n, batch):
        assert store.apply(events(lo, lo + batch)) == batch
        peak = max(peak, len(store.seen))
    assert peak == 50_000 and len(store.seen) == 50_000
    assert store.stats["dedupe_evicted"] == n - 50_000
    assert list(store.seen)[0] == f"e:e{n - 50_000}"  # the newest are kept, oldest first
    f = store.lookup("u1", ["i1"], now=T0)
    assert f.item_totals["click"][0] == n  # every one counted once


def test_a_replay_within_the_window_never_double_counts():
    store = open_store("memory://", dedupe_max_keys=1000)
    assert store.apply(events(0, 5000)) == 5000
    assert store.apply(events(4000, 5000)) == 0  # the last 1000: remembered
    assert store.apply(events(4500, 5000) + events(0, 10)) == 10  # older than the window: counted again
    assert store.stats["duplicates"] == 1500
    assert len(store.seen) == 1000


def test_the_bound_survives_a_snapshot_and_a_lower_bound_evicts_the_oldest_on_restore(tmp_path):
    path = tmp_path / "features.json"
    store = open_store(f"memory://{path}", dedupe_max_keys=2000)
    store.apply(events(0, 3000))
    store.snapshot()
    again = open_store(f"memory://{path}", dedupe_max_keys=500)
    assert list(again.seen) == [f"e:e{i}" for i in range(2500, 3000)]
    assert again.apply(events(2500, 3000)) == 0


@pytest.mark.parametrize("value, needle", [
    (10, "store.dedupe_max_keys: 10 is out of range"),
    (2.5, "store.dedupe_max_keys: expected an integer"),
    (True, "store.dedupe_max_keys: expected an integer"),
])
def test_dedupe_max_keys_is_validated(value, needle):
    with pytest.raises(ValidationError) as exc:
        NearlineConfig.from_dict({"store": {"dedupe_max_keys": value}})
    assert needle in str(exc.value)


def test_dedupe_max_keys_must_cover_a_replayed_batch():
    with pytest.raises(ValidationError) as exc:
        NearlineConfig.from_dict({"store": {"dedupe_max_keys": 9000}, "nearline": {"batch_size": 5000}})
    assert "store.dedupe_max_keys: 9000 is below twice nearline.batch_size (5000)" in str(exc.value)
    cfg = NearlineConfig.from_dict({"store": {"dedupe_max_keys": 10_000}, "nearline": {"batch_size": 5000}})
    assert cfg.store.open().options.dedupe_max_keys == 10_000
    assert NearlineConfig.from_dict({}).store.dedupe_max_keys == 2_000_000
    with pytest.raises(ValidationError, match="store.dedupe_max_keys"):
        open_store("memory://", dedupe_max_keys=0)
