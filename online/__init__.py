"""Online serving: Flask scorer, predictor, feature store, event bus, near-line consumer."""
