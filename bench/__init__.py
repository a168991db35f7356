"""The benchmark harness: configuration, models, data, metrics, tracking, Ray Tune orchestration, reports."""
