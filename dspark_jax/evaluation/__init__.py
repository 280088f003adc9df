"""Offline tools: the evaluation protocol, calibration and STS, SPS profiling and step timers, the scheduler simulator."""
