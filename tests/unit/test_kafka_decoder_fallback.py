"""The fast Kafka decoder's gate (online.bus.kafka_decoder.install_fast_decoder): where kafka-python
is not what the decoder relies on, a consumer keeps the stock decoder, and that is warned once per
cause, counted, and shown in the scorer's /metrics. The consumers here are stand-ins: the gate reads
only their ``_fetcher``."""
import logging
from types import SimpleNamespace

import pytest

kafka = pytest.importorskip("kafka")

from kafka.record.default_records import DefaultRecordBatch  # noqa: E402

from online.bus import kafka_decoder  # noqa: E402
from online.metrics import Metrics  # noqa: E402


@pytest.fixture
def fresh_gate(monkeypatch):
    """The gate as in a process that has not built or refused the decoder yet."""
    monkeypatch.setattr(kafka_decoder, "_FAST_RECORDS", None)
    monkeypatch.setattr(kafka_decoder, "_fallbacks", {})


def fallback_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "stock record decoder" in r.getMessage()]


def metric_lines() -> list[str]:
    return [ln for ln in Metrics().render().splitlines() if "kafka_decoder_fallbacks_total" in ln]


def test_another_kafka_python_version_falls_back_loudly_and_is_counted(fresh_gate, monkeypatch, caplog):
    monkeypatch.setattr(kafka, "__version__", "2.4.0")
    consumers = [SimpleNamespace(_fetcher=SimpleNamespace()) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="stratarank.bus"):
        assert [kafka_decoder.install_fast_decoder(c) for c in consumers] == [False, False]
    assert not any(hasattr(c._fetcher, "PartitionRecords") for c in consumers)
    warned = fallback_warnings(caplog)
    assert len(warned) == 1 and "kafka-python 2.4.0 is not 2.3.x" in warned[0]
    assert kafka_decoder.fallbacks() == {"version": 2}
    assert kafka_decoder._fast_partition_records() is None
    assert metric_lines()[-1] == 'stratarank_kafka_decoder_fallbacks_total{reason="version"} 2.0'


def test_a_missing_private_attribute_falls_back_and_names_it(fresh_gate, monkeypatch, caplog):
    if not kafka.__version__.startswith("2.3."):
        pytest.skip("the attribute checks run on kafka-python 2.3.x")
    monkeypatch.delattr(DefaultRecordBatch, "_maybe_uncompress")
    with caplog.at_level(logging.WARNING, logger="stratarank.bus"):
        assert kafka_decoder.install_fast_decoder(SimpleNamespace(_fetcher=SimpleNamespace())) is False
    warned = fallback_warnings(caplog)
    assert len(warned) == 1 and "lacks DefaultRecordBatch._maybe_uncompress" in warned[0]
    assert kafka_decoder.fallbacks() == {"private_api": 1}
    assert metric_lines()[-1] == 'stratarank_kafka_decoder_fallbacks_total{reason="private_api"} 1.0'


def test_kafka_python_2_3_gets_the_fast_decoder_and_nothing_is_counted(fresh_gate, caplog):
    if not kafka.__version__.startswith("2.3."):
        pytest.skip("the fast decoder is for kafka-python 2.3.x")
    fetcher = SimpleNamespace()
    with caplog.at_level(logging.WARNING, logger="stratarank.bus"):
        assert kafka_decoder.install_fast_decoder(SimpleNamespace(_fetcher=fetcher)) is True
    assert fetcher.PartitionRecords is kafka_decoder._fast_partition_records() is not None
    assert kafka_decoder.fallbacks() == {} and fallback_warnings(caplog) == []
    assert [ln.split()[1] for ln in metric_lines()] == ["HELP", "TYPE"]  # no series without a fallback


def test_a_consumer_without_a_fetcher_keeps_the_stock_decoder(fresh_gate, caplog):
    if not kafka.__version__.startswith("2.3."):
        pytest.skip("the fetcher is looked at once the version passed")
    with caplog.at_level(logging.WARNING, logger="stratarank.bus"):
        assert kafka_decoder.install_fast_decoder(SimpleNamespace()) is False
    warned = fallback_warnings(caplog)
    assert len(warned) == 1 and "KafkaConsumer has no _fetcher" in warned[0]
    assert kafka_decoder.fallbacks() == {"private_api": 1}
