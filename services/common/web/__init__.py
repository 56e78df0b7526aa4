"""The Falcon web kernel every service is built on: app assembly, errors, request ids, metrics, SSE."""
