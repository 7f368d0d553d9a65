"""logstream: streaming log anomaly detection between Kafka topics."""

__version__ = "0.1.0"
